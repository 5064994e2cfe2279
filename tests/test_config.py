"""Config resolution: presets, precedence, --config overrides, and errors that name the key and the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hpc_finetune.workflow.config import ConfigError, expand_dotted, load_presets, load_schema, resolve_config
from support.common import REPO

DEMO = yaml.safe_load((REPO / "config.yaml").read_text())


def test_demo_config_resolves_with_every_key_defaulted():
    cfg = resolve_config(DEMO)
    schema = load_schema()
    for section, spec in schema["properties"].items():
        assert section in cfg, section
        for key in spec.get("properties", {}):
            assert key in cfg[section], f"{section}.{key} has no default"
    assert cfg["model"]["source"] == "demo"
    assert cfg["training"]["learning_rate"] == 0.01  # from the demo preset, over the schema's 2e-4


def test_every_schema_key_is_described():
    def walk(spec, path):
        for key, sub in spec.get("properties", {}).items():
            assert sub.get("description"), f"{'.'.join(path + [key])} has no description"
            assert "type" in sub or "oneOf" in sub, f"{'.'.join(path + [key])} has no type"
            walk(sub, path + [key])

    walk(load_schema(), [])


@pytest.mark.parametrize("preset", list(load_presets("models")))
@pytest.mark.parametrize("hyper", list(load_presets("hyperparameters")))
def test_every_preset_combination_is_valid(preset, hyper):
    cfg = resolve_config({"run_name": "x", "preset": preset, "hyperparameters": hyper})
    assert cfg["preset"] == preset


def test_precedence_user_over_model_preset_over_hyperparameter_preset():
    cfg = resolve_config({"run_name": "x", "preset": "llama3-8b-medical", "hyperparameters": "high_capacity"})
    assert cfg["model"]["model_id"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert cfg["training"]["lora_r"] == 64 and cfg["training"]["learning_rate"] == 0.0001
    cfg = resolve_config(
        {"run_name": "x", "preset": "llama3-8b-medical", "hyperparameters": "high_capacity", "training": {"lora_r": 8}}
    )
    assert cfg["training"]["lora_r"] == 8 and cfg["training"]["lora_alpha"] == 128


def test_flat_and_nested_overrides_as_snakemake_passes_them():
    # `--config training__learning_rate=0.005` arrives as a float; `training={lora_r: 4}` as strings.
    cfg = resolve_config(DEMO | {"training__learning_rate": 0.005, "merge": {"tolerance": "0.01"}})
    assert cfg["training"]["learning_rate"] == 0.005
    assert cfg["merge"]["tolerance"] == 0.01
    cfg = resolve_config(DEMO | {"training": {"lora_r": "4", "bf16": "false", "packing": "true"}})
    assert cfg["training"]["lora_r"] == 4 and cfg["training"]["bf16"] is False and cfg["training"]["packing"] is True
    assert expand_dotted({"a.b": 1, "a": {"c": 2}}) == {"a": {"b": 1, "c": 2}}
    convergence = resolve_config(DEMO | {"training__convergence__window": "3"})["training"]["convergence"]
    assert convergence["window"] == 3 and convergence["tolerance"] == 0.01, "the other keys keep their defaults"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"training": {"quantization": "3bit"}}, "training.quantization: '3bit' is not allowed; allowed values: 4bit, 8bit, none"),
        ({"training": {"learnin_rate": 1}}, "unknown key 'learnin_rate' (did you mean 'learning_rate'?) under training"),
        ({"training": {"epochs": "many"}}, "training.epochs: 'many' is not of type 'number'"),
        ({"training": {"lora_r": 0}}, "training.lora_r: 0 is less than the minimum of 1"),
        ({"dataset": {"eval_fraction": 0.9}}, "dataset.eval_fraction: 0.9 is greater than the maximum of 0.5"),
        ({"merge": {"merged_save_format": "gguf"}}, "allowed values: safetensors, bin"),
        ({"training": {"target_modules": "everything"}}, "training.target_modules: 'everything' is not allowed"),
        ({"preset": "llama-9000"}, "preset: 'llama-9000' is not a known preset; allowed values: demo, llama3-8b-medical"),
        ({"hyperparameters": "fast"}, "hyperparameters: 'fast' is not a known preset"),
        ({"run_name": "../escape"}, "run_name: '../escape' is not a name made of letters, digits, dots, underscores "
                                    "and hyphens that starts with a letter or digit"),
        ({"run_name": "my run"}, "run_name: 'my run' is not a name made of letters, digits"),
        ({"model": {"revision": None}}, "model.revision is empty; set it to a branch, tag or commit (e.g. main, v1.0 "
                                        "or a commit SHA)"),
        ({"model": {"revision": ""}}, "model.revision is empty; set it to a branch, tag or commit"),
        ({"model": {"revision": "a..b"}}, "model.revision: 'a..b' is not a branch, tag or commit"),
        ({"dataset": {"revision": None}}, "dataset.revision is empty; set it to a branch, tag or commit"),
        ({"model": {"source": "local"}}, "model.path: required when model.source is local"),
        ({"colour": "blue"}, "unknown key 'colour' at the top level"),
        ({"training": {"optim": "adamw_magic"}},
         "training.optim: 'adamw_magic' is not allowed (did you mean 'adamw_8bit'?); allowed values: adamw_torch, "),
        ({"upload": {"bucket": "notabucket"}}, "upload.bucket: 'notabucket' is not s3://bucket[/prefix]"),
        ({"upload": {"bucket": "s3://Bad_Bucket/runs"}}, "upload.bucket: 's3://Bad_Bucket/runs' is not s3://bucket"),
        ({"merge": {"max_shard_size": "huge"}}, "merge.max_shard_size: 'huge' is not a size like 5GB, 500MB or 1.5TB"),
        ({"merge": {"max_shard_size": "500MiB"}}, "merge.max_shard_size: '500MiB' is not a size like 5GB"),
        ({"hub_upload": {"repo_id": "no-namespace"}},
         "hub_upload.repo_id: 'no-namespace' is not namespace/name (your user or organisation, a slash"),
        ({"hub_upload": {"repo_id": "lab/x", "publish": ["gguf"]}}, "hub_upload.publish.0: 'gguf' is not allowed; allowed values: adapter, merged"),
        ({"hub_upload": {"repo_id": "lab/x", "publish": ["merged"]}, "merge": {"merge_full_weights": False}},
         "hub_upload.publish: [merged] with merge.merge_full_weights false publishes nothing"),
        ({"dataset": {"revision": "../up"}}, "dataset.revision: '../up' is not a branch, tag or commit"),
        ({"training": {"convergence": {"window": 1}}}, "training.convergence.window: 1 is less than the minimum of 2"),
        ({"training": {"convergence": {"windw": 3}}},
         "unknown key 'windw' (did you mean 'window'?) under training.convergence"),
    ],
)
def test_invalid_config_names_the_key_and_the_allowed_values(override, expected):
    with pytest.raises(ConfigError) as err:
        resolve_config(DEMO | override)
    assert expected in str(err.value)
    assert "does not match" not in str(err.value) and "None is not" not in str(err.value)


def test_every_pattern_is_explained_in_words():
    """A key with a pattern has a format_hint: its error says which characters are allowed, not a regex."""
    def walk(spec, path):
        for key, sub in spec.get("properties", {}).items():
            if "pattern" in sub:
                assert sub.get("format_hint"), f"{'.'.join([*path, key])} has a pattern and no format_hint"
            walk(sub, [*path, key])

    walk(load_schema(), [])


def test_an_empty_revision_written_in_config_yaml_says_so():
    """`revision:` with nothing after it is null in YAML."""
    cfg = DEMO | {"model": yaml.safe_load("source: hub\nmodel_id: org/name\nrevision:\n")}
    with pytest.raises(ConfigError, match=r"model.revision is empty; .* or remove the key to use the default$"):
        resolve_config(cfg)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("training__quantization=3bit", "training.quantization: '3bit' is not allowed; allowed values: 4bit, 8bit"),
        ("training__optim=adamw_magic", "training.optim: 'adamw_magic' is not allowed (did you mean 'adamw_8bit'?)"),
        ("upload__bucket=notabucket", "upload.bucket: 'notabucket' is not s3://bucket[/prefix]"),
        ("merge__max_shard_size=huge", "merge.max_shard_size: 'huge' is not a size like 5GB"),
    ],
)
def test_bad_config_is_rejected_before_any_job_starts(tmp_path: Path, override, expected):
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--cores", "1", "--config", override],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert result.returncode != 0
    assert expected in result.stderr
    assert not (tmp_path / "results").exists()


def test_the_optimizer_names_are_transformers_own():
    from transformers.training_args import OptimizerNames

    schema = load_schema()["properties"]["training"]["properties"]["optim"]
    assert schema["enum"] == [name.value for name in OptimizerNames]


@pytest.mark.parametrize(("size", "accepted"), [
    ("5GB", True), ("500MB", True), ("1.5TB", True), ("10kb", True), (" 2 GB ", True),
    ("huge", False), ("5", False), ("500MiB", False), ("GB", False), ("-5GB", False),
])
def test_the_shard_size_pattern_accepts_what_save_pretrained_reads(size, accepted):
    """What the schema's pattern accepts, huggingface_hub's parser (used by save_pretrained and the streaming
    merge) reads; the common forms pass both, the rest fail before any job."""
    import re

    from huggingface_hub.serialization._base import parse_size_to_int

    pattern = load_schema()["properties"]["merge"]["properties"]["max_shard_size"]["pattern"]
    assert bool(re.search(pattern, size)) == accepted
    if accepted:
        assert parse_size_to_int(size) > 0


def test_a_workflow_whose_library_is_not_the_one_installed_stops_with_the_fix(tmp_path: Path):
    """A second checkout run with an environment that has the first one installed: its rules' code inputs and
    stages would be the other checkout's, so the workflow refuses to start and says how to install this one."""
    import shutil

    copy = tmp_path / "checkout"
    shutil.copytree(REPO / "workflow", copy / "workflow")
    shutil.copy(REPO / "Snakefile", copy / "Snakefile")
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    result = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(copy / "Snakefile"), "--cores", "1", "-n"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0
    assert f"is not the one of this workflow ({copy}/scripts)" in result.stderr
    assert f"`make env` in {copy}" in result.stderr


