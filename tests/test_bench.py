"""Performance: `make bench` (scripts/tools/bench.py train) runs on the CPU and writes its table, and so does
`bench.py data`; every speed lever of the train stage reaches SFTConfig or the model loading; padding-free batches keep rows apart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import train
from hpc_finetune.io.cli import StageError
from hpc_finetune.train import setup as train_setup
from hpc_finetune.train import speed as train_speed
from hpc_finetune.train.run import PATH_FIELDS
from support.common import REPO, SCRIPTS


def config(tmp_path: Path, **overrides) -> train.Config:
    return train.Config(**{f: str(tmp_path / f) for f in PATH_FIELDS}, **overrides)


def args_for(tmp_path: Path, cpu: bool = True, **overrides):
    return train_setup.sft_config(config(tmp_path, **overrides), tmp_path / "run", cpu=cpu, bf16=False, has_eval=False,
                            resuming=False, mode="full", trust_remote_code=False)


def test_bench_train_runs_ours_and_the_baseline_and_writes_json(tmp_path, tiny_model):
    """The tiny model, a few steps: both runs finish, the table is printed and the JSON has every figure."""
    import shutil

    shutil.copytree(tiny_model, tmp_path / "models" / "demo")  # what bench.py would build first
    out = tmp_path / "train.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "tools" / "bench.py"), "train", "--preset", "demo", "--steps", "2", "--warmup", "1",
         "--max-seq-length", "64", "--work", str(tmp_path), "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ours / baseline:" in proc.stdout and "tokens/s" in proc.stdout
    report = json.loads(out.read_text())
    assert report["settings"]["max_seq_length"] == 64 and report["settings"]["quantization"] == "4bit"
    for kind in ("baseline", "ours"):
        result = report["results"][kind]
        assert result["tokens_per_s"] > 0 and result["step_time_s"] > 0 and result["timed_steps"] == 1
        assert result["peak_rss_mb"] > 100 and 0 < result["mfu"] < 1
        assert result["parameters"] > 100_000  # the 4-bit base counted unpacked, plus LoRA
    assert report["speedup_tokens_per_s"] == pytest.approx(
        report["results"]["ours"]["tokens_per_s"] / report["results"]["baseline"]["tokens_per_s"])
    assert report["ours_levers"]["padding_free"] == "auto"


def test_bench_data_measures_the_data_stage_and_the_train_loading(tmp_path, tiny_model):
    """bench.py data on 600 generated rows: the stage keeps what the generator made (6 repeats, 1 empty answer),
    and the JSON has rows/s and the peak RSS of the stage and of the train stage's data loading."""
    import shutil

    shutil.copytree(tiny_model, tmp_path / "data" / "model")  # what bench.py would build first
    out = tmp_path / "data.json"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "tools" / "bench.py"), "data", "--rows", "600", "--formats",
                           "jsonl", "csv", "parquet", "--work", str(tmp_path), "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "600 rows jsonl" in proc.stdout and "600 rows parquet" in proc.stdout and "rows/s" in proc.stdout
    sizes = json.loads(out.read_text())["sizes"]
    assert [s["format"] for s in sizes] == ["jsonl", "csv", "parquet"]
    for size in sizes:  # the same rows whatever the file type: the same drops
        assert size["rows"] == 600 and size["kept"] == 600 - 6 - 1, size
        assert size["rows_per_s"] > 0 and size["rows_per_cpu_s"] > 0
        assert size["peak_rss_mb"] > 100 and size["train_load_peak_rss_mb"] > 100 and size["train_load_s"] > 0


def test_bench_workflow_runs_times_planning_experiments_of_n_runs(tmp_path):
    """bench.py workflow --runs: a dry run of a sweep of N runs from nothing, one project each; the JSON has the
    jobs each planned (6 per run, plus the shared model, data and base evaluation stages and the leaderboard)."""
    out = tmp_path / "runs.json"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "tools" / "bench.py"), "workflow", "--runs", "1", "3",
                           "--repeats", "1", "--work", str(tmp_path), "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert "3 runs (24 jobs)" in proc.stdout
    runs = json.loads(out.read_text())["runs"]
    assert {n: r["jobs"] for n, r in runs.items()} == {"1": 12, "3": 24}
    assert all(r["dry_run_s"] > 0 and r["dry_run_cpu_s"] > 0 for r in runs.values())


def test_default_levers_reach_sft_config(tmp_path):
    args = args_for(tmp_path)
    assert args.padding_free is False and args.max_length == 2048  # auto: padding-free only with flash attention
    assert args.activation_checkpointing is True
    assert args.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert args.torch_compile is False and args.use_liger_kernel is False
    assert args.dataloader_num_workers == 0 and args.dataloader_pin_memory is False  # CPU: nothing to pin for
    assert args.model_init_kwargs["attn_implementation"] == "sdpa"  # auto without flash-attn / a GPU
    assert args.optim == "paged_adamw_8bit"


