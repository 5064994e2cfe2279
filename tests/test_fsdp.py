"""FSDP on the CPU: two processes (torchrun, gloo) train the tiny demo model with plain LoRA through PyTorch FSDP2
(Accelerate's plugin, configured by transformers' fsdp_config), stopped by SIGUSR1 after step 3 and resumed from
the sharded checkpoint; compared with one process on the same global batch (8 = 2 x 4 = 1 x 8).

FSDP + QLoRA cannot run here: bitsandbytes' CPU 4-bit kernels need uint8 storage and do not run sharded, so the
stage refuses it on the CPU (tested below) and the quant-storage path is GPU-only (untested in this suite).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import train
from hpc_finetune.io.cli import StageError
from hpc_finetune.io.files import read_jsonl
from support.common import DEMO_DATA
from support.distributed_train import torchrun_train
from support.train_stage import STEPS, STOP_AT, make_config

# fp32 on both sides: the same arithmetic up to the order of the all-reduce sums (measured: 1e-6)
LOSS_TOLERANCE = 1e-4
WEIGHT_TOLERANCE = 1e-4
PLAIN = {"quantization": "none"}


def losses(metrics: dict) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in metrics["log_history"] if "loss" in entry}


@pytest.fixture(scope="module")
def single(tiny_model, tmp_path_factory) -> dict:
    """One process, micro batch 8."""
    chats = read_jsonl(DEMO_DATA)[:40]
    cfg = make_config(tiny_model, tmp_path_factory.mktemp("single"), chats[:32], chats[32:], micro_batch_size=8,
                      **PLAIN)
    return {"metrics": train.main(cfg), "adapters": Path(cfg.output_dir)}


@pytest.fixture(scope="module")
def fsdp(tiny_model, tmp_path_factory) -> dict:
    """Two processes, micro batch 4, strategy fsdp: stopped after step 3, then run again to the end."""
    out = tmp_path_factory.mktemp("fsdp")
    settings = dict(micro_batch_size=4, strategy="fsdp", **PLAIN)
    stopped = torchrun_train(tiny_model, out, 2, stop_at=STOP_AT, **settings)
    stopped_steps = json.loads((out / "session_steps.json").read_text())
    checkpoints = sorted(p.relative_to(out) for p in out.glob("checkpoints/*/checkpoint-*/**/*") if p.is_file())
    resumed = torchrun_train(tiny_model, out, 2, **settings)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-6000:]
    result = dict(out=out, stopped=stopped, stopped_steps=stopped_steps, checkpoints=[str(c) for c in checkpoints],
                  resumed=resumed, steps=json.loads((out / "session_steps.json").read_text()),
                  metrics=json.loads((out / "metrics" / "train.json").read_text()),
                  adapter=(out / "adapters" / "adapter_model.safetensors").read_bytes())
    again = torchrun_train(tiny_model, out, 2, **settings)  # a finished run: its adapter, from its checkpoint
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-6000:]
    return result | dict(again=again, again_steps=json.loads((out / "session_steps.json").read_text()))


def test_the_stop_writes_a_sharded_checkpoint(fsdp):
    assert fsdp["stopped"].returncode != 0 and fsdp["stopped_steps"] == {"steps": STOP_AT, "status": 2}
    assert f"stopped by SIGUSR1 at step {STOP_AT}" in fsdp["stopped"].stdout + fsdp["stopped"].stderr
    names = {Path(c).relative_to(*Path(c).parts[:3]).as_posix() for c in fsdp["checkpoints"]
             if f"checkpoint-{STOP_AT}/" in c}
    # FSDP really ran (Accelerate falls back to DDP on the CPU unless told): one shard per rank, and the gathered
    # adapter next to them
    for name in ("pytorch_model_fsdp_0/.metadata", "pytorch_model_fsdp_0/__0_0.distcp",
                 "pytorch_model_fsdp_0/__1_0.distcp", "optimizer_0/.metadata", "adapter_model.safetensors",
                 "scheduler.pt", "trainer_state.json"):
        assert name in names, (name, sorted(names))
    assert "optimizer.pt" not in names


def test_the_resumed_run_continues_at_the_right_step(fsdp):
    metrics, log = fsdp["metrics"], fsdp["resumed"].stdout + fsdp["resumed"].stderr
    assert metrics["resumed_from"].endswith(f"checkpoint-{STOP_AT}") and f"resuming from checkpoint-{STOP_AT}" in log
    assert fsdp["steps"] == {"steps": STEPS - STOP_AT, "status": 0} and metrics["steps"] == STEPS
    assert metrics["strategy"] == "fsdp" and metrics["world_size"] == 2 and metrics["effective_batch_size"] == 8
    assert sorted(losses(metrics)) == list(range(1, STEPS + 1))


def test_fsdp_loss_curve_matches_one_process_on_the_same_global_batch(fsdp, single):
    one, two = losses(single["metrics"]), losses(fsdp["metrics"])
    assert one.keys() == two.keys()
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=LOSS_TOLERANCE), (step, one, two)
    assert two[STEPS] < two[1]  # it learned


def test_the_saved_adapter_is_what_peft_loads_and_matches_one_process(fsdp, single, tiny_model):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    adapters = fsdp["out"] / "adapters"
    saved = load_file(str(adapters / "adapter_model.safetensors"))
    reference = load_file(str(single["adapters"] / "adapter_model.safetensors"))
    assert saved.keys() == reference.keys() and len(saved) > 0
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                                      str(adapters))
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(saved)
    for name, value in saved.items():
        key = name.replace(".weight", ".default.weight")
        assert torch.equal(loaded[key].detach(), value), name  # exactly what PEFT loads
        assert torch.allclose(value, reference[name], atol=WEIGHT_TOLERANCE), name  # and what one process learned
    assert any((saved[n] != 0).any() for n in saved if "lora_B" in n)


def test_a_finished_fsdp_run_trains_nothing_and_keeps_its_adapter(fsdp):
    from safetensors.torch import load, load_file

    assert fsdp["again_steps"] == {"steps": 0, "status": 0}
    assert "nothing left to train" in fsdp["again"].stderr + fsdp["again"].stdout
    before, after = load(fsdp["adapter"]), load_file(str(fsdp["out"] / "adapters" / "adapter_model.safetensors"))
    assert before.keys() == after.keys() and all((before[k] == after[k]).all() for k in before)


def test_cut_off_sharded_and_deepspeed_checkpoints_are_recognised(fsdp, tmp_path):
    import shutil

    from hpc_finetune.train.control import checkpoint_problem

    source = next(fsdp["out"].glob(f"checkpoints/*/checkpoint-{STEPS}"))
    assert checkpoint_problem(source) is None
    cut = Path(shutil.copytree(source, tmp_path / "fsdp"))
    (cut / "optimizer_0" / ".metadata").unlink()
    assert "optimizer_0 is cut off" in checkpoint_problem(cut)
    # DeepSpeed's layout (GPU-only here, so built by hand): `latest` names the tag directory of its own states
    ds = Path(shutil.copytree(source, tmp_path / "ds", ignore=shutil.ignore_patterns("optimizer_0", "pytorch_*")))
    (ds / "latest").write_text(f"global_step{STEPS}")
    assert "missing or empty" in checkpoint_problem(ds)
    (ds / f"global_step{STEPS}").mkdir()
    (ds / f"global_step{STEPS}" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    assert checkpoint_problem(ds) is None


def test_the_setup_table_shows_the_strategy(fsdp):
    log = fsdp["resumed"].stdout + fsdp["resumed"].stderr
    assert re.search(r"strategy\s+fsdp \(training.strategy fsdp", log), log[-4000:]
    assert re.search(r"shards\s+weights, gradients, optimizer state in 2 shards \(FSDP\)", log)
    assert re.search(r"memory per GPU\s+", log) and re.search(r"device\s+cpu, bf16 False, world size 2", log)


def test_fsdp_with_4bit_is_refused_on_the_cpu(tiny_model, tmp_path):
    chats = read_jsonl(DEMO_DATA)[:40]
    cfg = make_config(tiny_model, tmp_path, chats[:32], chats[32:], strategy="fsdp", quantization="4bit")
    with pytest.raises(StageError, match="training.strategy fsdp with training.quantization 4bit needs GPUs"):
        train.main(cfg)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").glob("*/checkpoint-*"))
