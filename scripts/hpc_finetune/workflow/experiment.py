"""An experiment: many runs in one workflow (README, "Experiments"). The user config's `runs:` (named runs, each a
set of overrides of the top-level config) and `sweep:` (dotted key -> list of values, crossed; `zip:` a list of
{dotted key: value} points whose keys vary together, Axolotl's paired `_` sweeps) resolve here, once, into one
table {run name: resolved config} that the rules read through their `{run}` wildcard, and into the content keys
of the stages runs share (model fetch, data preparation, base evaluation), so a shared stage runs once.

Without `runs:` and `sweep:` the table is the one run `run_name`, laid out as before ({output_dir}/{run_name}/...).
Every run is resolved and validated before any job; an error names the run and the key. Kept free of Snakemake
imports, so that the tests exercise it directly.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import re
from typing import Any

from hpc_finetune.workflow.config import ConfigError, deep_merge, expand_dotted, load_schema, resolve_config

# Keys an experiment has once, not per run: where the runs go, how the stages run, the experiment's own settings.
EXPERIMENT_KEYS = ("output_dir", "container", "experiment", "runs", "sweep")
SHARED_ROOT = "_shared"  # {output_dir}/_shared/{stage}-{hash}: not a run name (those start with a letter or digit)
# Short names of the keys people sweep, for run names (lr2e-4_r16); any other key is named by its last part.
SHORT = {"learning_rate": "lr", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "drop", "epochs": "ep",
         "max_steps": "steps", "micro_batch_size": "bs", "gradient_accumulation_steps": "ga", "weight_decay": "wd",
         "max_seq_length": "len", "warmup_ratio": "warm", "quantization": "q", "preset": "", "model_id": "",
         "path": "", "hyperparameters": "hp"}
RESERVED = ("leaderboard",)  # {output_dir}/leaderboard holds the experiment's leaderboard
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def dotted_keys(schema: dict, prefix: str = "") -> list[str]:
    """Every settable key of the schema, dotted (training.learning_rate)."""
    keys = []
    for name, sub in schema.get("properties", {}).items():
        key = f"{prefix}{name}"
        keys.append(key)
        if sub.get("type") == "object" and "properties" in sub:
            keys += dotted_keys(sub, f"{key}.")
    return keys


def value_label(value: Any) -> str:
    """A value as it reads in a run name: 0.0002 -> 2e-4, 16 -> 16, org/model -> org-model."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value and not 1e-2 <= abs(value) < 1e5:
        mantissa, exponent = f"{value:.6e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    if isinstance(value, float):
        return f"{value:g}"
    return re.sub(r"[^A-Za-z0-9.-]+", "-", str(value)).strip("-.") or "x"


def key_label(key: str) -> str:
    last = key.split(".")[-1]
    return SHORT.get(last, last.replace("_", "-"))


def _check_axis_key(key: str, known: list[str], where: str) -> None:
    top = key.split(".")[0]
    if key not in known:
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"config key {where}: unknown key {key!r}{hint}; a sweep varies a config key, written dotted "
                          "(e.g. training.learning_rate)")
    if top in EXPERIMENT_KEYS or top == "run_name":
        raise ConfigError(f"config key {where}: {key!r} is set once for the whole experiment, not per run")


def sweep_points(sweep: dict, known: list[str]) -> list[dict]:
    """The sweep's points: the product of its axes (and of its zip group), each {dotted key: value}. Refuses an
    unknown key (naming the closest), an empty axis and a zip point whose keys differ from the first one's."""
    axes: list[list[dict]] = []
    for key, values in sweep.items():
        if key == "zip" and values == []:  # the default: no zip group
            continue
        if key == "zip":
            if not isinstance(values, list) or not all(isinstance(v, dict) and v for v in values):
                raise ConfigError("config key sweep.zip: a non-empty list of points, each {dotted key: value} "
                                  "(the keys that vary together)")
            first = set(values[0])
            for n, point in enumerate(values):
                if set(point) != first:
                    raise ConfigError(f"config key sweep.zip[{n}]: sets {sorted(point)}; every point of the zip "
                                      f"group sets the same keys {sorted(first)}")
                for sub in point:
                    _check_axis_key(str(sub), known, f"sweep.zip[{n}]")
            axes.append([{str(k): v for k, v in point.items()} for point in values])
            continue
        _check_axis_key(str(key), known, f"sweep.{key}")
        if not isinstance(values, list):
            raise ConfigError(f"config key sweep.{key}: {values!r} is not a list of values (write [{values}] for one)")
        if not values:
            raise ConfigError(f"config key sweep.{key}: the axis is empty; give it at least one value or remove it")
        axes.append([{str(key): v} for v in values])
    return [dict(itertools.chain.from_iterable(p.items() for p in combo)) for combo in itertools.product(*axes)]


