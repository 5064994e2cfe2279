"""Train stage with the real TRL / PEFT / bitsandbytes on the tiny demo model, on the CPU, a few steps per run.

One 4-bit QLoRA run, stopped by SIGUSR1 after step 3 and then resumed to step 8, is shared by the tests that
inspect QLoRA training, the adapter, the metrics and resuming. The other runs take 1-3 steps each.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import train
from hpc_finetune.data.rows import to_prompt_completion
from hpc_finetune.io.cli import StageError, parse_args
from hpc_finetune.io.files import read_json, read_jsonl
from hpc_finetune.train import control as train_control
from hpc_finetune.train import data as train_data
from hpc_finetune.train import fingerprint
from hpc_finetune.train import setup as train_setup
from hpc_finetune.train.run import PATH_FIELDS, failed_metrics_path
from support.common import DEMO_DATA
from support.train_stage import STEPS, STOP_AT, make_config
from transformers import TrainerCallback


class StepCounter(TrainerCallback):
    """Optimizer steps taken in this run (a resumed run takes fewer)."""

    steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


class SignalAt(TrainerCallback):
    """Sends this process SIGUSR1 after the given step, as Slurm does before the time limit."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


@contextmanager
def captured_log():
    """The stage's log lines (logger "finetune") while the block runs."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("finetune")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def run(cfg: train.Config, *callbacks) -> tuple[dict | StageError, str, int]:
    """(metrics, or the StageError it stopped with; the log; optimizer steps taken in this run)."""
    counter = StepCounter()
    with captured_log() as lines:
        try:
            result = train.main(cfg, callbacks=(counter, *callbacks))
        except StageError as err:
            result = err
    return result, "\n".join(lines), counter.steps


@pytest.fixture(scope="module")
def chats() -> list[dict]:
    return read_jsonl(DEMO_DATA)[:40]


@pytest.fixture(scope="module")
def qlora(tiny_model, chats, tmp_path_factory) -> dict:
    """4-bit QLoRA on chat data: stopped by SIGUSR1 after step 3, then run again to the end."""
    cfg = make_config(tiny_model, tmp_path_factory.mktemp("qlora"), chats[:32], chats[32:])
    stopped, stopped_log, stopped_steps = run(cfg, SignalAt(STOP_AT))
    checkpoints_after_stop = sorted(p.name for p in Path(cfg.checkpoint_root).glob("*/checkpoint-*"))
    metrics, log, steps = run(cfg)
    return dict(cfg=cfg, stopped=stopped, stopped_log=stopped_log, stopped_steps=stopped_steps,
                checkpoints_after_stop=checkpoints_after_stop, metrics=metrics, log=log, steps=steps)


def test_qlora_trains_and_learns(qlora):
    m = qlora["metrics"]
    assert isinstance(m, dict), m
    assert m["quantization"] == "4bit" and m["device"] == "cpu" and m["loss_mode"] == "assistant_only"
    assert 0 < m["trainable_params"] < m["total_params"]
    assert m["adapter_max_abs_change"] > 0
    assert m["steps"] == STEPS and m["tokens"] > 0 and m["effective_batch_size"] == 8 and m["world_size"] == 1
    assert m["train_loss_last"] < m["train_loss_first"] * 0.85
    eval_steps = [e["step"] for e in m["log_history"] if "eval_loss" in e]
    assert eval_steps[0] == 0, "the baseline eval loss is measured before training"
    assert m["eval_loss_last"] < m["eval_loss_first"] * 0.9
    assert read_json(qlora["cfg"].metrics_out) == json.loads(json.dumps(m))
    assert list(Path(qlora["cfg"].tensorboard_dir).glob("events.out.tfevents.*"))
    for line in ("Training setup", "effective batch", "Training summary"):
        assert line in qlora["log"]
    assert "step 8/8 (100%) | epoch" in qlora["log"] and "tok/s | elapsed" in qlora["log"]


def test_adapter_is_saved_whole_and_loads_with_peft(qlora, tiny_model):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(qlora["cfg"].output_dir)
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (out / name).is_file(), name
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".adapters")], "temporary dirs left"
    assert "{% generation %}" in AutoTokenizer.from_pretrained(out).chat_template
    ids = torch.tensor([[1, 20, 30, 40]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, out)
    assert (tuned(ids).logits - before).abs().max() > 1e-3


def test_signal_saves_a_checkpoint_and_the_next_run_resumes(qlora):
    assert isinstance(qlora["stopped"], StageError)
    assert "SIGUSR1" in str(qlora["stopped"]) and "resume" in str(qlora["stopped"])
    assert qlora["stopped_steps"] == STOP_AT and f"checkpoint-{STOP_AT}" in qlora["checkpoints_after_stop"]
    assert "starting fresh" in qlora["stopped_log"]
    assert f"resuming from checkpoint-{STOP_AT}" in qlora["log"]
    assert qlora["steps"] == STEPS - STOP_AT, "the resumed run only trains the remaining steps"
    m = qlora["metrics"]
    assert m["resumed_from"].endswith(f"checkpoint-{STOP_AT}")
    assert [e["step"] for e in m["log_history"] if "loss" in e][:2] == [1, 2], "history of the first part kept"


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, chats, tmp_path_factory) -> dict:
    """The qlora fixture's settings and rows, trained to the end in one go."""
    cfg = make_config(tiny_model, tmp_path_factory.mktemp("uninterrupted"), chats[:32], chats[32:])
    metrics, _, steps = run(cfg)
    assert isinstance(metrics, dict) and steps == STEPS, metrics
    return dict(cfg=cfg, metrics=metrics)


