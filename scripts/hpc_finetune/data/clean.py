"""Cleaning the rows of a dataset part (the training rows, or a held-out split) as the data stage does: normalise,
strip a leading BOS from text rows, drop empty and duplicate rows, measure the tokens as the trainer sees them,
apply dataset.long_rows, and refuse a part that lost too much. No heavy imports: the tokenizer is passed in.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass

from hpc_finetune.data.source import is_empty, normalise
from hpc_finetune.io.cli import StageError, plural

LONG_ROWS = ("drop", "truncate", "error")
DROP_REASONS = ("empty", "duplicate", "too_long")


@dataclass(frozen=True)
class Limits:
    """training.max_seq_length, dataset.long_rows and dataset.max_dropped_fraction."""

    max_seq_length: int
    long_rows: str
    max_dropped_fraction: float


@dataclass
class Part:
    """The rows of one part (training, or the held-out split) after cleaning: (row, token length) pairs."""

    where: str
    input_rows: int
    pairs: list[tuple[dict, int]]
    counts: Counter
    long: int  # rows over max_seq_length (dropped or truncated)


def clean(rows: list[dict], where: str, fmt: str, text_field: str, tokenizer, model: str, limits: Limits,
          exclude: set[str] = frozenset()) -> Part:
    """Normalise, strip a leading BOS from text rows, drop empty and duplicate rows (and those in `exclude`: the
    training rows, for the held-out split), measure the tokens and apply dataset.long_rows."""
    bos = tokenizer.bos_token
    counts: Counter = Counter()
    kept, numbers, seen = [], [], set()
    for number, out in enumerate(normalise(rows, fmt, text_field, where), start=1):
        if fmt == "text" and bos and out["text"].startswith(bos):
            out["text"] = out["text"][len(bos) :]
            counts["bos_stripped"] += 1
        key = json.dumps(out, sort_keys=True)
        reason = "empty" if is_empty(out) else "duplicate" if key in seen else "in_train" if key in exclude else None
        if reason:
            counts[reason] += 1
            continue
        seen.add(key)
        kept.append(out)
        numbers.append(number)

    lengths = token_lengths(tokenizer, kept, fmt, model)
    long = [i for i, n in enumerate(lengths) if n > limits.max_seq_length]
    if long and limits.long_rows == "error":
        first = ", ".join(f"row {numbers[i]} ({lengths[i]} tokens)" for i in long[:5])
        raise StageError(
            f"{where}: {plural(len(long), 'row')} longer than max_seq_length={limits.max_seq_length} tokens: "
            f"{first}{', ...' * (len(long) > 5)}. Raise training.max_seq_length or set dataset.long_rows to "
            "drop or truncate"
        )
    pairs = list(zip(kept, lengths, strict=True))
    if limits.long_rows == "drop":
        pairs = [(row, n) for row, n in pairs if n <= limits.max_seq_length]
        counts["too_long"] = len(long)
    part = Part(where, len(rows), pairs, counts, len(long))
    check_dropped(part, fmt, text_field, limits)
    return part


def check_dropped(part: Part, fmt: str, text_field: str, limits: Limits) -> None:
    dropped = {reason: part.counts[reason] for reason in (*DROP_REASONS, "in_train") if part.counts[reason]}
    if part.pairs and sum(dropped.values()) <= limits.max_dropped_fraction * part.input_rows:
        return
    hints = {
        "empty": f"check dataset.format (resolved: {fmt}) and dataset.text_field ({text_field})",
        "duplicate": "the dataset repeats rows: deduplicate it or raise dataset.max_dropped_fraction",
        "too_long": f"raise training.max_seq_length ({limits.max_seq_length}) or set long_rows truncate",
        "in_train": "the rows repeat rows the model trains on (or, for a test set, its held-out rows); for a "
                    "held-out split, set dataset.eval_split none to hold out dataset.eval_fraction of the training "
                    "rows instead",
    }
    why = "no rows left" if not part.pairs else f"more than dataset.max_dropped_fraction={limits.max_dropped_fraction}"
    raise StageError(
        f"{part.where}: {sum(dropped.values())} of {plural(part.input_rows, 'row')} dropped "
        f"({', '.join(f'{n} {reason}' for reason, n in dropped.items()) or 'none'}), {why}. Likely fix: "
        + ("; ".join(hints[reason] for reason in dropped) or "check dataset.path")
    )


def token_lengths(tokenizer, rows: list[dict], fmt: str, model: str) -> list[int]:
    """Lengths as the trainer sees them: the chat template for messages; for text and prompt + completion the
    tokenizer (which adds BOS) after TRL's appended EOS."""
    if not rows:
        return []
    if fmt in ("messages", "alpaca"):
        if not tokenizer.chat_template:
            raise StageError(
                f"the tokenizer of {model} has no chat template, so it cannot train on chat rows; "
                "use an instruct model or a text/prompt_completion dataset"
            )
        try:
            ids = tokenizer.apply_chat_template(
                [r["messages"] for r in rows], tokenize=True, return_dict=True
            )
        except Exception as err:  # jinja raises its own errors, e.g. "system role not supported"
            raise StageError(f"the chat template of {model} rejects these conversations: {err}") from None
    else:
        eos = tokenizer.eos_token or ""
        texts = [r["text"] if fmt == "text" else r["prompt"] + r["completion"] for r in rows]
        ids = tokenizer([t if t.endswith(eos) else t + eos for t in texts])
    return [len(x) for x in ids["input_ids"]]


def length_stats(lengths: list[int]) -> dict:
    if not lengths:
        return {"min": 0, "mean": 0, "max": 0, "p95": 0}
    ordered = sorted(lengths)
    return {
        "min": ordered[0],
        "mean": round(sum(ordered) / len(ordered), 1),
        "max": ordered[-1],
        "p95": ordered[math.ceil(0.95 * len(ordered)) - 1],
    }


def length_histogram(lengths: list[int], bins: int = 20) -> dict:
    """Token lengths in at most `bins` equal-width bins of whole tokens: `edges` (one more than `counts`; bin i
    holds lengths from edges[i] up to but excluding edges[i + 1], the last one including its upper edge)."""
    if not lengths:
        return {"edges": [], "counts": []}
    low, high = min(lengths), max(lengths)
    width = max(1, math.ceil((high - low + 1) / bins))
    count = math.ceil((high - low + 1) / width)
    counts = [0] * count
    for n in lengths:
        counts[(n - low) // width] += 1
    return {"edges": [low + i * width for i in range(count + 1)], "counts": counts}
