"""The workflow end to end: one real demo run (tiny model, real 4-bit QLoRA on the CPU), shared by the tests that
inspect it; then what Snakemake decides to re-run after changes; and the linters."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hpc_finetune.evaluate.report import ahead, comparison_rows
from hpc_finetune.io.files import read_jsonl, sha256_file
from support.common import DEMO_SECRET as SECRET
from support.common import REPO, SCRIPTS, SNAKEMAKE
from support.s3 import moto_auth, s3_client, s3_key, s3_put
from support.workflow import planned_jobs, run_workflow

pytestmark = pytest.mark.e2e


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_workflow(workdir, *args, env={"HF_TOKEN": SECRET}, check=check)


def metrics(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / "metrics" / f"{name}.json").read_text())


def test_the_run_has_every_output(run_dir):
    for path in (
        "adapters/adapter_model.safetensors", "adapters/adapter_config.json",
        "merged/model.safetensors", "merged/config.json", "merged/tokenizer.json", "merged/generation_config.json",
        "training.env", "manifest.json", "preflight.json", "data/report.json",
    ):
        assert (run_dir / path).is_file(), path
    for stage in ("build_demo_model", "model", "prepare_data", "preflight", "train", "merge", "evaluate", "summary"):
        assert (run_dir / "logs" / f"{stage}.log").is_file(), stage
    assert (run_dir / "benchmarks" / "train.tsv").is_file()


def test_the_model_learned(run_dir):
    train = metrics(run_dir, "train")
    assert train["trainable_params"] > 0 and train["adapter_max_abs_change"] > 0
    assert train["quantization"] == "4bit" and train["device"] == "cpu"
    assert train["eval_loss_first"] / train["eval_loss_last"] >= 5, train
    assert train["train_loss_last"] < 0.2, train  # ~0.02 measured; 2.7 when the 4-bit base dropped its gradient
    convergence = train["convergence"]  # measured: best eval at step 440 of 480, every check ok
    assert convergence["verdict"] == "ok" and convergence["reasons"] == [], convergence
    assert convergence["best_eval_loss"] == min(e["eval_loss"] for e in train["log_history"] if "eval_loss" in e)
    evaluation = metrics(run_dir, "evaluate")
    assert evaluation["finetuned_eval_loss"] <= 0.2 * evaluation["base_eval_loss"], evaluation
    # no test set in the demo: the held-out phrasings are scored, and the fine-tuned model is ahead on every metric
    assert evaluation["scored_on"]["fallback"] is True and evaluation["scored_on"]["scored"] > 0, evaluation
    for name, base, tuned, rows in comparison_rows(evaluation):
        assert rows == evaluation["scored_on"]["scored"] and ahead(evaluation)[name] == "fine-tuned", (name, base, tuned)
    assert evaluation["eval_exact_match"] >= 0.5, evaluation  # 11 of 16 held-out answers exactly before


def test_no_stage_log_warns_of_silently_incorrect_results(run_dir):
    """bitsandbytes' packed CPU layout has no backward; PyTorch warns when training runs through it."""
    for log in sorted((run_dir / "logs").glob("*.log")):
        text = log.read_text()
        assert "autograd kernel was not registered" not in text and "silently incorrect" not in text, log.name


def test_the_merged_model_matches_base_plus_adapter(run_dir):
    merge = metrics(run_dir, "merge")
    assert merge["max_abs_logit_diff"] <= 1e-3 and merge["dtype"] == "float32"


def test_the_manifest_covers_every_artifact_with_its_sha256(run_dir):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    listed = {a["path"]: a for a in manifest["artifacts"]}
    for must in ("adapters/adapter_model.safetensors", "merged/model.safetensors", "training.env", "data/train.jsonl"):
        assert must in listed, must
    for path, entry in listed.items():
        assert sha256_file(run_dir / path) == entry["sha256"], path
    m = manifest["metrics"]
    for key in ("train_loss_first", "train_loss_last", "eval_loss_first", "eval_loss_last", "steps", "tokens",
                "train_wall_time_s", "peak_memory"):
        assert m[key] is not None, key
    assert m["train_loss_last"] < m["train_loss_first"] and m["steps"] > 0 and m["tokens"] > 0
    assert m["convergence"]["verdict"] == "ok" and "convergence" in (run_dir / "logs" / "summary.log").read_text()
    assert manifest["versions"]["trl"] and manifest["model"]["source"] == "demo"


def test_training_env_holds_the_effective_config(run_dir):
    env = dict(line.split("=", 1) for line in (run_dir / "training.env").read_text().splitlines()
               if line and not line.startswith("#"))
    assert env["TRAINING_LEARNING_RATE"] == "0.01" and env["TRAINING_QUANTIZATION"] == "4bit"
    assert env["MODEL_TOKEN_FILE"] == "''"


def test_no_output_or_log_contains_the_token(demo):
    leaks = [str(p) for p in demo.rglob("*") if p.is_file() and not p.is_symlink()
             and SECRET.encode() in p.read_bytes()]
    assert leaks == []


