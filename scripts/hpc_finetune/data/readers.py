"""Readers of a dataset's rows, each read again on every pass and batch by batch (Rows), so that a dataset of any
size is never held in memory: local json/jsonl/csv/parquet/arrow files (read_file), `save_to_disk` directories and
directories or hub names laid out as dataset repositories ({split: loader}, read_splits). Used by the data source
(hpc_finetune.data.source) and the test set (hpc_finetune.data.testset). No heavy imports at module level.
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from hpc_finetune.io.cli import StageError
from hpc_finetune.io.files import iter_jsonl

FILE_TYPES = (".json", ".jsonl", ".csv", ".parquet", ".arrow")


BATCH = 1024  # rows read from an Arrow-backed source at a time


class Rows:
    """The rows of a file or split, read again on every pass, batch by batch, so that a dataset of any size is never
    held in memory. len() and columns() cost one pass, made once (an Arrow-backed source knows both without one)."""

    def __init__(self, read: Callable[[], Iterable[dict]], count: int | None = None, names: list[str] | None = None):
        self._read, self._count, self._names = read, count, names

    def __iter__(self) -> Iterator[dict]:
        return iter(self._read())

    def __bool__(self) -> bool:
        return self._count > 0 if self._count is not None else next(iter(self), None) is not None

    def __getitem__(self, index: slice) -> list[dict]:
        """The rows of a slice with bounds from the start (rows[:1]), read up to its end."""
        if not isinstance(index, slice) or min(index.start or 0, index.stop or 0) < 0 or index.step not in (None, 1):
            raise TypeError("Rows take slices with non-negative bounds only, e.g. rows[:1]")
        return list(itertools.islice(self, index.start, index.stop))

    def __len__(self) -> int:
        if self._count is None:
            self.columns()
        return self._count

    def columns(self) -> list[str]:
        if self._names is None:
            names, count = {}, 0
            for row in self:
                names.update(dict.fromkeys(row))
                count += 1
            self._names, self._count = list(names), count
        return self._names


def dataset_rows(ds) -> Rows:
    """The rows of a datasets.Dataset (memory-mapped Arrow), read BATCH rows at a time."""
    def read() -> Iterator[dict]:
        for start in range(0, len(ds), BATCH):
            batch = ds[start : start + BATCH]
            yield from (dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True))

    return Rows(read, len(ds), list(ds.column_names))


def jsonl_rows(path: Path) -> Rows:
    return Rows(lambda: iter_jsonl(path))


def read_json_rows(path: Path) -> list[dict] | Rows:
    """A JSON array of objects (read whole: JSON has no way to read an array in parts), or JSON lines in a .json
    file (read as they are used)."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        while (char := fh.read(1)) and char.isspace():
            pass
    if char != "[":
        return jsonl_rows(path)
    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise StageError(
            f"{path} line {err.lineno}: not valid JSON ({err.msg} at column {err.colno})"
        ) from None
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise StageError(f"{path} item {number}: expected a JSON object, got {type(row).__name__}")
    return rows


def read_csv(path: Path) -> Rows:
    return Rows(lambda: iter_csv(path))


def iter_csv(path: Path) -> Iterator[dict]:
    csv.field_size_limit(2**31 - 1)
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh, strict=True)
        try:
            header = next(reader, [])
            for values in filter(None, reader):  # blank lines are skipped
                if len(values) != len(header):
                    raise StageError(
                        f"{path} line {reader.line_num}: {len(values)} fields, the header {len(header)}"
                    )
                yield dict(zip(header, values, strict=True))
        except csv.Error as err:
            raise StageError(f"{path} line {reader.line_num}: not valid CSV ({err})") from None