# --- the test set and the evaluate keys, checked when Snakemake starts ---------------------------------------


def chat_row(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write_test_set(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_good_test_set_and_labels_resolve(tmp_path: Path):
    rows = [chat_row(f"case {i}", label) for i, label in enumerate(["urgent", "Routine.", "urgent", "routine"])]
    cfg = resolve_config(DEMO | {"dataset": {"test_path": write_test_set(tmp_path / "t.jsonl", rows)},
                                 "evaluate": {"labels": ["urgent", "routine"]}})
    assert cfg["evaluate"]["labels"] == ["urgent", "routine"] and cfg["evaluate"]["num_samples"] == 256
    assert resolve_config(DEMO)["dataset"]["test_path"] is None


@pytest.mark.parametrize(
    ("rows", "evaluate", "expected"),
    [
        ([chat_row("a", "urgent"), {"question": "b", "answer": "routine"}], {},
         "row 2: the messages format (the training data's) needs the field(s) messages or conversations; this row "
         "has answer, question"),
        ([], {}, "the test set has no rows"),
        ([chat_row("a", "urgent"), chat_row("b", "urgent")], {"labels": ["urgent", "routine"]},
         "evaluate.labels 'routine' never occur(s) among the 2 reference answers (they use urgent)"),
        ([chat_row("a", "urgent"), chat_row("b", "maybe later")], {"labels": ["urgent", "routine"]},
         "row 2: the reference answer 'maybe later' is not one of evaluate.labels (urgent, routine)"),
        ([chat_row("a", "urgent") | {"category": "skin"}, chat_row("b", "routine")], {"group_field": "category"},
         "row 2: evaluate.group_field 'category' is missing or empty (the row has messages)"),
    ],
    ids=["missing_fields", "empty", "label_never_occurs", "not_a_label", "no_group"],
)
def test_a_bad_test_set_names_the_file_and_row(tmp_path: Path, rows, evaluate, expected):
    path = write_test_set(tmp_path / "t.jsonl", rows)
    with pytest.raises(ConfigError) as info:
        resolve_config(DEMO | {"dataset": {"test_path": path}, "evaluate": evaluate})
    assert f"test set {path} (dataset.test_path)" in str(info.value) and expected in str(info.value)


def test_bad_test_paths_and_lm_eval_include_paths(tmp_path: Path):
    with pytest.raises(ConfigError, match="dataset.test_path: s3://b/t.jsonl is not a local file or directory"):
        resolve_config(DEMO | {"dataset": {"test_path": "s3://b/t.jsonl"}})
    with pytest.raises(ConfigError, match="unsupported file type '.txt'"):
        resolve_config(DEMO | {"dataset": {"test_path": write_test_set(tmp_path / "t.txt", [chat_row("a", "b")])}})
    with pytest.raises(ConfigError, match="evaluate.lm_eval_include_path: /nowhere is not a directory"):
        resolve_config(DEMO | {"evaluate": {"lm_eval_tasks": ["x"], "lm_eval_include_path": "/nowhere"}})
    with pytest.raises(ConfigError, match="evaluate.labels"):
        resolve_config(DEMO | {"evaluate": {"labels": ["only"]}})  # at least two


def test_a_bad_test_set_stops_snakemake_before_any_job(tmp_path: Path):
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    write_test_set(tmp_path / "test.jsonl", [chat_row("a", "urgent"), {"prompt": "b"}])
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--cores", "1", "--config",
         "dataset__test_path=test.jsonl"], cwd=tmp_path, capture_output=True, text=True,
    )
    assert result.returncode != 0
    assert "test set test.jsonl (dataset.test_path) row 2: the messages format" in result.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("path", ["/data/nowhere/train.jsonl", "/data/nowhere", "data/missing.jsonl", "train.txt"])
