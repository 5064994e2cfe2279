"""Helpers shared by the Snakefile and the rule files: config resolution and validation, output paths, and the
command-line arguments each stage script receives.

Kept free of Snakemake imports so that the tests can exercise config resolution directly.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import yaml

WORKFLOW_DIR = Path(__file__).resolve().parent
REPO_DIR = WORKFLOW_DIR.parent
SCHEMA_PATH = WORKFLOW_DIR / "schemas" / "config.schema.yaml"
PRESETS_DIR = WORKFLOW_DIR / "presets"


class ConfigError(ValueError):
    """Invalid configuration; the message names the key and what is allowed."""


# libyaml's loader (in PyYAML's wheels) reads the schema ten times faster than the pure-Python one: it is on
# every Snakemake start, a no-op re-run included.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(path: Path) -> Any:
    with open(path) as fh:
        return yaml.load(fh, Loader=_YAML_LOADER)


def load_schema() -> dict:
    return load_yaml(SCHEMA_PATH)


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


def _describe(error: jsonschema.ValidationError, schema: dict) -> str:
    path = [str(p) for p in error.absolute_path]
    key = ".".join(path) or "(top level)"
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


HUB_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def check_hub_model(model: dict) -> None:
    """model.source hub: the id keys the cache (org/name), the URL is one git can clone and holds no secret."""
    if not model.get("model_id"):
        raise ConfigError("config key model.model_id: required when model.source is hub (e.g. meta-llama/Llama-3.1-8B)")
    if not HUB_MODEL_ID.fullmatch(model["model_id"]):
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
    if cfg["dataset"]["eval_fraction"] == 0 and train["early_stopping_patience"]:
        raise ConfigError(
            "config key training.early_stopping_patience needs held-out data: set dataset.eval_fraction above 0"
        )


def resolve_config(user_config: dict) -> dict:
    """schema defaults < hyperparameter preset < model preset < user config (config.yaml and --config)."""
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
    return resolved


# --- outputs and stage arguments ------------------------------------------------------------------------------


def run_dir(cfg: dict) -> str:
    return f"{cfg['output_dir']}/{cfg['run_name']}"


def out(cfg: dict, *parts: str) -> str:
    """Path of one output of the run: {output_dir}/{run_name}/{parts}."""
    return "/".join([run_dir(cfg), *parts])


def script(name: str) -> str:
    """Absolute path of a stage script."""
    return str(REPO_DIR / "scripts" / f"{name}.py")


def _arg_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def stage_args(**options: Any) -> str:
    """`--name value` arguments for a stage script, shell-quoted. Used as a rule param, so a changed value
    re-runs the rule (Snakemake's params trigger) and nothing else."""
    return " ".join(f"--{k.replace('_', '-')} {shlex.quote(_arg_value(v))}" for k, v in options.items())


def pick(section: dict, *keys: str) -> dict:
    return {k: section[k] for k in keys}


def local_dataset(path: str) -> list[str]:
    """The dataset as a rule input when it is on disk (so editing it re-runs the data stage); a hub name is not."""
    return [path] if Path(path).exists() else []


def final_model(cfg: dict) -> str:
    """What the later stages evaluate: the merged model, or the adapter when merging is off."""
    return out(cfg, "merged") if cfg["merge"]["merge_full_weights"] else out(cfg, "adapters")


def summary_inputs(cfg: dict) -> dict[str, str]:
    """Every artifact the manifest covers."""
    inputs = {
        "model": out(cfg, "model", "model.json"),
        "data_report": out(cfg, "data", "report.json"),
        "preflight": out(cfg, "preflight.json"),
        "adapters": out(cfg, "adapters"),
        "train_metrics": out(cfg, "metrics", "train.json"),
    }
    if cfg["merge"]["merge_full_weights"]:
        inputs.update(merged=out(cfg, "merged"), merge_report=out(cfg, "metrics", "merge.json"))
    if cfg["evaluate"]["enabled"]:
        inputs["evaluate"] = out(cfg, "metrics", "evaluate.json")
    return inputs


def upload_dirs(cfg: dict) -> list[str]:
    """The directories the upload stage sends (besides the manifest)."""
    include = set(cfg["upload"]["include"]) - ({"merged"} if not cfg["merge"]["merge_full_weights"] else set())
    return [out(cfg, name) for name in ("merged", "adapters") if name in include]


def final_targets(cfg: dict) -> list[str]:
    """What `rule all` asks for: the manifest, and the upload record when a bucket is set."""
    return [out(cfg, "manifest.json"), *([out(cfg, "upload.json")] if cfg["upload"]["bucket"] else [])]


def summary_config(cfg: dict) -> str:
    """The effective config for the summary stage, without where the results are uploaded to: pointing the
    upload elsewhere must not re-run the summary (whose manifest the upload sends)."""
    return json.dumps({k: v for k, v in cfg.items() if k != "upload"}, sort_keys=True)


# --- resources ------------------------------------------------------------------------------------------------


def scaled(cfg: dict, base: int):
    """A resource (memory, time limit) that grows on each retry of a failed job: base, base x f, base x f² …
    (f = resources.retry_factor; retries: the profile's `retries`)."""
    factor = cfg["resources"]["retry_factor"]

    def value(wildcards, attempt):
        return int(base * factor ** (attempt - 1))

    return value


def train_placement(cfg: dict) -> dict:
    """GPU and node resources of the train job. One node: `gpu` (sbatch --gpus). Several nodes: GPUs per node
    (--gres), one task per node, and `mpi` so that the Slurm job step leaves the `srun` to the launcher."""
    res = cfg["resources"]
    if res["nodes"] <= 1:
        return {"gpu": res["gpus"]}
    placement = {"nodes": res["nodes"], "mpi": "srun", "tasks": res["nodes"], "tasks_per_gpu": 0}
    if res["gpus"]:
        placement["gres"] = f"gpu:{res['gpus']}"
    return placement


# --- container ------------------------------------------------------------------------------------------------
# The seam between the stages and the image: rules put {IN_IMAGE} (container.smk) before `python`, and list
# the image as an input. With container.runtime none both are empty and the stages run on the host.

SECRETS_TO_IMAGE = ("HF_TOKEN",)  # passed through the environment, never on a command line


def container_on(cfg: dict) -> bool:
    return cfg["container"]["runtime"] != "none"


def check_container(cfg: dict) -> None:
    """Called at parse time when the container is on: a missing runtime or image stops the workflow before any
    job is submitted, with the fix."""
    c = cfg["container"]
    runtime = c["runtime"]
    if shutil.which(runtime) is None:
        raise ConfigError(
            f"config key container.runtime: {runtime!r} is not on PATH on this machine. Load it "
            f"(`module load {runtime}`) or install it, or set container.runtime=none to run the stages on the host"
        )
    source = c["source"]
    if source == "path":
        if not c["path"]:
            raise ConfigError("config key container.path: required when container.source is path (a .sif file)")
        if not Path(c["path"]).expanduser().is_file():
            raise ConfigError(
                f"config key container.path: image {c['path']} does not exist; build or pull it first, or use "
                "container.source lfs, pull or build (README, Container)"
            )
    elif source == "pull" and not c["url"]:
        raise ConfigError(
            "config key container.url: required when container.source is pull (oras://, docker://, library://, "
            "https://, s3:// or file://)"
        )
    elif source == "lfs" and not c["lfs"]["url"]:
        raise ConfigError("config key container.lfs.url: required when container.source is lfs (the git-lfs repository)")
    elif source == "build" and not Path(container_definition(cfg)).is_file():
        raise ConfigError(f"config key container.definition: {c['definition']} does not exist")


def lfs_pin(cfg: dict) -> str:
    """What the image from the LFS repository is pinned to: a param of the container rule, so that a change
    re-runs it. container.lfs.update false: the configured revision (no network). True: the commit the remote's
    revision names now (git ls-remote), or, when that is the commit the last image came from, the pin recorded
    then, so that asking for an update re-runs nothing unless the remote moved."""
    lfs = cfg["container"]["lfs"]
    if not lfs["update"] or cfg["container"]["source"] != "lfs":
        return lfs["revision"]
    record = Path(container_image(cfg) + ".json")
    previous = json.loads(record.read_text()) if record.is_file() else {}
    try:
        result = subprocess.run(
            ["git", "-c", "credential.helper=", "ls-remote", lfs["url"], lfs["revision"]],
            capture_output=True, text=True, timeout=60, env=os.environ | {"GIT_TERMINAL_PROMPT": "0"},
        )
        lines, error = result.stdout.split(), result.stderr.strip()[-300:]
    except (OSError, subprocess.TimeoutExpired) as err:
        lines, error = [], str(err)
    if not lines:
        # A job on a node without network re-reads this file: keep the pin the image was made with.
        if previous.get("pin"):
            return previous["pin"]
        if re.fullmatch(r"[0-9a-f]{40}", lfs["revision"]):
            return lfs["revision"]
        raise ConfigError(
            f"config key container.lfs.update: cannot read revision {lfs['revision']!r} of {lfs['url']}: "
            f"{error or 'no such branch or tag'}"
        )
    commit = lines[0]
    if previous.get("commit") == commit and previous.get("pin"):
        return previous["pin"]
    return commit


def container_identity(cfg: dict) -> dict:
    """What the image is, per source (the container rule's params: a change re-runs it). Keys of the other
    sources are left out, so that editing them re-runs nothing."""
    c = cfg["container"]
    source = c["source"]
    what: dict = {"source": source, "sha256": c["sha256"]}
    if source == "path":
        what["path"] = c["path"]
    elif source == "pull":
        what["url"] = c["url"]
    elif source == "lfs":
        lfs = c["lfs"]
        what.update(lfs_url=lfs["url"], lfs_revision=lfs["revision"], lfs_dir=lfs["dir"], lfs_name=lfs["name"])
        what["pin"] = lfs_pin(cfg) if container_on(cfg) else lfs["revision"]
    return what  # build: the def and the requirements are the rule's inputs


def container_image(cfg: dict) -> str:
    """Where the container stage puts the verified image."""
    return cfg["container"]["image"]


def container_scratch(cfg: dict) -> Path:
    """The scratch directory for the image's caches, absolute; `~` and `$VARS` ($USER, $TMPDIR) expanded."""
    return Path(os.path.expandvars(cfg["container"]["scratch_dir"])).expanduser().absolute()


def container_binds(cfg: dict) -> list[str]:
    """Host directories the stages read and write, bound at the same path: the project (working directory:
    config, data, outputs), the workflow's scripts, the outputs, the scratch that holds the caches, the dataset
    and base model when they live elsewhere, and container.binds."""
    c = cfg["container"]
    paths = [Path.cwd(), REPO_DIR, Path(cfg["output_dir"]).absolute(), container_scratch(cfg)]
    dataset = Path(cfg["dataset"]["path"]).expanduser()
    if dataset.exists():
        paths.append((dataset if dataset.is_dir() else dataset.parent).resolve())
    model = cfg["model"]
    if model["source"] == "local" and model.get("path"):
        paths.append(Path(model["path"]).expanduser().resolve())
    if model["source"] == "hub":
        paths.append(Path(model["model_cache_dir"]).expanduser().absolute())
    unique = sorted({str(p) for p in paths})
    nested = {p for p in unique for q in unique if p != q and p.startswith(q.rstrip("/") + "/")}
    return [p for p in unique if p not in nested] + list(c["binds"])


def container_prefix(cfg: dict) -> str:
    """The command prefix of a stage that needs the training stack: '' for runtime none, else
    `<runtime> exec --nv --cleanenv --bind ... --env ... <sif> ` (ending in a space, before `python`). One
    command, no shell statements, so that `exec {IN_IMAGE}python ...` works.

    --cleanenv keeps the host's environment (its Python, PYTHONPATH, conda) out of the image. The hub token goes
    in through the environment (container_environment), never on a command line (argv is visible to every user
    in ps). The caches (HF_HOME, TRITON_CACHE_DIR, XDG_CACHE_HOME) go to the bound scratch: the image is
    read-only. The scratch directory must exist (container.smk creates it)."""
    c = cfg["container"]
    runtime = c["runtime"]
    if runtime == "none":
        return ""
    scratch = container_scratch(cfg)
    caches = {
        "HF_HOME": scratch / "cache" / "huggingface",
        "TRITON_CACHE_DIR": scratch / "cache" / "triton",
        "XDG_CACHE_HOME": scratch / "cache",
        "MPLCONFIGDIR": scratch / "cache" / "matplotlib",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONNOUSERSITE": "1",
    }
    cmd = [runtime, "exec"]
    if c["gpu"]:
        cmd.append("--nv")
    cmd.append("--cleanenv")
    for bind in container_binds(cfg):
        cmd += ["--bind", bind]
    for name, value in caches.items():
        cmd += ["--env", f"{name}={value}"]
    cmd.append(str(Path(container_image(cfg)).absolute()))
    return shlex.join(cmd) + " "


def container_environment(cfg: dict, environ: dict) -> dict[str, str]:
    """What the workflow adds to its own environment (inherited by every job) when the container is on: the
    secrets renamed APPTAINERENV_* / SINGULARITYENV_*, which the runtime hands into the image as HF_TOKEN even
    with --cleanenv. So the token reaches the stage without ever being on a command line."""
    runtime = cfg["container"]["runtime"]
    if runtime == "none":
        return {}
    env_prefix = "APPTAINERENV_" if runtime == "apptainer" else "SINGULARITYENV_"
    return {env_prefix + name: environ[name] for name in SECRETS_TO_IMAGE if environ.get(name)}


def container_definition(cfg: dict) -> str:
    """The definition file, absolute: relative paths are relative to the workflow's repository."""
    definition = Path(cfg["container"]["definition"]).expanduser()
    return str(definition if definition.is_absolute() else REPO_DIR / definition)


def project_commit() -> str:
    """The workflow's commit, for the image's labels; 'unknown' outside a git checkout."""
    try:
        result = subprocess.run(["git", "-C", str(REPO_DIR), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"

