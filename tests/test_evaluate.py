"""Evaluate stage and the shared row rendering (scripts/rows.py): real transformers/peft on the tiny demo model with
an untrained (seeded random) LoRA adapter; main() runs in-process."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hpc_finetune.evaluate.scoring import token_f1
from support.common import adapter_inputs, demo_rows, write_rows

METRIC_KEYS = {
    "base_eval_loss",
    "finetuned_eval_loss",
    "base_perplexity",
    "finetuned_perplexity",
    "eval_loss_ratio",
    "train_exact_match",
    "eval_exact_match",
    "train_token_f1",
    "eval_token_f1",
    "num_samples",
    "generation_skipped",
    "generation_skipped_reason",
    "wall_time_s",
    "peak_memory",
}
SAMPLE_KEYS = {"split", "prompt", "reference", "generated", "exact", "f1"}


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model) -> dict:
    """Model record, chat train/eval data from the demo set, an adapter, and that adapter merged."""
    import merge

    root = tmp_path_factory.mktemp("evaluate")
    work = adapter_inputs(root, tiny_model, eval_rows=(10, 13), train_rows=(0, 4)) | {"merged": root / "merged"}
    merge.main(
        merge.Config(
            model_json=work["model_json"],
            adapter_dir=str(work["adapter"]),
            eval_data=str(work["eval"]),
            output_dir=str(work["merged"]),
            report_out=str(root / "merge.json"),
            dtype="float32",
        )
    )
    return work


def run(work: dict, name: str, **overrides) -> tuple[dict, list[dict]]:
    import evaluate

    values = dict(
        model_json=work["model_json"],
        finetuned=str(work["merged"]),
        train_data=str(work["train"]),
        eval_data=str(work["eval"]),
        metrics_out=str(work["root"] / f"{name}.json"),
        samples_out=str(work["root"] / f"{name}.samples.jsonl"),
        num_samples=3,
        max_new_tokens=8,
        merged=True,
        dtype="float32",
    )
    values.update(overrides)
    metrics = evaluate.main(evaluate.Config(**values))
    assert json.loads(Path(values["metrics_out"]).read_text()) == json.loads(json.dumps(metrics))
    lines = Path(values["samples_out"]).read_text().splitlines()
    return metrics, [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def merged_run(work):
    return run(work, "merged")


def finite(*values) -> bool:
    return all(isinstance(v, float) and math.isfinite(v) for v in values)


def test_merged_model_metrics_and_samples(merged_run):
    metrics, samples = merged_run
    assert METRIC_KEYS <= set(metrics)
    assert finite(metrics["base_eval_loss"], metrics["finetuned_eval_loss"], metrics["eval_loss_ratio"])
    assert finite(metrics["base_perplexity"], metrics["finetuned_perplexity"])
    assert metrics["finetuned_perplexity"] == pytest.approx(math.exp(metrics["finetuned_eval_loss"]))
    assert metrics["eval_loss_ratio"] == pytest.approx(
        metrics["base_eval_loss"] / metrics["finetuned_eval_loss"]
    )
    assert metrics["base_eval_loss"] != pytest.approx(
        metrics["finetuned_eval_loss"], abs=1e-3
    )  # the adapter acts
    assert metrics["eval_loss_rows"] == 3 and metrics["eval_loss_tokens"] > 0
    assert metrics["generation_skipped"] is False and metrics["generation_skipped_reason"] is None
    assert metrics["samples_generated"] == {"train": 3, "eval": 3} and metrics["num_samples"] == 3
    for key in ("train_exact_match", "eval_exact_match", "train_token_f1", "eval_token_f1"):
        assert 0.0 <= metrics[key] <= 1.0

    assert [s["split"] for s in samples] == ["train"] * 3 + ["eval"] * 3
    train_rows = demo_rows(0, 3)
    for sample, row in zip(samples[:3], train_rows, strict=True):
        assert SAMPLE_KEYS <= set(sample)
        assert sample["reference"] == row["messages"][-1]["content"]
        assert sample["prompt"].endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
        assert row["messages"][-2]["content"].strip() in sample["prompt"]
        assert sample["exact"] in (0.0, 1.0) and 0.0 <= sample["f1"] <= 1.0
        assert isinstance(sample["generated"], str)


def test_adapter_path_scores_like_the_merged_model(work, merged_run):
    metrics, samples = run(work, "adapter", finetuned=str(work["adapter"]), merged=False)
    merged_metrics, merged_samples = merged_run
    assert METRIC_KEYS <= set(metrics)
    assert metrics["base_eval_loss"] == pytest.approx(merged_metrics["base_eval_loss"], abs=1e-6)
    # base+adapter (unmerged) and the merged model are the same function: same loss, same greedy answers.
    assert metrics["finetuned_eval_loss"] == pytest.approx(merged_metrics["finetuned_eval_loss"], abs=1e-4)
    assert [s["generated"] for s in samples] == [s["generated"] for s in merged_samples]


def test_text_rows_skip_generation(work):
    texts = [{"text": r["messages"][-1]["content"]} for r in demo_rows(0, 6)]
    train = write_rows(work["root"] / "text-train.jsonl", texts[:4])
    eval_ = write_rows(work["root"] / "text-eval.jsonl", texts[4:])
    metrics, samples = run(work, "text", train_data=str(train), eval_data=str(eval_))
    assert metrics["generation_skipped"] is True and "text" in metrics["generation_skipped_reason"]
    assert samples == [] and metrics["data_format"] == "text"
    assert finite(metrics["base_eval_loss"], metrics["finetuned_eval_loss"], metrics["eval_loss_ratio"])
    assert metrics["train_exact_match"] is None and metrics["eval_token_f1"] is None


def test_empty_eval_data_prompt_completion_rows(work):
    rows = [
        {"prompt": f"Q: {r['messages'][-2]['content']}\nA: ", "completion": r["messages"][-1]["content"]}
        for r in demo_rows(0, 3)
    ]
    train = write_rows(work["root"] / "pc-train.jsonl", rows)
    empty = write_rows(work["root"] / "pc-eval.jsonl", [])
    metrics, samples = run(work, "empty", train_data=str(train), eval_data=str(empty))
    assert metrics["data_format"] == "prompt_completion"
    assert metrics["base_eval_loss"] is None and metrics["finetuned_eval_loss"] is None
    assert metrics["eval_loss_ratio"] is None and metrics["eval_exact_match"] is None
    assert any("eval data is empty" in note for note in metrics["notes"])
    assert finite(metrics["base_train_loss"], metrics["finetuned_train_loss"])
    assert [s["split"] for s in samples] == ["train"] * 3 and samples[0]["prompt"] == rows[0]["prompt"]
    assert metrics["generation_skipped"] is False


def test_mismatched_merged_flag_is_a_clear_error(work):
    from hpc_finetune.io.cli import StageError

    with pytest.raises(StageError, match="is an adapter, not a merged model: pass --merged false"):
        run(work, "wrong", finetuned=str(work["adapter"]), merged=True)
    with pytest.raises(StageError, match="pass --merged true"):
        run(work, "wrong", finetuned=str(work["merged"]), merged=False)
    assert token_f1("Rest, and drink water.", "rest and water") == pytest.approx(2 * 0.75 * 1 / 1.75)


# --- the shared rendering (scripts/rows.py) --------------------------------------------------------------------


def test_rows_render_as_training_does(tiny_model):
    from hpc_finetune.data.rows import detect_format, encode, render
    from hpc_finetune.io.cli import StageError
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    row = demo_rows(0, 1)[0]
    rendered = render(row, tok, "messages")
    assert rendered.prompt + rendered.answer == tok.apply_chat_template(row["messages"], tokenize=False)
    assert rendered.answer.endswith("<|eot_id|>") and rendered.reference == row["messages"][-1]["content"]
    ids, prompt_len = encode(tok, rendered, "messages")
    assert ids == tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
    assert tok.decode(ids[prompt_len:]) == rendered.answer
    assert ids.count(tok.bos_token_id) == 1

    pc = render({"prompt": "Q: fever?\nA: ", "completion": "Rest."}, tok, "prompt_completion")
    assert pc.answer == "Rest." + tok.eos_token and pc.reference == "Rest."
    ids, prompt_len = encode(tok, pc, "prompt_completion")
    assert ids[0] == tok.bos_token_id and tok.decode(ids[prompt_len:]).endswith(tok.eos_token)
    text = render({"text": "Plain text."}, tok, "text")
    assert text.prompt == "" and text.reference is None

    assert detect_format([], "x") is None
    with pytest.raises(StageError, match="differs from the first row"):
        detect_format([{"text": "a"}, {"prompt": "p", "completion": "c"}], "data.jsonl")
    with pytest.raises(StageError, match="must end with an assistant turn"):
        render({"messages": [{"role": "user", "content": "hi"}]}, tok, "messages")


def test_rule_arguments_parse():
    import evaluate
    from hpc_finetune.io.cli import parse_args

    argv = "--num-samples 16 --max-new-tokens 96 --merged false --model-json M --finetuned F --train-data T"
    argv += " --eval-data E --metrics-out X --samples-out S"
    cfg = parse_args(evaluate.Config, argv.split())
    assert (
        cfg.merged is False and cfg.num_samples == 16 and cfg.max_new_tokens == 96 and cfg.samples_out == "S"
    )
