"""Experiment resolution (hpc_finetune.workflow.experiment): runs:, sweep: (crossed axes, a zip group), base-only
entries, readable run names, content keys of the shared stages, and every refusal before any job."""

from __future__ import annotations

import re

import pytest
import yaml
from hpc_finetune.workflow.config import ConfigError, resolve_config
from hpc_finetune.workflow.experiment import (
    experiment_tags,
    leaderboard_entries,
    resolve_experiment,
    value_label,
    varying_settings,
)
from support.common import REPO

DEMO = yaml.safe_load((REPO / "config.yaml").read_text())


def experiment(**keys) -> dict:
    return resolve_experiment({**DEMO, **keys})


def test_a_single_run_config_resolves_as_before():
    table = resolve_experiment(DEMO)
    assert list(table) == ["demo"]
    assert table["demo"] == resolve_config(DEMO)  # no experiment keys added: same params, same layout


def test_a_sweep_crosses_its_axes_and_names_runs_from_the_values_that_vary():
    table = experiment(sweep={"training.learning_rate": [2e-4, 0.01], "training.lora_r": [8, 16],
                              "training.epochs": [1]})
    assert sorted(table) == ["lr0.01_r16_ep1", "lr0.01_r8_ep1", "lr2e-4_r16_ep1", "lr2e-4_r8_ep1"]
    run = table["lr2e-4_r16_ep1"]
    assert run["training"]["learning_rate"] == 2e-4 and run["training"]["lora_r"] == 16
    assert run["run_name"] == "lr2e-4_r16_ep1"
    assert run["_sweep"] == {"training.learning_rate": 2e-4, "training.lora_r": 16, "training.epochs": 1}
    assert varying_settings(table) == ["training.learning_rate", "training.lora_r"]


def test_a_run_keeps_its_name_when_a_value_is_added_to_or_removed_from_the_sweep():
    two = experiment(sweep={"training.learning_rate": [0.01, 0.02], "training.lora_r": [8]})
    one = experiment(sweep={"training.learning_rate": [0.01], "training.lora_r": [8]})
    assert sorted(two) == ["lr0.01_r8", "lr0.02_r8"] and list(one) == ["lr0.01_r8"]
    assert one["lr0.01_r8"]["_shared"] == two["lr0.01_r8"]["_shared"]


def test_a_zip_group_varies_keys_together_and_crosses_the_other_axes():
    table = experiment(sweep={"training.learning_rate": [0.01, 0.02],
                              "zip": [{"training.lora_r": 8, "training.lora_alpha": 16},
                                      {"training.lora_r": 16, "training.lora_alpha": 32}]})
    assert len(table) == 4
    assert {(c["training"]["lora_r"], c["training"]["lora_alpha"]) for c in table.values()} == {(8, 16), (16, 32)}
    assert "lr0.01_r8_alpha16" in table


def test_named_runs_are_crossed_with_the_sweep_and_base_only_entries_are_not():
    table = experiment(runs={"small": {"training": {"lora_r": 4}}, "base": {"base_only": True}},
                       sweep={"training.learning_rate": [0.01, 0.02]})
    assert sorted(table) == ["base", "small_lr0.01", "small_lr0.02"]
    assert table["base"]["_base_only"] and not table["small_lr0.01"]["_base_only"]
    assert table["small_lr0.02"]["training"]["lora_r"] == 4


def test_runs_that_differ_only_in_training_share_the_model_data_and_base_evaluation():
    table = experiment(sweep={"training.learning_rate": [0.01, 0.02, 0.03]})
    keys = [cfg["_shared"] for cfg in table.values()]
    assert all(k == keys[0] for k in keys)
    assert keys[0]["model"].startswith("_shared/model-")
    other = experiment(sweep={"dataset.eval_fraction": [0.1, 0.2]})
    a, b = (cfg["_shared"] for cfg in other.values())
    assert a["model"] == b["model"] and a["data"] != b["data"] and a["base"] != b["base"]


def test_value_labels_are_short_and_filesystem_safe():
    assert [value_label(v) for v in (2e-4, 0.01, 16, True, "org/Model 7B", 1e-05)] == \
        ["2e-4", "0.01", "16", "true", "org-Model-7B", "1e-5"]