@pytest.mark.parametrize("overrides, expected", [
    ({"padding_free": False}, {"padding_free": False, "max_length": 2048}),
    ({"padding_free": "true"}, {"padding_free": True, "max_length": None}),  # the data stage enforces the length
    ({"packing": True}, {"packing": True, "max_length": 2048}),  # TRL: bfd packing is padding-free anyway
    ({"gradient_checkpointing_mode": "reentrant"}, {"activation_checkpointing_kwargs": {"use_reentrant": True}}),
    ({"gradient_checkpointing_mode": "offload", "gradient_checkpointing_every_n_layers": 2},
     {"activation_checkpointing_kwargs": {"use_reentrant": False, "offload": True, "every_n_layers": 2}}),
    ({"gradient_checkpointing": False}, {"activation_checkpointing": False, "activation_checkpointing_kwargs": None}),
    ({"torch_compile": True}, {"torch_compile": True}),
    ({"dataloader_num_workers": 2}, {"dataloader_num_workers": 2, "dataloader_persistent_workers": True}),
    ({"optim": "adamw_torch"}, {"optim": "adamw_torch"}),
])
def test_each_lever_reaches_sft_config(tmp_path, overrides, expected):
    args = args_for(tmp_path, **overrides)
    assert {k: getattr(args, k) for k in expected} == expected


def test_padding_free_auto_follows_flash_attention(tmp_path):
    assert train_speed.resolve_padding_free("auto", "flash_attention_2") is True
    assert train_speed.resolve_padding_free("auto", "sdpa") is False
    assert train_speed.resolve_padding_free(True, "sdpa") is True
    cfg = config(tmp_path)
    assert train_speed.speed_settings(cfg, cpu=False, new_name=True, attention="flash_attention_2")["padding_free"] is True
    with pytest.raises(StageError, match="true, false or auto"):
        train_speed.resolve_padding_free("maybe", "sdpa")


def test_auto_attention_is_sdpa_without_flash_attn_or_bf16(monkeypatch):
    import importlib.util

    assert train_speed.attention_implementation("auto", cpu=True) == "sdpa"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "flash_attn" else None)
    assert train_speed.attention_implementation("auto", cpu=False, bf16=True) == "flash_attention_2"
    assert train_speed.attention_implementation("auto", cpu=False, bf16=False) == "sdpa"  # flash-attn has no fp32 kernels


def test_pin_memory_on_a_gpu(tmp_path):
    cfg = config(tmp_path)
    assert train_speed.speed_settings(cfg, cpu=False, new_name=True)["dataloader_pin_memory"] is True
    cfg = config(tmp_path, dataloader_pin_memory=False)
    assert train_speed.speed_settings(cfg, cpu=False, new_name=True)["dataloader_pin_memory"] is False


@pytest.mark.parametrize("overrides, message", [
    ({"attn_implementation": "flash_attention_2"}, "needs a GPU"),
    ({"attn_implementation": "flash"}, "must be one of"),
    ({"gradient_checkpointing_mode": "fast"}, "must be one of"),
    ({"liger_kernels": True}, "liger-kernel package and a GPU"),
])
def test_impossible_levers_are_clear_errors(tmp_path, overrides, message):
    with pytest.raises(StageError, match=message):
        args_for(tmp_path, **overrides)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_choice_reaches_the_loaded_model(tiny_model, tmp_path, attn):
    from datasets import Dataset
    from transformers import AutoTokenizer

    cfg = config(tmp_path, attn_implementation=attn, quantization="none", max_steps=1, lora_r=2,
                 target_modules=["q_proj"])
    args = train_setup.sft_config(cfg, tmp_path / "run", cpu=True, bf16=False, has_eval=False, resuming=False,
                            mode="full", trust_remote_code=False)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    trainer = train_setup.build_trainer(cfg, str(tiny_model), args, tok, Dataset.from_list([{"text": "a b c"}] * 2), None, [])
    assert trainer.model.config._attn_implementation == attn


def test_padding_free_batches_keep_rows_apart(tiny_model):
    """What padding_free (the default) relies on: with sdpa, a flattened micro-batch gives each row the logits it
    has alone (transformers masks across the restarted position ids), so no row sees another."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    rows = [list(range(5, 25)), list(range(30, 38)), list(range(40, 52))]
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([{"input_ids": r} for r in rows])
    with torch.inference_mode():
        flat = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for row in rows:
            alone = model(input_ids=torch.tensor([row]), use_cache=False).logits[0]
            assert (flat[start:start + len(row)] - alone).abs().max() < 1e-4
            start += len(row)


def test_overrides_are_typed_like_the_stage_command_line():
    from tools.benchmarks.train import overrides

    assert overrides(["packing=false", "dataloader_num_workers=2", "attn_implementation=eager"]) == {
        "packing": False, "dataloader_num_workers": 2, "attn_implementation": "eager"}