def adapter_weights(cfg: train.Config) -> dict:
    from safetensors.torch import load_file

    return load_file(Path(cfg.output_dir) / "adapter_model.safetensors")


def losses(metrics: dict) -> list[tuple[int, str, float]]:
    return [(e["step"], k, e[k]) for e in metrics["log_history"] for k in ("loss", "eval_loss") if k in e]


def test_the_resumed_run_is_the_uninterrupted_run(qlora, uninterrupted):
    """Stopped after step 3 and resumed, the run computes what one uninterrupted run of the same settings computes:
    the same fingerprint, loss curve and adapter, bit for bit. The trainer restores the RNG states and skips the
    batches already seen; the adapter must come back in the dtype it trains in (bf16 under 4-bit): resumed in
    float32, as the trainer's load did by default, the curves parted after the stop (weights 1.7e-3 apart, loss
    2e-3, on a largest weight of 0.15) and the adapter was saved in float32."""
    resumed, whole = qlora["metrics"], uninterrupted["metrics"]
    assert resumed["resumed_from"] and whole["resumed_from"] is None
    assert resumed["fingerprint"] == whole["fingerprint"]
    assert losses(resumed) == losses(whole)
    mine, theirs = adapter_weights(qlora["cfg"]), adapter_weights(uninterrupted["cfg"])
    assert mine.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert mine[name].dtype == tensor.dtype and mine[name].equal(tensor), name


def test_rerun_of_a_finished_run_trains_nothing(qlora):
    import torch
    from safetensors.torch import load_file

    weights = load_file(Path(qlora["cfg"].output_dir) / "adapter_model.safetensors")
    metrics, log, steps = run(qlora["cfg"])
    assert steps == 0 and "nothing left to train" in log
    assert metrics["steps"] == STEPS and metrics["resumed_from"].endswith(f"checkpoint-{STEPS}")
    again = load_file(Path(qlora["cfg"].output_dir) / "adapter_model.safetensors")
    assert all(again[k].dtype == v.dtype and torch.equal(again[k], v) for k, v in weights.items())


def test_the_convergence_verdict_covers_the_whole_resumed_run(qlora):
    verdict = qlora["metrics"]["convergence"]
    assert verdict["verdict"] in ("ok", "warning") and verdict["best_step"] == STEPS, verdict
    checks = verdict["checks"]
    assert checks["non_finite"]["status"] == checks["improvement"]["status"] == "ok", checks
    assert "(step 1) -> best" in checks["improvement"]["detail"], "the first session's steps are judged too"
    assert checks["learning_rate"]["status"] == "ok", "the schedule went on where the stopped session left it"
    assert f"at {STEPS} logged steps" in checks["learning_rate"]["detail"]
    assert "convergence" in qlora["log"] and f"{verdict['verdict']} (best eval at step {STEPS})" in qlora["log"]
    assert not failed_metrics_path(qlora["cfg"].metrics_out).exists()


