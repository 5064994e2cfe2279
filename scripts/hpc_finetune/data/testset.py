"""The test set: rows scored by the evaluate stage only, apart from the held-out rows the training watches.
`dataset.test_path` (a local file or directory in any form the data stage reads) or the dataset's own test split
(`dataset.test_split`). Checked row by row before anything is trained: every row must have the fields of the
training data's format, and the file must have rows. Used by the data stage and by the configuration check when
Snakemake starts. No heavy imports.
"""

from __future__ import annotations

from pathlib import Path

from hpc_finetune.data.readers import FILE_TYPES, read_file, read_splits
from hpc_finetune.io.cli import StageError

# The columns each format needs in every row (the same names resolve_format detects a format by).
NEEDS = {
    "messages": (("messages",), ("conversations",)),
    "prompt_completion": (("prompt", "completion"),),
    "alpaca": (("instruction", "output"),),
}


def read_test_path(path: str, config_name: str | None = None, cache_dir: str | None = None):
    """The rows of dataset.test_path: a file (all its rows), or a directory with splits (its `test` split, or its
    only one; a dataset repository's Arrow form in `cache_dir`)."""
    local = Path(path).expanduser()
    if not local.exists():
        raise StageError(f"dataset.test_path {path}: not found; set it to a local file or directory of test rows "
                         "(or leave it null to use the dataset's test split or the held-out rows)")
    if local.is_file():
        if local.suffix.lower() not in FILE_TYPES:
            raise StageError(f"dataset.test_path {local}: unsupported file type {local.suffix or '(none)'!r}; use a "
                             f"{'/'.join(FILE_TYPES)} file or a dataset directory")
        return read_file(local)
    splits = read_splits(local, config_name, cache_dir)
    names = [name for name in splits if name is not None]
    if not names:
        return splits[None]()
    if "test" not in names and len(names) > 1:
        raise StageError(f"dataset.test_path {local}: a dataset with the splits {', '.join(names)} but none named "
                         "test; point dataset.test_path at the file of the test rows")
    return splits["test" if "test" in names else names[0]]()


def require_fields(rows, fmt: str, text_field: str, where: str) -> None:
    """Every row has the columns the format needs, else a StageError naming `where` and the first bad row; no
    rows at all is an error too."""
    if not rows:
        raise StageError(f"{where}: the test set has no rows; add rows, or unset it (then the held-out rows are "
                         "scored)")
    needs = NEEDS.get(fmt, ((text_field,),))
    for number, row in enumerate(rows, start=1):
        if not any(all(key in row for key in option) for option in needs):
            wanted = " or ".join(" and ".join(option) for option in needs)
            raise StageError(f"{where} row {number}: the {fmt} format (the training data's) needs the field(s) "
                             f"{wanted}; this row has {', '.join(sorted(row)) or 'no fields'}")


def reference(row: dict) -> str | None:
    """The reference answer of a normalised row: the last assistant turn, the completion; None for text."""
    if "messages" in row:
        turns = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        return turns[-1] if turns else None
    return row.get("completion")
