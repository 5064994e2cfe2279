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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpc_finetune.io.cli import StageError
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
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError, MemoryError, OverflowError):
            raise StageError(f"model weights {path}: not a valid safetensors file (corrupt or truncated)") from None
    header.pop("__metadata__", None)
    return header, 8 + size


def header_parameters(path: str | os.PathLike) -> int:
    """Parameter count of a safetensors file from its header, without loading any tensor."""
    return sum(math.prod(info["shape"]) for info in read_header(path)[0].values())


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
