"""The workflow's config schema (workflow/schemas/config.schema.yaml) as the one place of every default: a stage
program's dataclass takes the default and the help text of a setting from it, so that a stage run by hand behaves
as the workflow's defaults say, and a default is never written twice.

    learning_rate: float = option("training.learning_rate")
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).resolve().parents[3] / "workflow" / "schemas" / "config.schema.yaml"


@functools.cache
def schema() -> dict:
    import yaml

    with open(SCHEMA_PATH) as fh:  # libyaml's loader: ten times faster, and this is on every Snakemake start
        return yaml.load(fh, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def entry(key: str) -> dict:
    """The schema of a dotted key (`training.learning_rate`); KeyError naming it when the schema has none."""
    node = schema()
    for part in key.split("."):
        try:
            node = node["properties"][part]
        except KeyError:
            raise KeyError(f"{key}: not a key of {SCHEMA_PATH}") from None
    return node


def default(key: str) -> Any:
    return copy.deepcopy(entry(key)["default"])


def option(key: str, **metadata: Any) -> Any:
    """A dataclass field whose default and help text are the schema's for `key`."""
    spec = entry(key)
    help_text = " ".join(str(spec.get("description", "")).split())
    value = spec["default"]
    if isinstance(value, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(value),
                                 metadata={"help": help_text, "key": key, **metadata})
    return dataclasses.field(default=value, metadata={"help": help_text, "key": key, **metadata})