def test_a_second_run_does_nothing(demo):
    assert planned_jobs(snakemake(demo, "--dry-run")) == set()


def test_a_training_change_reruns_training_and_what_follows_only(demo):
    jobs = planned_jobs(snakemake(demo, "--dry-run", "--config", "training__learning_rate=0.005"))
    assert jobs == {"train", "merge", "evaluate", "summary", "plots", "all"}


def test_a_dataset_change_reruns_data_and_what_follows(demo):
    jobs = planned_jobs(snakemake(demo, "--dry-run", "--config", "dataset__eval_fraction=0.2"))
    assert jobs == {"prepare_data", "train", "merge", "evaluate", "summary", "plots", "all"}


EVERY_STAGE = {"build_demo_model", "model", "prepare_data", "preflight", "train", "merge", "evaluate", "summary", "plots", "all"}


@pytest.mark.parametrize(("module", "expected"), [
    ("hpc_finetune/train/speed.py", {"train", "merge", "evaluate", "summary", "plots", "all"}),  # training only
    ("hpc_finetune/merge/save.py", {"merge", "evaluate", "summary", "plots", "all"}),  # merge only
    ("hpc_finetune/io/cli.py", EVERY_STAGE),  # shared by every stage
    ("prepare_data.py", {"prepare_data", "train", "merge", "evaluate", "summary", "plots", "all"}),  # a stage program
])
def test_an_edited_module_reruns_the_stages_that_import_it(demo, module, expected):
    """The code inputs of a rule are its program's import closure: an edit re-plans exactly the stages that run
    the module (and those after them). Snakemake compares contents, not only times, so the file is edited for
    the dry run and then put back byte for byte, with its time."""
    path = SCRIPTS / module
    before, text = path.stat(), path.read_bytes()
    try:
        path.write_bytes(text + b"\n# edited by a test\n")
        jobs = planned_jobs(snakemake(demo, "--dry-run"))
    finally:
        path.write_bytes(text)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert jobs == expected
    assert planned_jobs(snakemake(demo, "--dry-run")) == set()


def test_the_upload_stage_sends_the_run_to_a_bucket_and_reruns_nothing_else(demo, run_dir, s3_server):
    """With upload.bucket set, a finished run plans the upload alone; the bucket then holds every merged and adapter
    file of the manifest with its sha256, and the manifest itself; the secret is in no file and no log."""
    key = s3_key(s3_server, "workflow-uploader", ["s3:PutObject", "s3:GetObject"],
                 ["arn:aws:s3:::results", "arn:aws:s3:::results/*"])
    s3_put(s3_server, "results")
    args = ("--config", "upload__bucket=s3://results/runs/demo", f"upload__endpoint={s3_server}")
    credentials = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    assert planned_jobs(snakemake(demo, "--dry-run", *args)) == {"upload", "all"}
    moto_auth(s3_server, "0")
    try:
        run_workflow(demo, *args, env={"HF_TOKEN": SECRET, **credentials})
        client = s3_client(s3_server, key)
        manifest = json.loads((run_dir / "manifest.json").read_text())
        sent = [a for a in manifest["artifacts"] if a["path"].startswith(("merged/", "adapters/"))]
        record = json.loads((run_dir / "upload.json").read_text())
        keys = [o["key"] for o in record["objects"]]
        assert sorted(keys[:-1]) == sorted(f"runs/demo/{a['path']}" for a in sent)  # exactly the manifest's files
        assert keys[-1] == "runs/demo/manifest.json"  # and the manifest last
        assert any(a["path"] == "merged/model.safetensors" for a in sent)
        for artifact in sent:
            head = client.head_object(Bucket="results", Key=f"runs/demo/{artifact['path']}")
            assert head["Metadata"]["sha256"] == artifact["sha256"], artifact["path"]  # x-amz-meta-sha256
        manifest_object = client.get_object(Bucket="results", Key="runs/demo/manifest.json")["Body"].read()
        assert manifest_object == (run_dir / "manifest.json").read_bytes()
        assert planned_jobs(snakemake(demo, "--dry-run", *args)) == set()
    finally:
        moto_auth(s3_server, "inf")
    assert "Upload" in (run_dir / "logs" / "upload.log").read_text()
    leaks = [str(p) for p in demo.rglob("*") if p.is_file() and not p.is_symlink()
             and key["SecretAccessKey"].encode() in p.read_bytes()]
    assert leaks == []

def test_the_samples_show_both_models_answers_one_row_per_prompt(run_dir):
    samples = read_jsonl(run_dir / "eval" / "samples.jsonl")
    with open(run_dir / "eval" / "samples.csv", newline="", encoding="utf-8-sig") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(samples) == metrics(run_dir, "evaluate")["scored_on"]["scored"]
    assert [r["finetuned_answer"] for r in table] == [s["finetuned_answer"] for s in samples]
    assert sum(s["finetuned_exact"] for s in samples) > sum(s["base_exact"] for s in samples)
    assert "fine-tuned" in (run_dir / "eval" / "report.txt").read_text()