def point_name(point: dict, varying: list[str]) -> str:
    return "_".join(f"{key_label(k)}{value_label(point[k])}" for k in varying)


def expand(runs: dict, sweep: dict) -> dict[str, tuple[dict, dict, bool]]:
    """{run name: (the run's overrides, its sweep values, base_only)} from `runs:` and `sweep:`, before any
    resolution. Refuses duplicate or colliding names, a run that sets run_name or an experiment-level key."""
    schema = load_schema()
    known = dotted_keys(schema)
    if not isinstance(runs, dict):
        raise ConfigError("config key runs: a mapping {run name: {key: value, ...}}")
    points = sweep_points(sweep, known)
    # every axis names the runs, even one left with a single value: a run's name must not change when another
    # value is added to or removed from the sweep (its outputs are under that name)
    axes = list(points[0]) if points else []
    entries: dict[str, tuple[dict, dict, bool]] = {}

    def add(name: str, overrides: dict, values: dict, base_only: bool, what: str) -> None:
        if not RUN_NAME.fullmatch(name):
            raise ConfigError(f"{what}: run name {name!r} is not a name of letters, digits, dots, underscores and "
                              "hyphens that starts with a letter or digit (it names {output_dir}/<run>)")
        if name in RESERVED:
            raise ConfigError(f"{what}: run name {name!r} is the experiment's own directory {{output_dir}}/{name}; "
                              "rename the run")
        if name in entries:
            raise ConfigError(f"{what}: run name {name!r} is used twice (runs: and the sweep's generated names must "
                              "be unique; rename the run, or add a key that tells the points apart)")
        entries[name] = (overrides, values, base_only)

    named = []
    for name, overrides in runs.items():
        overrides = dict(overrides or {})
        if not isinstance(overrides, dict):
            raise ConfigError(f"config key runs.{name}: a mapping of the keys this run overrides")
        base_only = bool(overrides.pop("base_only", False))
        flat = expand_dotted(overrides)
        for key in flat:
            if key == "run_name":
                raise ConfigError(f"config key runs.{name}.run_name: a run is named by its key under runs: "
                                  f"({name!r}); remove run_name")
            if key in EXPERIMENT_KEYS:
                raise ConfigError(f"config key runs.{name}.{key}: set once for the whole experiment, not per run")
        if base_only:
            add(str(name), flat, {}, True, f"config key runs.{name}")
        else:
            named.append((str(name), flat))
    if not points:
        for name, flat in named:
            add(name, flat, {}, False, f"config key runs.{name}")
        return entries
    for name, flat in named or [(None, {})]:
        for point in points:
            label = point_name(point, axes)
            run = "_".join(part for part in (name, label) if part)
            add(run, deep_merge(flat, expand_dotted(point)), point, False,
                f"config key sweep (point {point})" if name is None else f"config key runs.{name} x sweep {point}")
    return entries


def content_key(kind: str, *parts: Any) -> str:
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{SHARED_ROOT}/{kind}-{digest}"


def shared_keys(cfg: dict) -> dict[str, str]:
    """The content keys of the stages a run shares with others: the model (what is fetched or built: for the demo
    model, the dataset its tokenizer is trained on), the prepared data (the dataset settings and the tokenizer,
    i.e. the model), the base model's evaluation (model, prepared data, evaluate settings)."""
    model, ds = cfg["model"], cfg["dataset"]
    what = {k: model.get(k) for k in ("source", "model_id", "revision", "path", "trust_remote_code", "model_cache_dir")}
    if model["source"] == "demo":
        what["data"] = {k: ds[k] for k in ("path", "format", "text_field", "split", "eval_split", "config_name")}
    model_key = content_key("model", what)
    data_key = content_key("data", model_key, ds, cfg["training"]["max_seq_length"])
    evaluate = {k: v for k, v in cfg["evaluate"].items() if k != "enabled"}
    return {"model": model_key, "data": data_key, "base": content_key("base", model_key, data_key, evaluate)}


def alternatives(names) -> str:
    """A wildcard constraint that matches exactly these names (longest first), so that a run's wildcard never
    swallows part of a path and a path no run owns matches no rule."""
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) or "(?!)"


def split_user(user_config: dict) -> tuple[dict, dict, dict]:
    """The user config without runs:/sweep: (dotted keys expanded), its runs (names may hold dots) and its sweep
    as {dotted key: values} (written dotted or nested)."""
    user = copy.deepcopy(dict(user_config or {}))
    runs, sweep = user.pop("runs", None) or {}, user.pop("sweep", None) or {}
    if not isinstance(sweep, dict):
        raise ConfigError("config key sweep: a mapping {dotted key: [values], zip: [points]}")
    return expand_dotted(user), runs, {k: v for k, v in dotted(sweep).items()}