def test_a_dataset_path_that_names_a_missing_file_is_refused_at_start(path, tmp_path, monkeypatch):
    """Absolute, or with a file suffix: a file on disk, not a hub name; missing, it is refused when Snakemake
    starts instead of in the data stage (org/name and existing paths resolve as before)."""
    from hpc_finetune.workflow.dataset import dataset_input

    monkeypatch.chdir(tmp_path)
    cfg = resolve_config(DEMO | {"dataset": {"path": path}})
    with pytest.raises(ConfigError, match=f"config key dataset.path: {path} does not exist"):
        dataset_input(cfg, str(tmp_path / "state"))
    (tmp_path / "exists.jsonl").write_text("")
    assert dataset_input(resolve_config(DEMO | {"dataset": {"path": "exists.jsonl"}})).inputs == ["exists.jsonl"]


def test_snakemake_refuses_a_missing_dataset_file_before_planning(tmp_path: Path):
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--cores", "1", "--dry-run", "--config",
         "dataset__path=/data/nowhere/train.jsonl"], cwd=tmp_path, capture_output=True, text=True,
    )
    assert result.returncode != 0 and "Job stats" not in result.stdout + result.stderr
    assert "config key dataset.path: /data/nowhere/train.jsonl does not exist; point it at a" in result.stderr


def test_an_empty_section_or_number_says_what_to_write():
    with pytest.raises(ConfigError, match="config key training is empty; set it to its keys, indented below it$"):
        resolve_config(DEMO | {"training": None})
    with pytest.raises(ConfigError, match="config key training.lora_r is empty; set it to a whole number, or remove "
                                          "the key to use the default$"):
        resolve_config(DEMO | {"training": {"lora_r": None}})