def test_the_demo_preset_takes_a_users_alpaca_json_and_wrong_targets_stop_before_training(tmp_path):
    """preset demo with the user's own data (an alpaca JSON array): the demo model is built from it and the data
    stage reads it; a target module the model does not have stops the run at preflight, before the train job."""
    rows = [{"instruction": q, "input": "", "output": a}
            for q, a in ((r["messages"][1]["content"], r["messages"][2]["content"]) for r in read_jsonl(
                REPO / "data" / "demo" / "medical_qa.jsonl")[:60])]
    (tmp_path / "my.json").write_text(json.dumps(rows, indent=1))
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    result = run_workflow(tmp_path, "--config", "dataset__path=my.json", 'training__target_modules=["no_such_proj"]',
                          check=False)
    assert result.returncode != 0
    run = tmp_path / "results" / "demo"
    report = json.loads((run / "data" / "report.json").read_text())
    assert report["format"] == "alpaca" and report["kept"] == 60
    assert (run / "model" / "demo" / "tokenizer.json").is_file()
    preflight_log = (run / "logs" / "preflight.log").read_text()
    assert "training.target_modules: 'no_such_proj' matches no module of the model" in preflight_log
    assert "q_proj" in preflight_log and "Traceback" not in preflight_log
    assert not (run / "logs" / "train.log").exists() and not (run / "adapters").exists()


def test_a_diverging_learning_rate_fails_training_with_the_reason_and_nothing_is_merged(tmp_path):
    """A learning rate of 1e30 overflows the LoRA weights in the first update (on any CPU): the loss is NaN at step
    2, training stops there, and the train job fails with the convergence check's reason and the fix. No adapter
    and no metrics/train.json are left to look finished; the verdict is in metrics/train.failed.json; merge never
    runs."""
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    (tmp_path / "data").symlink_to(REPO / "data")
    result = run_workflow(tmp_path, "--config", "training__learning_rate=1.0e+30", "training__max_steps=6",
                          "training__logging_steps=1", check=False)
    assert result.returncode != 0 and "Error in rule train" in result.stdout + result.stderr
    run = tmp_path / "results" / "demo"
    log = (run / "logs" / "train.log").read_text()
    assert "non-finite train loss or gradient norm at step 2: stopping training" in log
    assert "the convergence check failed, so no adapter was saved" in log
    assert "train loss is nan at step 2" in log and "lower training.learning_rate" in log
    assert "Traceback" not in log and "step 3/6" not in log
    assert not (run / "adapters").exists() and not (run / "metrics" / "train.json").exists()
    failed = json.loads((run / "metrics" / "train.failed.json").read_text())
    assert failed["convergence"]["verdict"] == "failed" and failed["steps"] == 2
    assert failed["convergence"]["checks"]["non_finite"]["status"] == "failed"
    assert not (run / "logs" / "merge.log").exists() and not (run / "merged").exists()


def test_snakemake_lint_and_snakefmt_are_clean():
    bindir = Path(sys.executable).parent
    lint = subprocess.run([*SNAKEMAKE, "--lint"], cwd=REPO, capture_output=True, text=True)
    assert lint.returncode == 0 and "Congratulations" in lint.stdout + lint.stderr, lint.stdout + lint.stderr
    fmt = subprocess.run([bindir / "snakefmt", "--check", "Snakefile", "workflow/rules"], cwd=REPO,
                         capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stderr
    ruff = subprocess.run([bindir / "ruff", "check", "scripts", "workflow", "tests"], cwd=REPO,
                          capture_output=True, text=True)
    assert ruff.returncode == 0, ruff.stdout


def test_the_overhead_bench_times_a_dry_run_and_a_noop_rerun(demo, tmp_path):
    out = tmp_path / "workflow.json"
    bench = subprocess.run([sys.executable, REPO / "scripts" / "tools" / "bench.py", "workflow", "--directory", demo,
                            "--repeats", "1", "--out", out], capture_output=True, text=True)
    assert bench.returncode == 0, bench.stderr
    report = json.loads(out.read_text())
    assert all(report[f"{name}_s"] > 0 for name in ("startup", "dry_run", "noop_rerun"))
    assert "no-op re-run" in bench.stdout
    assert planned_jobs(snakemake(demo, "--dry-run")) == set()  # timing it changed nothing


def test_the_adapter_and_the_merged_model_load_in_transformers4_servers_too(run_dir):
    for name in ("adapters", "merged"):  # vLLM on transformers 4 loads the tokenizer of either
        tokenizer = json.loads((run_dir / name / "tokenizer_config.json").read_text())
        assert tokenizer["tokenizer_class"] == "PreTrainedTokenizerFast", name
    assert json.loads((run_dir / "merged" / "config.json").read_text())["rope_theta"] > 0