def test_a_changed_threshold_rechecks_the_finished_run_without_training(qlora, tiny_model, chats, tmp_path):
    """training.convergence is left out of the fingerprint: the finished run's checkpoint is judged again. A failed
    verdict stops the stage with its reason and no adapter, its metrics next to metrics_out; fail_stage false saves
    the adapter and reports it."""
    strict = {"tolerance": 0.999}  # the train loss must fall by 99.9%: it cannot in 8 steps
    cfg = make_config(tiny_model, tmp_path / "strict", chats[:32], chats[32:], convergence=strict,
                      checkpoint_root=qlora["cfg"].checkpoint_root)
    result, log, steps = run(cfg)
    assert isinstance(result, StageError) and steps == 0 and "nothing left to train" in log
    assert "convergence check failed, so no adapter was saved" in str(result)
    assert "train loss never improved on its first value" in str(result) and "training.learning_rate" in str(result)
    assert not Path(cfg.output_dir).exists() and not Path(cfg.metrics_out).exists()
    failed = read_json(failed_metrics_path(cfg.metrics_out))
    assert failed["convergence"]["verdict"] == "failed" and failed["steps"] == STEPS
    assert str(failed_metrics_path(cfg.metrics_out)) in str(result)
    cfg = dataclasses.replace(cfg, convergence={**strict, "fail_stage": False})
    metrics, log, steps = run(cfg)
    assert isinstance(metrics, dict) and steps == 0 and metrics["convergence"]["verdict"] == "failed"
    assert (Path(cfg.output_dir) / "adapter_model.safetensors").is_file()
    assert not failed_metrics_path(cfg.metrics_out).exists(), "the failed attempt's metrics are gone"
    assert "convergence failed: train loss never improved" in log


def test_changed_setting_does_not_resume(qlora, tiny_model, chats, tmp_path):
    cfg = make_config(tiny_model, tmp_path, chats[:32], chats[32:], learning_rate=5e-3,
                      checkpoint_root=qlora["cfg"].checkpoint_root)
    result, log, steps = run(cfg, SignalAt(1))
    assert isinstance(result, StageError) and steps == 1
    assert "starting fresh" in log and "resuming" not in log
    assert "training.learning_rate 0.02 -> 0.005 changed since the checkpoints in" in log, log
    assert len([p for p in Path(cfg.checkpoint_root).iterdir() if p.is_dir()]) == 2, "a second fingerprint directory"


def test_the_fingerprint_covers_the_training_code(qlora, tmp_path):
    """The train program's import closure is part of the fingerprint: other code never resumes these checkpoints."""
    record = json.loads((Path(qlora["metrics"]["checkpoint_dir"]) / "fingerprint.json").read_text())
    assert "hpc_finetune/train/quantized.py" in record["code_files"] and "train.py" in record["code_files"]
    changed = record | {"code_sha256": "0" * 64,
                        "code_files": record["code_files"] | {"hpc_finetune/train/quantized.py": "0" * 16}}
    assert fingerprint.fingerprint(changed) != fingerprint.fingerprint(record) == qlora["metrics"]["fingerprint"]
    root = tmp_path / "checkpoints"
    (root / "old").mkdir(parents=True)
    (root / "old" / "fingerprint.json").write_text(json.dumps(record))
    assert "the training code (hpc_finetune/train/quantized.py) changed" in fingerprint.why_fresh(root, changed, "new")


def test_early_stopping_keeps_the_best_adapter(tiny_model, chats, tmp_path):
    cfg = make_config(tiny_model, tmp_path, chats[:16], chats[32:36], max_steps=2, early_stopping_patience=1,
                      eval_steps=2, save_steps=3)
    m, log, _ = run(cfg)
    assert isinstance(m, dict), m
    assert "saving every 2 steps" in log, "save steps aligned with eval steps, as load_best_model_at_end needs"
    assert m["eval_loss_best"] == min(e["eval_loss"] for e in m["log_history"] if "eval_loss" in e)
    assert m["convergence"]["best_eval_loss"] == m["eval_loss_best"], "the check names the best the trainer kept"