def read_arrow(path: Path) -> Rows:
    """Parquet, or an Arrow IPC file (the stream format datasets writes, or the file format), memory-mapped and
    read BATCH rows at a time."""
    import pyarrow as pa

    def batches():
        import pyarrow.parquet as pq

        try:
            if path.suffix.lower() == ".parquet":
                yield from pq.ParquetFile(path).iter_batches(batch_size=BATCH)
                return
            with pa.memory_map(str(path)) as source:
                try:
                    reader = pa.ipc.open_stream(source)
                except pa.ArrowInvalid:
                    source.seek(0)
                    opened = pa.ipc.open_file(source)
                    reader = (opened.get_batch(i) for i in range(opened.num_record_batches))
                yield from reader
        except (pa.ArrowException, OSError) as err:
            raise StageError(f"{path}: cannot read it as {path.suffix[1:]}: {err}") from None

    def read() -> Iterator[dict]:
        for batch in batches():
            yield from batch.to_pylist()

    first = next(batches(), None)  # a file that is no Arrow or Parquet fails here, as it is read
    if first is None:
        return Rows(read, 0, [])
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return Rows(read, pq.ParquetFile(path).metadata.num_rows, first.schema.names)
    return Rows(read, sum(batch.num_rows for batch in batches()), first.schema.names)


def read_saved(path: Path) -> dict:
    """A directory written by datasets' save_to_disk: {split: loader} of a DatasetDict, {None: loader} of a Dataset."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise StageError(f"dataset {path}: looks saved with datasets' save_to_disk but cannot be read ({err})") from None
    if isinstance(ds, datasets.DatasetDict):
        return {name: (lambda name=name: dataset_rows(ds[name])) for name in ds}
    return {None: lambda: dataset_rows(ds)}


def read_repository(name: str, config_name: str | None, cache_dir: str | None = None) -> dict:
    """A dataset repository: a hub name, or a local directory laid out like one (data files named by split, as
    `git clone` of a hub dataset gives), read through datasets.load_dataset. {split: loader}. Its Arrow form goes
    to `cache_dir` (the data stage's scratch, removed when it ends), else to datasets' cache in HF_HOME."""
    import datasets

    where = f"dataset {name!r} (config {config_name})"
    try:
        builder = datasets.load_dataset_builder(name, config_name, cache_dir=cache_dir)
        names = list(builder.info.splits or {}) or list(getattr(builder.config, "data_files", None) or {})
    except Exception as err:  # offline, unknown name, missing config: all need the same advice
        if Path(name).is_dir():
            raise StageError(
                f"dataset {name}: a directory, but neither saved with datasets' save_to_disk nor holding data files "
                f"that datasets.load_dataset reads ({type(err).__name__}: {err})"
            ) from None
        raise StageError(
            f"cannot load the hub {where}: {type(err).__name__}: {err}. Without internet (or with "
            "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set) set dataset.path to a local file, or pre-download it on a node "
            f"with internet: datasets.load_dataset({name!r}, {config_name!r}).save_to_disk(DIR), then set "
            "dataset.path to DIR"
        ) from None

    def load(split: str) -> Rows:
        try:
            return dataset_rows(datasets.load_dataset(name, config_name, split=split, cache_dir=cache_dir))
        except Exception as err:  # noqa: BLE001 - the download or the parse of one split
            raise StageError(f"cannot load split {split!r} of the {where}: {type(err).__name__}: {err}") from None

    return {split: (lambda split=split: load(split)) for split in names}


def read_file(path: Path) -> list[dict] | Rows:
    """The rows of a local file of one of FILE_TYPES (the caller checks the suffix)."""
    readers = {".json": read_json_rows, ".jsonl": jsonl_rows, ".csv": read_csv}
    return readers.get(path.suffix.lower(), read_arrow)(path)  # .parquet, .arrow


def read_splits(path: Path, config_name: str | None, cache_dir: str | None = None) -> dict:
    """{split: loader} of a local directory: saved with save_to_disk, else laid out as a dataset repository."""
    saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    return read_saved(path) if saved else read_repository(str(path), config_name, cache_dir)
