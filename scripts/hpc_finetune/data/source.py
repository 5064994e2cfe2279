"""Where a dataset comes from and what its rows become, for the data stage and the demo model's tokenizer (which
must read every dataset the data stage reads): local json/jsonl/csv/parquet/arrow files, `save_to_disk`
directories, and dataset repositories (a hub name, or a directory laid out like one: data files named by split),
with the held-out split the dataset already has; and each row normalised to one of

    {"messages": [{"role", "content"}, ...]}   {"prompt", "completion"}   {"text"}

ShareGPT `conversations` and alpaca rows become messages. Errors name the file, the line or row, and the key to
change. No heavy imports at module level.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from hpc_finetune.data.readers import FILE_TYPES, Rows, read_file, read_repository, read_splits
from hpc_finetune.io.cli import StageError

FORMATS = ("auto", "messages", "prompt_completion", "alpaca", "text")
ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant", **ROLES}
# dataset.eval_split auto takes the first of these that the dataset has (other than the training split)
HELD_OUT_SPLITS = ("validation", "valid", "eval", "dev", "test")


class RowError(ValueError):
    """A row that does not fit the format; the caller adds the source and the row number."""


@dataclass
class Source:
    """The rows of a dataset: those to train on and, when the dataset has a held-out split, its rows."""

    rows: list[dict]
    eval_rows: list[dict] | None  # None: no held-out split; the data stage carves one (dataset.eval_fraction)
    split: str | None  # the split read for training; None for a single file
    eval_split: str | None
    splits: list[str]  # every split the dataset has ([] for a single file)
    test_rows: list[dict] | None = None  # the dataset's test split (dataset.test_split), scored by evaluate only
    test_split: str | None = None


# --- reading ------------------------------------------------------------------------------------------------


def read_source(path: str, split: str = "train", eval_split: str = "auto", config_name: str | None = None,
                test_split: str = "none", cache_dir: str | None = None) -> Source:
    """The rows of `path`: a local file (no splits), a save_to_disk directory, a directory laid out as a dataset
    repository, or a hub dataset name. eval_split: auto (the dataset's own held-out split when it has one, see
    HELD_OUT_SPLITS), none (never), or a split name (which must exist). test_split: auto (a split named `test`
    that is neither the training nor the held-out split), none, or a split name (which must exist). cache_dir: where a
    dataset repository's Arrow form goes (read_repository)."""
    local = Path(path).expanduser()
    suffix = local.suffix.lower()
    if local.is_file():
        if suffix not in FILE_TYPES:
            raise StageError(
                f"dataset {local}: unsupported file type {suffix or '(none)'!r}; use a "
                f"{'/'.join(FILE_TYPES)} file, a save_to_disk directory or a hub dataset name org/name"
            )
        if eval_split not in ("auto", "none"):
            raise StageError(f"dataset.eval_split {eval_split!r}: dataset {local} is a single file without splits; "
                             "set dataset.eval_split to auto or none (dataset.eval_fraction then holds rows out)")
        no_splits(local, "test_split", test_split)
        return Source(read_file(local), None, None, None, [])
    if local.is_dir():
        splits = read_splits(local, config_name, cache_dir)
    elif suffix in FILE_TYPES or not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        raise StageError(f"dataset {path} not found; set dataset.path to a file, a directory or a hub name org/name")
    else:
        splits = read_repository(path, config_name, cache_dir)
    return pick_splits(path, splits, split, eval_split, test_split)


def no_splits(path, key: str, value: str) -> None:
    if value not in ("auto", "none"):
        raise StageError(f"dataset.{key} {value!r}: dataset {path} has no splits; set dataset.{key} to auto or none")


def pick_splits(path: str, splits: dict, split: str, eval_split: str, test_split: str = "none") -> Source:
    """The training split, the held-out one and the test one from {split name: loader} (None as the only key: no
    splits)."""
    names = [name for name in splits if name is not None]
    if not names:
        no_splits(path, "eval_split", eval_split)
        no_splits(path, "test_split", test_split)
        return Source(splits[None](), None, None, None, [])
    if split not in names:
        raise StageError(f"dataset {path}: no split {split!r} (it has {', '.join(names)}); set dataset.split")
    if eval_split == "auto":
        held_out = next((name for name in HELD_OUT_SPLITS if name in names and name not in (split, test_split)), None)
    elif eval_split == "none":
        held_out = None
    elif eval_split == split:
        raise StageError(f"dataset.eval_split {eval_split!r} is the training split (dataset.split); choose another, or "
                         "auto or none")
    elif eval_split not in names:
        raise StageError(f"dataset {path}: no split {eval_split!r} (it has {', '.join(names)}); set "
                         "dataset.eval_split to one of them, or to auto or none")
    else:
        held_out = eval_split
    test = pick_test_split(path, names, test_split, split, held_out)
    return Source(splits[split](), splits[held_out]() if held_out else None, split, held_out, names,
                  splits[test]() if test else None, test)


def pick_test_split(path: str, names: list[str], test_split: str, split: str, held_out: str | None) -> str | None:
    """auto: `test` when the dataset has it and it is not already the training or the held-out split (a dataset
    with only train and test keeps test as its held-out split; dataset.eval_split none makes it the test set)."""
    if test_split == "none":
        return None
    if test_split == "auto":
        return "test" if "test" in names and "test" not in (split, held_out) else None
    if test_split not in names:
        raise StageError(f"dataset {path}: no split {test_split!r} (it has {', '.join(names)}); set dataset.test_split "
                         "to one of them, or to auto or none")
    if test_split in (split, held_out):
        raise StageError(f"dataset.test_split {test_split!r} is also the {'training' if test_split == split else 'held-out'}"
                         " split (dataset.split / dataset.eval_split); choose another split, or none")
    return test_split


