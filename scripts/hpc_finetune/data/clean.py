"""Cleaning the rows of a dataset part (the training rows, or a held-out split) as the data stage does: normalise,
strip a leading BOS from text rows, drop empty and duplicate rows, measure the tokens as the trainer sees them,
apply dataset.long_rows, and refuse a part that lost too much. No heavy imports: the tokenizer is passed in.

The rows stream through: they are read, normalised and measured (the fast tokenizer, BATCH rows at a time, in a
thread beside the reading: hpc_finetune.data.tokens) as they come, and the kept ones go to a file (Kept); what stays in memory per row is a fixed-size digest (for the
duplicate and leak checks), a file offset and a token length, whatever the rows hold.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from hpc_finetune.data.source import is_empty, normalised
from hpc_finetune.io.cli import StageError, plural

LONG_ROWS = ("drop", "truncate", "error")
DROP_REASONS = ("empty", "duplicate", "too_long")
BATCH = 2048  # rows measured by the tokenizer at a time


@dataclass(frozen=True)
class Limits:
    """training.max_seq_length, dataset.long_rows and dataset.max_dropped_fraction."""

    max_seq_length: int
    long_rows: str
    max_dropped_fraction: float


def digest(line: bytes) -> bytes:
    """A row's identity for the duplicate and leak checks: 16 bytes of BLAKE2b of its normalised JSON (the
    normalisers build every row with the same key order, so equal rows give equal JSON)."""
    return hashlib.blake2b(line, digest_size=16).digest()


class Kept:
    """The rows a part keeps, in input order, in a file of JSON lines (as the outputs hold them) in `directory`:
    row(i) reads one back; in memory only the offsets, token lengths and digests."""

    def __init__(self, directory: str):
        import tempfile

        fd, self.path = tempfile.mkstemp(dir=directory, prefix="kept.", suffix=".jsonl")
        self.file = os.fdopen(fd, "w+b", buffering=1 << 20)
        self.offsets, self.lengths, self.digests = array("q", [0]), array("l"), []

    def add(self, line: bytes, key: bytes, length: int) -> None:
        self.file.write(line)
        self.offsets.append(self.offsets[-1] + len(line))
        self.lengths.append(length)
        self.digests.append(key)

    def __len__(self) -> int:
        return len(self.lengths)

    def row(self, i: int) -> bytes:
        """Row i as one line of JSON (newline included)."""
        if self.file.writable():
            self.file.flush()
        return os.pread(self.file.fileno(), self.offsets[i + 1] - self.offsets[i], self.offsets[i])

    def close(self) -> None:
        self.file.close()
        os.unlink(self.path)


@dataclass
class Part:
    """The rows of one part (training, or the held-out split) after cleaning."""

    where: str
    input_rows: int
    kept: Kept  # the rows kept and their token lengths
    keys: set  # the digests of the kept rows
    counts: Counter
    long: int  # rows over max_seq_length (dropped or truncated)


# every column a format reads or writes (hpc_finetune.data.source.NORMALISE)
FORMAT_COLUMNS = frozenset({"messages", "conversations", "prompt", "completion", "text", "instruction", "input",
                            "output", "system"})


def other_columns(row, text_field: str) -> dict:
    """A test row's columns that no format reads (a category, a source, a group: what evaluate.group_field names),
    with a scalar value; the format's columns, and any that a format reads, are never carried over."""
    if not isinstance(row, dict):
        return {}
    return {k: v for k, v in row.items() if k not in FORMAT_COLUMNS and k != text_field
            and isinstance(v, str | int | float | bool)}