def experiment_on(user_config: dict) -> bool:
    return bool((user_config or {}).get("runs") or (user_config or {}).get("sweep"))


def resolve_experiment(user_config: dict, command_line: dict | None = None) -> dict[str, dict]:
    """{run name: resolved config}. command_line: the `--config` overrides (already in user_config, Snakemake
    merges them), applied again over every run's own settings, so that they hold for every run. A single-run config gives {run_name: resolve_config(config)} unchanged. In an
    experiment each run's config carries `_shared` (its content keys), `_sweep` (its sweep values) and `_base_only`;
    summary_config leaves those out of what a stage sees."""
    if not experiment_on(user_config):
        cfg = resolve_config(user_config)
        return {cfg["run_name"]: cfg}
    top, runs, sweep = split_user(user_config)
    base = resolve_config(top)  # the experiment's own keys (experiment.*, output_dir) and every run's defaults
    entries = expand(runs, sweep)
    cap = base["experiment"]["max_runs"]
    if len(entries) > cap:
        raise ConfigError(f"config key experiment.max_runs: the experiment has {len(entries)} runs, more than the cap "
                          f"{cap}; raise experiment.max_runs or shorten runs:/sweep:")
    if not entries:
        raise ConfigError("config keys runs/sweep: the experiment has no runs")
    on_top = {k: v for k, v in expand_dotted(copy.deepcopy(command_line or {})).items() if k not in ("runs", "sweep")}
    clash = sorted(set(dotted(on_top)) & {k for point in entries.values() for k in point[1]})
    if clash:
        raise ConfigError(f"--config sets {', '.join(clash)}, which the sweep varies (the run names would not say "
                          "what the runs are): change the sweep: axis instead")
    table, checked = {}, set()
    for name, (overrides, values, base_only) in entries.items():
        try:
            cfg = resolve_config(deep_merge(deep_merge(top, overrides), {**on_top, "run_name": name}), checked)
        except ConfigError as err:
            raise ConfigError(f"run {name}: {err}") from None
        cfg["_shared"], cfg["_sweep"], cfg["_base_only"] = shared_keys(cfg), values, base_only
        table[name] = cfg
    return table


def dotted(node: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config flattened to {dotted key: value}."""
    flat: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            flat.update(dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def varying_settings(table: dict[str, dict]) -> list[str]:
    """The dotted keys whose values differ between the runs (the leaderboard's settings columns)."""
    flat = [dotted({k: v for k, v in cfg.items() if not k.startswith("_") and k != "run_name"})
            for cfg in table.values()]
    keys = sorted(set().union(*flat))
    return [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flat}) > 1]


def experiment_tags(cfg: dict) -> dict[str, Any]:
    """MLflow tags of an experiment's run: its name and its sweep values (one MLflow run per run, all in the
    experiment tracking.experiment, so MLflow's compare view lines them up)."""
    return {"experiment.run": cfg["run_name"], **{f"sweep.{k}": v for k, v in cfg["_sweep"].items()}}


def model_label(cfg: dict) -> str:
    model = cfg["model"]
    return model.get("model_id") or (model.get("path") if model["source"] == "local" else None) or model["source"]


def leaderboard_entries(table: dict[str, dict]) -> list[dict]:
    """The leaderboard's rows (scripts/leaderboard.py --entries): every run that trains and evaluates, and every
    base-only entry, with the settings that vary between them."""
    from hpc_finetune.workflow.paths import base_out, run_dir

    varying = varying_settings(table)
    entries = []
    for name, cfg in table.items():
        if not cfg["_base_only"] and not cfg["evaluate"]["enabled"]:
            continue
        flat = dotted({k: v for k, v in cfg.items() if not k.startswith("_")})
        entries.append({
            "name": name, "kind": "base" if cfg["_base_only"] else "finetuned", "model": model_label(cfg),
            "dataset": cfg["dataset"]["path"],
            # a base entry trains nothing: its training and merge settings are not its own
            "settings": {k: flat.get(k) for k in varying
                         if not (cfg["_base_only"] and k.startswith(("training.", "merge.")))},
            "run_dir": None if cfg["_base_only"] else run_dir(cfg),
            "base_metrics": base_out(cfg, "base.json") if cfg["_base_only"] else None,
        })
    return entries


def leaderboard_inputs(table: dict[str, dict]) -> list[str]:
    """The files the leaderboard reads: each entry's metrics (the entries' run_dir and base_metrics)."""
    files = []
    for entry in leaderboard_entries(table):
        if entry["run_dir"]:
            files += [f"{entry['run_dir']}/metrics/{name}" for name in ("evaluate.json", "train.json", "resources.csv")]
        else:
            files.append(entry["base_metrics"])
    return files