@pytest.mark.parametrize("cut", ["adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                                 "trainer_state.json"])
def test_incomplete_checkpoints_are_skipped(qlora, tmp_path, cut):
    """A checkpoint whose saving was cut off (any of its files short) is set aside, and the one before it taken."""
    run_dir = tmp_path / "run"
    shutil.copytree(Path(qlora["metrics"]["checkpoint_dir"]), run_dir)
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    assert train_control.find_resume_checkpoint(run_dir, is_main=True) == run_dir / "checkpoint-8"
    damaged = run_dir / "checkpoint-8" / cut
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # the process died while writing it
    assert train_control.find_resume_checkpoint(run_dir, is_main=True) == run_dir / "checkpoint-4"
    assert (run_dir / "broken-checkpoint-8").is_dir(), "set aside, out of the trainer's rotation"
    (run_dir / "checkpoint-4" / "trainer_state.json").unlink()
    assert train_control.find_resume_checkpoint(run_dir, is_main=True) is None


@pytest.mark.parametrize("quantization", ["8bit", "none"])
def test_other_load_paths_train(quantization, qlora, tiny_model, chats, tmp_path):
    cfg = make_config(tiny_model, tmp_path, chats[:16], [], quantization=quantization, max_steps=2)
    m, _, steps = run(cfg)
    assert isinstance(m, dict), m
    assert steps == 2 and m["quantization"] == quantization and m["adapter_max_abs_change"] > 0
    assert m["trainable_params"] == qlora["metrics"]["trainable_params"]
    assert m["total_params"] == qlora["metrics"]["total_params"], "4-bit parameters counted unpacked"
    assert m["eval_loss_first"] is None, "no eval data: no evaluation"


@pytest.mark.parametrize("shape", ["prompt_completion", "text"])
def test_prompt_completion_and_text_data_train(shape, tiny_model, chats, tmp_path):
    def convert(chat):
        user, answer = chat["messages"][-2]["content"], chat["messages"][-1]["content"]
        if shape == "text":
            return {"text": f"Question: {user}\nAnswer: {answer}"}
        return {"prompt": f"Question: {user}\nAnswer:", "completion": f" {answer}"}

    rows = [convert(c) for c in chats]
    m, _, _ = run(make_config(tiny_model, tmp_path, rows[:16], rows[32:36], max_steps=3, eval_steps=10))
    assert isinstance(m, dict), m
    assert m["data_format"] == shape
    assert m["loss_mode"] == ("full" if shape == "text" else "completion_only")
    assert m["train_loss_last"] < m["train_loss_first"] and m["eval_loss_last"] < m["eval_loss_first"]
    assert [e["step"] for e in m["log_history"] if "eval_loss" in e] == [0, 3], "baseline and after the last step"


@pytest.fixture(scope="module")
def llama31_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with Llama-3.1-Instruct's stock chat template (as TRL ships it): no {% generation %}."""
    import trl

    model = tmp_path_factory.mktemp("llama31") / "model"
    shutil.copytree(tiny_model, model)
    shutil.copy(Path(trl.__file__).parent / "chat_templates" / "llama3_1.jinja", model / "chat_template.jinja")
    return model


def test_stock_template_without_generation_markers_trains_prompt_completion(llama31_model, chats, tmp_path):
    m, log, _ = run(make_config(llama31_model, tmp_path, chats[:16], [], max_steps=2))
    assert isinstance(m, dict), m
    assert m["loss_mode"] == "completion_only" and "no {% generation %} markers" in log


@pytest.mark.parametrize("template", ["demo", "llama3.1"])
def test_loss_covers_only_the_reply(template, tiny_model, llama31_model, chats, tmp_path):
    """With either template the tokens that carry loss are exactly the assistant's reply and its end of turn."""
    from transformers import AutoTokenizer

    model = tiny_model if template == "demo" else llama31_model
    cfg = make_config(model, tmp_path, chats[:2], [], quantization="none")
    tokenizer = AutoTokenizer.from_pretrained(model)
    mode = train_data.loss_mode("messages", tokenizer, assistant_only=True)
    args = train_setup.sft_config(cfg, tmp_path / "ckpt", cpu=True, bf16=False, has_eval=False, resuming=False,
                            mode=mode, trust_remote_code=False)
    dataset = train_data.to_dataset(chats[:2], "messages", mode)
    example = train_setup.build_trainer(cfg, str(model), args, tokenizer, dataset, None, []).train_dataset[0]
    trained = [token for token, label in zip(example["input_ids"], example["labels"], strict=True) if label != -100]
    assert mode == ("assistant_only" if template == "demo" else "completion_only")
    assert tokenizer.decode(trained) == chats[0]["messages"][-1]["content"] + "<|eot_id|>"


def test_to_prompt_completion_keeps_earlier_turns_as_context():
    turns = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]
    assert to_prompt_completion(turns) == {"prompt": turns[:4], "completion": turns[4:]}
    with pytest.raises(StageError, match="no assistant turn"):
        to_prompt_completion(turns[:2])


def test_bad_data_is_a_clear_error(tmp_path, tiny_model, chats):
    cfg = make_config(tiny_model, tmp_path, chats[:2] + [{"text": "x"}], [])
    with pytest.raises(StageError, match="mixed formats"):
        train_data.read_data(cfg.train_data, cfg.eval_data)
    cfg = make_config(tiny_model, tmp_path, [], [])
    with pytest.raises(StageError, match="no rows"):
        train_data.read_data(cfg.train_data, cfg.eval_data)
    cfg = make_config(tiny_model, tmp_path, chats[:2], [{"text": "x"}])
    with pytest.raises(StageError, match="training data is messages"):
        train_data.read_data(cfg.train_data, cfg.eval_data)


def test_the_rows_are_read_memory_mapped(tmp_path, tiny_model, chats):
    """The train stage reads the prepared rows as Arrow from datasets' cache (memory-mapped), not as a list."""
    cfg = make_config(tiny_model, tmp_path, chats * 50, [])
    rows, eval_rows, fmt = train_data.read_data(cfg.train_data, cfg.eval_data)
    assert (fmt, len(rows), eval_rows) == ("messages", len(chats) * 50, [])
    assert rows.cache_files and all(f["filename"].endswith(".arrow") for f in rows.cache_files)
    assert rows[len(chats)] == chats[0]
    pc = train_data.to_dataset(rows, fmt, "completion_only")
    assert pc[0] == to_prompt_completion(chats[0]["messages"]) and pc.cache_files


@pytest.mark.parametrize("preset", ["demo", "llama3-8b-medical"])
def test_arguments_from_the_rule_parse(preset):
    """What the rule passes (every key of `training:` as --key value) parses into Config unchanged."""
    from hpc_finetune.workflow import config as helpers
    from hpc_finetune.workflow.paths import stage_args

    training = helpers.resolve_config({"run_name": "t", "preset": preset})["training"]
    paths = " ".join(f"--{f.replace('_', '-')} /x/{f}" for f in PATH_FIELDS)
    cfg = parse_args(train.Config, shlex.split(f"{stage_args(**training)} {paths}"))
    for key, value in training.items():
        assert getattr(cfg, key) == (str(value).lower() if key == "bf16" else value), key
    assert train_setup.resolve_bf16(cfg.bf16, {"bf16": True}) is (training["bf16"] in ("auto", True))


def test_config_defaults_are_the_schema_defaults():
    from hpc_finetune.workflow import config as helpers

    schema = helpers.load_schema()["properties"]["training"]["properties"]
    defaults = train.Config(**{f: "" for f in PATH_FIELDS})
    assert {k: getattr(defaults, k) for k in schema} == {k: v["default"] for k, v in schema.items()}


def test_list_null_and_boolean_arguments():
    paths = [arg for f in PATH_FIELDS for arg in (f"--{f.replace('_', '-')}", f"/x/{f}")]
    cfg = parse_args(train.Config, [*paths, "--target-modules", '["q_proj","v_proj"]', "--bf16", "false",
                                    "--early-stopping-patience", "null", "--packing", "true"])
    assert cfg.target_modules == ["q_proj", "v_proj"] and cfg.early_stopping_patience is None and cfg.packing is True
    assert train_setup.resolve_bf16(cfg.bf16, {"bf16": True}) is False
    with pytest.raises(StageError, match="true, false or auto"):
        train_setup.resolve_bf16("maybe", {})
