"""Make a checkpoint written by transformers 5 readable, with the same meaning, by transformers 4.56+ as well.

vLLM up to 0.25 loads configs and tokenizers with transformers 4 (0.26 moved to 5), and clusters keep such servers
for a long time. transformers 5 writes what 4 cannot read or silently misreads:

- `rope_parameters` replaces `rope_theta` and `rope_scaling`: transformers 4 ignores it and falls back to its
  defaults (theta 10,000, no scaling), so a Llama-3.1 model (theta 500,000, llama3 scaling) is served with the
  wrong positions and answers garbage without any error;
- `tokenizer_class: TokenizersBackend`, a class transformers 4 does not have: the tokenizer does not load;
- `dtype` instead of `torch_dtype` (4.56 reads both; older readers only the second).

The keys of both generations are written side by side; transformers 5 reads exactly what it read before (tested).

The train stage applies it to the adapter it saves, the merge stage to the merged model before its check.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hpc_finetune.io.cli import StageError
from hpc_finetune.io.files import write_json

log = logging.getLogger("finetune.portable")

# transformers 5 tokenizer class names and the transformers 4 class that loads the same tokenizer.json.
LEGACY_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}
# Keys that transformers 5 moved from the top level of a config into rope_parameters.
TOP_LEVEL_ROPE_KEYS = ("rope_theta", "partial_rotary_factor")


def legacy_config(config: dict, where: str = "config.json") -> list[str]:
    """Add the transformers-4 keys to `config` (and its nested sub-configs, e.g. text_config) in place; returns
    what was added, as 'where: key'."""
    added: list[str] = []
    if "dtype" in config and "torch_dtype" not in config:
        config["torch_dtype"] = config["dtype"]
        added.append(f"{where}: torch_dtype")
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_type" in rope:
        for key in TOP_LEVEL_ROPE_KEYS:
            if key in rope and key not in config:
                config[key] = rope[key]
                added.append(f"{where}: {key}")
        if rope["rope_type"] != "default" and config.get("rope_scaling") is None:
            config["rope_scaling"] = {k: v for k, v in rope.items() if k not in TOP_LEVEL_ROPE_KEYS}
            added.append(f"{where}: rope_scaling")
    elif isinstance(rope, dict) and rope:
        # One set of parameters per attention type (Gemma 3 and the like): transformers 4 has no equivalent key.
        log.warning("%s: rope_parameters per attention type (%s) have no transformers-4 form; left as they are",
                    where, ", ".join(rope))
    for key, value in config.items():
        if key.endswith("_config") and isinstance(value, dict):
            added += legacy_config(value, f"{where}:{key}")
    return added


def legacy_tokenizer_config(config: dict, where: str = "tokenizer_config.json") -> list[str]:
    name = config.get("tokenizer_class")
    if name in LEGACY_TOKENIZER_CLASSES:
        config["tokenizer_class"] = LEGACY_TOKENIZER_CLASSES[name]
        return [f"{where}: tokenizer_class {name} -> {config['tokenizer_class']}"]
    return []


def make_portable(directory: str | Path) -> list[str]:
    """Rewrite config.json and tokenizer_config.json in `directory` (where present) with the keys of both
    transformers generations; returns the changes (empty when there was nothing to add)."""
    directory = Path(directory)
    changes: list[str] = []
    for name, convert in (("config.json", legacy_config), ("tokenizer_config.json", legacy_tokenizer_config)):
        path = directory / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise StageError(f"{path} is not valid JSON ({err}); it cannot be made portable") from None
        made = convert(data, name)
        if made:
            write_json(path, data)
            changes += made
    for change in changes:
        log.info("for transformers-4 readers (vLLM <= 0.25): %s", change)
    return changes
