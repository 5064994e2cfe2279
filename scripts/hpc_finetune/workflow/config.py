"""The workflow's configuration: schema defaults < hyperparameter preset < model preset < config.yaml and
--config, validated against workflow/schemas/config.schema.yaml with errors that name the key, suggest the
closest one and list the allowed values. Kept free of Snakemake imports, so that the tests exercise it directly.
"""

from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import yaml

from hpc_finetune.hub.request import MODEL_ID
from hpc_finetune.io.schema import SCHEMA_PATH, schema
from hpc_finetune.merge.adapter import VLLM_MAX_LORA_RANKS

PRESETS_DIR = SCHEMA_PATH.parent.parent / "presets"


class ConfigError(ValueError):
    """Invalid configuration; the message names the key and what is allowed."""


def load_yaml(path: Path) -> Any:
    with open(path) as fh:  # libyaml's loader: on every Snakemake start, a no-op re-run included
        return yaml.load(fh, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def load_schema() -> dict:
    """A copy of the schema (callers fill and change it)."""
    return copy.deepcopy(schema())


def load_presets(kind: str) -> dict[str, dict]:
    """kind: 'models' or 'hyperparameters'. Returns {name: {description, config}}."""
    return load_yaml(PRESETS_DIR / f"{kind}.yaml")


def deep_merge(base: dict, override: dict) -> dict:
    """A new dict: override's values win; nested dicts are merged, lists and scalars replaced."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def expand_dotted(cfg: dict) -> dict:
    """Turn a nested key written flat into nested dicts: `training__learning_rate=0.01` (the form Snakemake's
    --config accepts) or `training.learning_rate` (in a YAML file)."""
    out: dict = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            value = expand_dotted(value)
        parts = str(key).replace("__", ".").split(".")
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"config key {key}: {part} is a value, not a section")
            node = child
        last = parts[-1]
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            node[last] = deep_merge(node[last], value)
        else:
            node[last] = value
    return out


def _schema_at(schema: dict, path: list) -> dict:
    node = schema
    for part in path:
        node = node.get("properties", {}).get(part, {})
    return node


_KINDS = {"object": "its keys, indented below it", "array": "a list", "integer": "a whole number",
          "number": "a number", "boolean": "true or false", "string": "a value"}


def _describe(error: jsonschema.ValidationError, schema: dict) -> str:
    path = [str(p) for p in error.absolute_path]
    key = ".".join(path) or "(top level)"
    if error.instance in (None, "") and error.validator in ("type", "minLength", "pattern"):
        # `revision:` with nothing after it reads as null: say that, not "None is not of type 'string'"
        kind = error.schema.get("type")
        kind = next((t for t in kind if t != "null"), "") if isinstance(kind, list) else kind
        what = error.schema.get("format_hint") or _KINDS.get(kind, "a value")
        keep = ", or remove the key to use the default" if error.schema.get("default") not in (None, "", {}, []) else ""
        return f"config key {key} is empty; set it to {what}{keep}"
    if error.validator == "additionalProperties":
        known = sorted(_schema_at(schema, path).get("properties", {}))
        extra = sorted(set(error.instance) - set(known))
        hints = []
        for name in extra:
            close = difflib.get_close_matches(name, known, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        where = f"under {key}" if path else "at the top level"
        return f"config: unknown key {', '.join(hints)} {where}; allowed keys: {', '.join(known)}"
    if error.validator == "enum":
        allowed = ", ".join(str(v).lower() if isinstance(v, bool) else str(v) for v in error.validator_value)
        close = difflib.get_close_matches(str(error.instance), [str(v) for v in error.validator_value], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close and len(error.validator_value) > 8 else ""  # long lists
        return f"config key {key}: {error.instance!r} is not allowed{hint}; allowed values: {allowed}"
    if error.validator == "pattern" and "format_hint" in error.schema:
        return f"config key {key}: {error.instance!r} is not {error.schema['format_hint']}"
    if error.validator == "oneOf":
        options = []
        for sub in error.validator_value:
            options.append(", ".join(map(str, sub["enum"])) if "enum" in sub else f"a list of {sub['items']['type']}s")
        return f"config key {key}: {error.instance!r} is not allowed; use one of: {' | '.join(options)}"
    return f"config key {key}: {error.message}"


_SCALARS = {"integer": int, "number": (int, float), "boolean": bool, "null": type(None)}


def coerce_strings(node: Any, schema: dict) -> Any:
    """Snakemake hands nested --config values over as strings ('0.01', 'true'); turn them into the type the
    schema asks for, so that `--config training='{learning_rate: 0.01}'` works like config.yaml."""
    if isinstance(node, dict):
        props = schema.get("properties", {})
        return {k: coerce_strings(v, props.get(k, {})) for k, v in node.items()}
    types_ = schema.get("type", [])
    types_ = [types_] if isinstance(types_, str) else types_
    if isinstance(node, str) and "string" not in types_ and types_:
        parsed = yaml.safe_load(node) if node.strip() else node
        if any(isinstance(parsed, _SCALARS[t]) for t in types_ if t in _SCALARS):
            if not (isinstance(parsed, bool) and "boolean" not in types_):
                return parsed
    if isinstance(node, str) and "enum" in schema and node in ("true", "false"):
        return node == "true"
    return node


def _fill_defaults(node: dict, schema: dict) -> None:
    for name, sub in schema.get("properties", {}).items():
        if name not in node and "default" in sub:
            node[name] = copy.deepcopy(sub["default"])
        if isinstance(node.get(name), dict) and sub.get("type") == "object":
            _fill_defaults(node[name], sub)


def validate(cfg: dict, schema: dict | None = None) -> dict:
    """Validate against the schema and fill defaults in place. Raises ConfigError naming every bad key."""
    schema = schema or load_schema()
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        raise ConfigError("\n".join(_describe(e, schema) for e in errors))
    _fill_defaults(cfg, schema)
    return cfg


def _preset(kind: str, key: str, name: Any) -> dict:
    presets = load_presets(kind)
    if name not in presets:
        allowed = ", ".join(presets)
        raise ConfigError(f"config key {key}: {name!r} is not a known preset; allowed values: {allowed}")
    return presets[name].get("config") or {}


def check_hub_model(model: dict) -> None:
    """model.source hub: the id keys the cache (org/name), the URL is one git can clone and holds no secret."""
    if not model.get("model_id"):
        raise ConfigError("config key model.model_id: required when model.source is hub (e.g. meta-llama/Llama-3.1-8B)")
    if not MODEL_ID.fullmatch(model["model_id"]):
        raise ConfigError(
            f"config key model.model_id: {model['model_id']!r} is not a hub id org/name "
            "(e.g. meta-llama/Llama-3.1-8B-Instruct); use the full id shown on the model's hub page"
        )
    url = urlsplit(model["hub_url"])
    if url.scheme not in ("https", "http", "file"):
        raise ConfigError(f"config key model.hub_url: {model['hub_url']!r} is not an https://, http:// or file:// URL")
    if url.username or url.password:
        raise ConfigError(
            "config key model.hub_url: holds credentials; remove them and give the token through HF_TOKEN or "
            "model.token_file"
        )


def check_consistency(cfg: dict) -> None:
    """Rules that span several keys, which the schema cannot say clearly."""
    model = cfg["model"]
    if model["source"] == "local" and not model.get("path"):
        raise ConfigError("config key model.path: required when model.source is local (a directory with config.json)")
    if model["source"] == "hub":
        check_hub_model(model)
    train = cfg["training"]
    if train["lora_alpha"] <= 0 or train["lora_r"] <= 0:
        raise ConfigError("config keys training.lora_r and training.lora_alpha must be positive")
    hub, top = cfg["hub_upload"], VLLM_MAX_LORA_RANKS[-1]
    if hub["repo_id"] and "adapter" in hub["publish"] and train["lora_r"] > top:
        raise ConfigError(
            f"config key training.lora_r: {train['lora_r']} is above the largest LoRA rank vLLM serves ({top}), and"
            f" hub_upload.publish includes the adapter: lower training.lora_r, or publish [merged] only"
        )
    upload = cfg["upload"]
    if upload["bucket"] and "adapters" in upload["include"] and train["lora_r"] > top:
        raise ConfigError(
            f"config key training.lora_r: {train['lora_r']} is above the largest LoRA rank vLLM serves ({top}), and"
            f" upload.include sends the adapter: lower training.lora_r, or set upload.include: [merged]"
        )
    if cfg["dataset"]["eval_fraction"] == 0 and train["early_stopping_patience"]:
        raise ConfigError(
            "config key training.early_stopping_patience needs held-out data: set dataset.eval_fraction above 0"
        )
    hub = cfg["hub_upload"]
    if hub["repo_id"] and hub["publish"] == ["merged"] and not cfg["merge"]["merge_full_weights"]:
        raise ConfigError(
            "config key hub_upload.publish: [merged] with merge.merge_full_weights false publishes nothing; add "
            "adapter, or turn merging on"
        )


def check_test_set(cfg: dict) -> None:
    """dataset.test_path, when it is a local file, read now: it has rows, every row has the fields its format needs,
    and with evaluate.labels every reference answer is a label and every label occurs, with evaluate.group_field
    every row has a group (errors name the file and the row). A directory is checked by the data stage, before any model is loaded."""
    ds, ev = cfg["dataset"], cfg["evaluate"]
    include = ev["lm_eval_include_path"]
    if ev["lm_eval_tasks"] and include and not Path(include).expanduser().is_dir():
        raise ConfigError(f"config key evaluate.lm_eval_include_path: {include} is not a directory of lm-eval task YAMLs")
    path = ds["test_path"]
    if not path:
        return
    local = Path(path).expanduser()
    if not local.exists():
        raise ConfigError(f"config key dataset.test_path: {path} is not a local file or directory (a test set in a "
                          "bucket or on the hub: make it a split of dataset.path and use dataset.test_split)")
    if not local.is_file():
        return
    from hpc_finetune.data.source import columns, normalise, resolve_format
    from hpc_finetune.data.testset import read_test_path, reference, require_fields
    from hpc_finetune.evaluate.groups import group_values
    from hpc_finetune.evaluate.labels import check_references
    from hpc_finetune.io.cli import StageError

    where = f"test set {path} (dataset.test_path)"
    try:
        rows = read_test_path(path)
        if not rows:
            raise StageError(f"{where}: the test set has no rows; add rows, or unset dataset.test_path")
        fmt, text_field = resolve_format(columns(rows[:1]), ds["format"], ds["text_field"], path)
        require_fields(rows, fmt, text_field, where)
        if ev["labels"]:
            refs = [(n, reference(r)) for n, r in enumerate(normalise(rows, fmt, text_field, where), start=1)]
            check_references([(n, ref) for n, ref in refs if ref is not None], ev["labels"], where)
        if ev["group_field"]:
            group_values(rows, ev["group_field"], where)
    except StageError as err:
        raise ConfigError(str(err)) from None


def resolve_config(user_config: dict, checked: set[str] | None = None) -> dict:
    """schema defaults < hyperparameter preset < model preset < user config (config.yaml and --config).
    checked: the test sets (with their evaluate settings) already read by this process, which are not read again
    (an experiment resolves many runs that share one)."""
    schema = load_schema()
    user = expand_dotted(user_config or {})
    model_name = user.get("preset", schema["properties"]["preset"]["default"])
    hp_name = user.get("hyperparameters", schema["properties"]["hyperparameters"]["default"])
    resolved = deep_merge(
        deep_merge(_preset("hyperparameters", "hyperparameters", hp_name),
                   _preset("models", "preset", model_name)),
        user,
    )
    resolved = coerce_strings(resolved, schema)
    validate(resolved, schema)
    check_consistency(resolved)
    seen = json.dumps([resolved["dataset"], resolved["evaluate"]], sort_keys=True, default=str)
    if checked is None or seen not in checked:
        check_test_set(resolved)
        if checked is not None:
            checked.add(seen)
    return resolved