def clean(rows: Iterable[dict], where: str, fmt: str, text_field: str, tokenizer, model: str, limits: Limits,
          spill: str, exclude: set = frozenset(), keep_columns: bool = False) -> Part:
    """Normalise, strip a leading BOS from text rows, drop empty and duplicate rows (and those in `exclude`: the
    digests of the training rows, for the held-out split), measure the tokens and apply dataset.long_rows. The kept
    rows go to a file in the directory `spill`. `keep_columns` (the test set): each row's other columns
    (other_columns) are carried over into its normalised row; its digest leaves them out."""
    from hpc_finetune.data.tokens import Measure

    raw: list = [None]  # the row being normalised

    def tap(source: Iterable[dict]) -> Iterator[dict]:
        for row in source:
            raw[0] = row
            yield row

    bos = tokenizer.bos_token
    counts: Counter = Counter()
    kept, seen = Kept(spill), set()
    long, first_long, dropped_keys = 0, [], []
    pending: list[tuple[int, bytes, bytes]] = []
    measure = Measure(tokenizer, fmt, model)  # a batch is measured while the next one is read

    def settle(done) -> None:
        nonlocal long
        if done is None:
            return
        batch, lengths = done
        for (number, line, key), n in zip(batch, lengths, strict=True):
            if n > limits.max_seq_length:
                long += 1
                if len(first_long) < 5:
                    first_long.append((number, n))
                if limits.long_rows == "drop":
                    dropped_keys.append(key)
                    continue
            kept.add(line, key, n)

    try:
        number, rows_out = 0, []
        try:
            source = tap(rows) if keep_columns else rows
            for number, out in enumerate(normalised(source, fmt, text_field, where), start=1):
                if fmt == "text" and bos and out["text"].startswith(bos):
                    out["text"] = out["text"][len(bos) :]
                    counts["bos_stripped"] += 1
                line = (json.dumps(out, ensure_ascii=False) + "\n").encode()
                key = digest(line)
                if keep_columns and (extra := other_columns(raw[0], text_field)):
                    line = (json.dumps(out | extra, ensure_ascii=False) + "\n").encode()
                reason = "empty" if is_empty(out) else "duplicate" if key in seen else "in_train" if key in exclude else None
                if reason:
                    counts[reason] += 1
                    continue
                seen.add(key)
                pending.append((number, line, key))
                rows_out.append(out)
                if len(pending) >= BATCH:
                    settle(measure.submit(pending, rows_out))
                    pending, rows_out = [], []
            settle(measure.submit(pending, rows_out))
            settle(measure.finish())
        except BaseException as err:
            measure.close(err)
            raise
        measure.close()
        if long and limits.long_rows == "error":
            first = ", ".join(f"row {row} ({n} tokens)" for row, n in first_long)
            raise StageError(
                f"{where}: {plural(long, 'row')} longer than max_seq_length={limits.max_seq_length} tokens: "
                f"{first}{', ...' * (long > 5)}. Raise training.max_seq_length or set dataset.long_rows to "
                "drop or truncate"
            )
        if limits.long_rows == "drop":
            counts["too_long"] = long
        seen.difference_update(dropped_keys)
        part = Part(where, number, kept, seen, counts, long)
        check_dropped(part, fmt, text_field, limits)
    except BaseException:
        kept.close()
        raise
    return part


def check_dropped(part: Part, fmt: str, text_field: str, limits: Limits) -> None:
    dropped = {reason: part.counts[reason] for reason in (*DROP_REASONS, "in_train") if part.counts[reason]}
    if len(part.kept) and sum(dropped.values()) <= limits.max_dropped_fraction * part.input_rows:
        return
    hints = {
        "empty": f"check dataset.format (resolved: {fmt}) and dataset.text_field ({text_field})",
        "duplicate": "the dataset repeats rows: deduplicate it or raise dataset.max_dropped_fraction",
        "too_long": f"raise training.max_seq_length ({limits.max_seq_length}) or set long_rows truncate",
        "in_train": "the rows repeat rows the model trains on (or, for a test set, its held-out rows); for a "
                    "held-out split, set dataset.eval_split none to hold out dataset.eval_fraction of the training "
                    "rows instead",
    }
    why = "no rows left" if not len(part.kept) else f"more than dataset.max_dropped_fraction={limits.max_dropped_fraction}"
    raise StageError(
        f"{part.where}: {sum(dropped.values())} of {plural(part.input_rows, 'row')} dropped "
        f"({', '.join(f'{n} {reason}' for reason, n in dropped.items()) or 'none'}), {why}. Likely fix: "
        + ("; ".join(hints[reason] for reason in dropped) or "check dataset.path")
    )


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
