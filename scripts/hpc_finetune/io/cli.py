"""What every stage program shares: a dataclass config parsed from `--name value` arguments, logging, and errors a
person can act on (StageError, printed without a traceback), and the two-column tables that end each log. No
heavy imports here: every stage pays for what it imports.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger("finetune")
T = TypeVar("T")


class StageError(Exception):
    """A failure the user can fix (bad input, missing file, wrong setting). Printed without a traceback."""


# --- arguments ------------------------------------------------------------------------------------------------


def _convert(text: str, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    if optional and text.lower() in ("null", "none", ""):
        return None
    if origin in (typing.Union, types.UnionType):
        if text.startswith(("[", "{")):
            return json.loads(text)
        return _convert(text, args[0]) if len(args) == 1 else text
    if hint is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    if origin in (list, dict) or hint in (list, dict):
        if text.startswith(("[", "{")):
            return json.loads(text)
        return [part for part in text.split(",") if part]
    if hint in (int, float, str):
        return hint(text)
    return text


def parse_args(cls: type[T], argv: list[str] | None = None, description: str | None = None) -> T:
    """Parse `--field-name value` into the dataclass `cls`; fields without a default are required."""
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(cls):
        has_default = field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
        default = field.default if field.default is not dataclasses.MISSING else None
        if field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        hint = hints[field.name]
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            type=lambda text, hint=hint: _convert(text, hint),
            default=default,
            required=not has_default,
            help=field.metadata.get("help", "") + (f" (default: {default})" if has_default else ""),
        )
    return cls(**vars(parser.parse_args(argv)))


def cli(main: Callable[[T], Any], cls: type[T], doc: str | None = None) -> None:
    """Entry point of a stage: parse arguments, set up logging, run, and turn a StageError into a clear
    message and exit status 2 instead of a traceback."""
    setup_logging()
    cfg = parse_args(cls, description=doc)
    try:
        main(cfg)
    except StageError as err:
        log.error("%s", err)
        sys.exit(2)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "torch.distributed", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # On AVX512-BF16 CPUs bitsandbytes advises installing `kernels` for its packed 4-bit inference kernel, which
    # training never uses (scripts/quantized.py keeps the trainable layout): advice that misleads in a stage log.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def table(rows: list[tuple[str, Any]], title: str = "") -> str:
    """A two-column text table for the end of a log."""
    width = max((len(k) for k, _ in rows), default=0)
    lines = [title, "-" * max(len(title), width + 20)] if title else []
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def plural(count: int, noun: str, many: str | None = None) -> str:
    """'1 row', '2 rows', '1 process', '3 processes'; `many` for an irregular plural. Every message that puts a
    count before a noun uses it (no "1 rows")."""
    if count == 1:
        return f"{count} {noun}"
    return f"{count} {many or noun + ('es' if noun.endswith(('s', 'sh', 'ch', 'x')) else 's')}"