# --- formats ------------------------------------------------------------------------------------------------


def string(value, name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(f"{name} is {type(value).__name__}, expected a string")
    return value


def to_messages(row: dict, _field: str) -> dict:
    key = "messages" if "messages" in row else "conversations"
    turns = row.get(key) or []
    if not isinstance(turns, list):
        raise RowError(f"{key} is {type(turns).__name__}, expected a list of messages")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowError(f"{key}[{i}] is {type(turn).__name__}, expected an object with role and content")
        role_key, content_key, roles = (
            ("role", "content", ROLES) if "role" in turn else ("from", "value", SHAREGPT_ROLES)
        )
        role = turn.get(role_key)
        if not isinstance(role, str) or role not in roles:
            raise RowError(f"{key}[{i}].{role_key} {role!r} is not one of {', '.join(roles)}")
        messages.append(
            {"role": roles[role], "content": string(turn.get(content_key), f"{key}[{i}].{content_key}")}
        )
    return {"messages": messages}


def to_alpaca(row: dict, _field: str) -> dict:
    instruction, extra, output, system = (
        string(row.get(k), k) for k in ("instruction", "input", "output", "system")
    )
    if not instruction.strip():
        return {"messages": []}  # empty
    user = instruction + ("\n\n" + extra if extra.strip() else "")
    messages = [{"role": "system", "content": system}] if system.strip() else []
    return {
        "messages": messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    }


def to_prompt_completion(row: dict, _field: str) -> dict:
    return {
        "prompt": string(row.get("prompt"), "prompt"),
        "completion": string(row.get("completion"), "completion"),
    }


def to_text(row: dict, text_field: str) -> dict:
    return {"text": string(row.get(text_field), text_field)}


NORMALISE = {
    "messages": to_messages,
    "prompt_completion": to_prompt_completion,
    "alpaca": to_alpaca,
    "text": to_text,
}


def is_empty(row: dict) -> bool:
    if "messages" in row:
        return not any(m["role"] == "assistant" and m["content"].strip() for m in row["messages"])
    return not all(value.strip() for value in row.values())


def resolve_format(columns: list[str], fmt: str, text_field: str, path: str) -> tuple[str, str]:
    """The format and text field: forced by `fmt`, or detected from the columns in FORMATS order."""
    needs = {
        "messages": (
            "messages (or ShareGPT conversations)",
            "messages" in columns or "conversations" in columns,
        ),
        "prompt_completion": ("prompt and completion", {"prompt", "completion"} <= set(columns)),
        "alpaca": ("instruction and output", {"instruction", "output"} <= set(columns)),
        "text": (f"{text_field!r} (dataset.text_field)", text_field in columns),
    }
    if fmt not in FORMATS:
        raise StageError(f"dataset.format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt != "auto":
        if needs[fmt][1]:
            return fmt, text_field
        problem = f"format {fmt} needs the column(s) {needs[fmt][0]}"
    else:
        detected = next((name for name, (_, found) in needs.items() if found), None)
        if detected:
            return detected, text_field
        if "prompt" in columns:
            return "text", "prompt"
        problem = "cannot detect the format: expected " + "; ".join(
            f"{n}: {w}" for n, (w, _) in needs.items()
        )
        problem += "; or a lone pre-templated prompt column"
    raise StageError(
        f"dataset {path}: {problem}, but its columns are {', '.join(columns)}. "
        "Set dataset.format and dataset.text_field to match the data"
    )




def columns(rows: Iterable[dict]) -> list[str]:
    """Every column name of the rows, in first-seen order."""
    if isinstance(rows, Rows):
        return rows.columns()
    return list(dict.fromkeys(key for row in rows for key in row))


def normalise(rows: Iterable[dict], fmt: str, text_field: str, where: str) -> list[dict]:
    """Every row in the resolved format's shape; a row that does not fit is a StageError naming `where` and the row
    number (1-based)."""
    return list(normalised(rows, fmt, text_field, where))


def normalised(rows: Iterable[dict], fmt: str, text_field: str, where: str) -> Iterator[dict]:
    """normalise(), one row at a time."""
    convert = NORMALISE[fmt]
    for number, row in enumerate(rows, start=1):
        try:
            yield convert(row, text_field)
        except RowError as err:
            raise StageError(f"{where} row {number}: {err} (format {fmt})") from None


def texts(row: dict) -> list[str]:
    """The strings of a normalised row: roles and contents of messages, or its text fields."""
    if "messages" in row:
        return [part for message in row["messages"] for part in (message["role"], message["content"])]
    return [value for value in row.values() if value]


def dataset_texts(path: str, fmt: str = "auto", text_field: str = "text", split: str = "train",
                  eval_split: str = "auto", config_name: str | None = None) -> list[str]:
    """Every string of a dataset's rows (training and held-out split), read and normalised as the data stage
    reads them (the demo model's tokenizer is trained on them): every dataset the data stage accepts gives
    texts, and a bad one fails with its message."""
    source = read_source(path, split, eval_split, config_name)
    where = f"dataset {path}" + (f" split {source.split}" if source.split else "")
    if not source.rows:
        raise StageError(f"{where} has no rows")
    fmt, text_field = resolve_format(columns(source.rows), fmt, text_field, path)
    rows = normalise(source.rows, fmt, text_field, where)
    if source.eval_rows:
        rows += normalise(source.eval_rows, fmt, text_field, f"dataset {path} split {source.eval_split}")
    found = [text for row in rows for text in texts(row)]
    if not found:
        raise StageError(f"{where}: no text in its rows (format {fmt}); check dataset.format and dataset.text_field")
    return found
