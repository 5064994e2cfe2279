"""A model directory's weight files, and safetensors read and written without loading whole files: which files a
loader reads (the safetensors index's shards or model.safetensors, else the .bin equivalents), their headers
(names, dtypes, shapes, offsets), one tensor at a time, and a file written tensor by tensor. Used by the model
stage (parameter count, completeness), the hub cache (what to fetch) and the streaming merge.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpc_finetune.io.cli import StageError, plural
from hpc_finetune.io.files import read_json

WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)
# safetensors dtype names <-> torch dtype names
ST_TO_TORCH = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
TORCH_TO_ST = {v: k for k, v in ST_TO_TORCH.items()}
FLOAT_NAMES = ("F64", "F32", "F16", "BF16")


def pick_weights(names: set[str], read_index: Callable[[str], dict]) -> tuple[str | None, list[str]]:
    """The weight files a loader reads, chosen by name: the safetensors index's shards or model.safetensors,
    else the .bin equivalents. Returns (index file or None, weight files); no weights gives (None, [])."""
    for index, single in WEIGHT_LAYOUTS:
        if index in names:
            return index, sorted(set(read_index(index)["weight_map"].values()))
        if single in names:
            return None, [single]
    return None, []


def weight_files(directory: str | os.PathLike, need_safetensors: bool = False) -> list[Path]:
    """The weight files a loader would read in `directory`, every one present; a StageError naming the directory
    when there are none (or, with need_safetensors, only PyTorch pickles) or the index lists missing shards."""
    directory = Path(directory)
    names = {p.name for p in directory.iterdir() if p.is_file()}
    index, files = pick_weights(names, lambda name: read_json(directory / name, "weight index"))
    if not files:
        raise StageError(
            f"model {directory}: no weights found (model.safetensors, a safetensors index, or pytorch_model.bin); "
            "point model.path at the directory that holds config.json and the weights"
        )
    missing = [f for f in files if not (directory / f).is_file()]
    if missing:
        raise StageError(
            f"model {directory}: {index} lists shards that are missing: {', '.join(missing[:5])}; "
            "the download is incomplete: fetch the model again"
        )
    if need_safetensors and not files[0].endswith(".safetensors"):
        raise StageError(f"{directory} has no safetensors weights: the streaming merge needs them "
                         "(use merge.streaming: false)")
    return [directory / f for f in files]


def weights_bytes(directory: str | os.PathLike) -> int:
    """Total size of the weight files a loader reads."""
    return sum(path.stat().st_size for path in weight_files(directory))


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """A safetensors header (name -> dtype, shape, data_offsets; without __metadata__) and where the data starts."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        try:
            (size,) = struct.unpack("<Q", raw)
            header = json.loads(fh.read(size))
            if not isinstance(header, dict):
                raise ValueError(header)
        except (struct.error, ValueError, UnicodeDecodeError, MemoryError, OverflowError):
            raise StageError(f"model weights {path}: not a valid safetensors file: its header is unreadable (the "
                             f"file is cut off or corrupt, {os.path.getsize(path):,} bytes)") from None
    header.pop("__metadata__", None)
    return header, 8 + size


# Bytes per element of the safetensors dtypes (a tensor's data must be exactly numel x this).
ST_SIZES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
            "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}


def check_safetensors(path: str | os.PathLike) -> int:
    """What the safetensors loader checks before reading, from the header alone (no tensor is read): the header
    parses, the tensors' data lie back to back, each of the size its shape and dtype give, and the last one ends
    exactly at the end of the file. A StageError says what is wrong (cut off: how many bytes are missing);
    returns the parameter count."""
    header, start = read_header(path)
    actual = os.path.getsize(path)
    try:
        spans = sorted((*map(int, info["data_offsets"]), name, info) for name, info in header.items())
        end = 0
        for begin, stop, name, info in spans:
            size = ST_SIZES.get(info["dtype"])
            if begin != end or stop < begin or (size is not None and stop - begin != math.prod(info["shape"]) * size):
                raise StageError(f"model weights {path}: the header is inconsistent at tensor {name} (its data "
                                 f"{begin}-{stop} does not follow the previous tensor's end {end} or does not match its "
                                 "shape): the file is corrupt")
            end = stop
    except (KeyError, TypeError, ValueError):
        raise StageError(f"model weights {path}: the header lists tensors without dtype, shape or data_offsets: the "
                         "file is corrupt") from None
    expected = start + end
    if actual < expected:
        raise StageError(f"model weights {path}: cut off: the file has {actual:,} bytes but its header places tensor "
                         f"data up to byte {expected:,} ({plural(expected - actual, 'byte')} missing)")
    if actual > expected:
        raise StageError(f"model weights {path}: {plural(actual - expected, 'byte')} follow the end of the last tensor (the "
                         f"header accounts for {expected:,} of its {actual:,} bytes): the file is corrupt")
    return sum(math.prod(info["shape"]) for info in header.values())


def check_pickle(path: str | os.PathLike) -> None:
    """A PyTorch .bin is a zip archive (torch.save since 1.6; its directory is at the very end, so a cut-off file
    has none) or, from older versions, a pickle; anything else is damaged. Nothing is unpickled."""
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if zipfile.is_zipfile(path) or magic[:1] == b"\x80":
        return
    raise StageError(f"model weights {path}: not a complete PyTorch weight file ("
                     + ("a zip archive without its directory at the end: cut off" if magic == b"PK" else
                        "neither a zip archive nor a pickle: corrupt") + f", {os.path.getsize(path):,} bytes)")


def element_size(st_dtype: str) -> int:
    import torch

    return torch.empty(0, dtype=getattr(torch, ST_TO_TORCH[st_dtype])).element_size()


def read_tensor(fh, info: dict, data_start: int):
    """One tensor of an open safetensors file, read with a plain read (no mmap, whose pages count as resident)."""
    import torch

    begin, end = info["data_offsets"]
    buf = bytearray(end - begin)
    fh.seek(data_start + begin)
    if fh.readinto(buf) != len(buf):
        raise StageError(f"{fh.name} is truncated")
    dtype = getattr(torch, ST_TO_TORCH[info["dtype"]])
    if not buf:
        return torch.empty(info["shape"], dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])


def write_safetensors(path: Path, entries: list[tuple[str, str, list[int]]], produce: Callable[[str], Any]) -> None:
    """Write a safetensors file whose tensors (name, dtype, shape) are produced one at a time by produce(name):
    the header is known from the shapes, so nothing but the current tensor is ever in memory."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, st_dtype, shape in entries:
        nbytes = math.prod(shape) * element_size(st_dtype)
        header[name] = {"dtype": st_dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name, st_dtype, shape in entries:
            tensor = produce(name)
            if list(tensor.shape) != list(shape) or TORCH_TO_ST[str(tensor.dtype).removeprefix("torch.")] != st_dtype:
                raise RuntimeError(f"{name}: produced {tensor.dtype} {list(tensor.shape)}, planned {st_dtype} {shape}")
            if tensor.numel():
                import torch

                fh.write(memoryview(tensor.contiguous().view(torch.uint8).numpy()))