def test_command_line_overrides_hold_for_every_run():
    table = resolve_experiment({**DEMO, "sweep": {"training.learning_rate": [0.01, 0.02]},
                                "training": {"max_steps": 5}}, command_line={"training__max_steps": 5})
    assert {cfg["training"]["max_steps"] for cfg in table.values()} == {5}
    table = resolve_experiment({**DEMO, "runs": {"a": {"training": {"max_steps": 9}}}},
                               command_line={"training__max_steps": 3})
    assert table["a"]["training"]["max_steps"] == 3


@pytest.mark.parametrize("keys, message", [
    ({"sweep": {"training.learning_rat": [0.1]}}, "did you mean 'training.learning_rate'"),
    ({"sweep": {"training.learning_rate": []}}, "sweep.training.learning_rate: the axis is empty"),
    ({"sweep": {"training.learning_rate": 0.1}}, "is not a list of values"),
    ({"sweep": {"output_dir": ["a", "b"]}}, "set once for the whole experiment"),
    ({"runs": {"a": {"run_name": "b"}}}, "runs.a.run_name: a run is named by its key"),
    ({"runs": {"a": {"output_dir": "x"}}}, "runs.a.output_dir: set once for the whole experiment"),
    ({"runs": {"lr0.01": {}, "x": {"training": {"lora_r": 4}}}, "sweep": {"training.learning_rate": [0.01, 0.02]}},
     None),
    ({"runs": {"lr0.01": {"base_only": True}}, "sweep": {"training.learning_rate": [0.01, 0.02]}}, "used twice"),
    ({"sweep": {"model.model_id": ["a/b", "a b"], "model.revision": ["main"]}}, "used twice"),
    ({"runs": {"leaderboard": {}}}, "run name 'leaderboard' is the experiment's own directory"),
    ({"sweep": {"training.learning_rate": [0.01, 0.02, 0.03]}, "experiment": {"max_runs": 2}},
     "experiment has 3 runs, more than the cap 2"),
    ({"runs": {"bad": {"training": {"lora_r": -1}}}}, "run bad: config key training"),
    ({"runs": {"bad": {"training": {"learning_rat": 0.1}}}}, "run bad: config: unknown key 'learning_rat'"),
    ({"sweep": {"zip": [{"training.lora_r": 8}, {"training.lora_alpha": 8}]}}, "sweep.zip[1]: sets"),
])
def test_bad_experiments_are_refused_before_any_job_naming_the_run_and_key(keys, message):
    if message is None:  # a valid one among the cases: the refusals are not a refusal of everything
        assert len(experiment(**keys)) == 4
        return
    with pytest.raises(ConfigError, match=re.escape(message)):
        experiment(**keys)


def test_a_command_line_override_of_a_swept_key_is_refused():
    with pytest.raises(ConfigError, match="--config sets training.learning_rate, which the sweep varies"):
        resolve_experiment({**DEMO, "sweep": {"training.learning_rate": [0.01, 0.02]}},
                           command_line={"training__learning_rate": 0.5})


def test_the_default_cap_is_64_runs():
    with pytest.raises(ConfigError, match="65 runs, more than the cap 64"):
        experiment(sweep={"training.seed": list(range(65))})


def test_the_leaderboard_entries_are_the_runs_and_base_entries_with_the_settings_that_vary():
    table = experiment(runs={"base": {"base_only": True}}, sweep={"training.learning_rate": [0.01, 0.02]})
    entries = {entry["name"]: entry for entry in leaderboard_entries(table)}
    assert entries["lr0.01"] == {"name": "lr0.01", "kind": "finetuned", "model": "demo",
                                 "dataset": "data/demo/medical_qa.jsonl",
                                 "settings": {"training.learning_rate": 0.01}, "run_dir": "results/lr0.01",
                                 "base_metrics": None}
    base = entries["base"]
    assert base["kind"] == "base" and base["run_dir"] is None and base["settings"] == {}
    assert base["base_metrics"] == f"results/{table['lr0.01']['_shared']['base']}/eval/base.json"
    assert experiment_tags(table["lr0.02"]) == {"experiment.run": "lr0.02", "sweep.training.learning_rate": 0.02}
