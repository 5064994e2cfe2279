"""Evaluate stage and the shared row rendering (hpc_finetune.data.rows): real transformers/peft on the tiny demo
model with an untrained (seeded random) LoRA adapter; main() runs in-process. The scores, the label rule, the
classification metrics and the report on known values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hpc_finetune.data.rows import Rendered
from hpc_finetune.evaluate.labels import UNMATCHED, detect, to_label
from hpc_finetune.evaluate.metrics import classification, classification_metrics, sample_rows
from hpc_finetune.evaluate.report import SAMPLE_COLUMNS, ahead, comparison_rows, fmt, write_samples_csv
from hpc_finetune.evaluate.scoring import rouge_l, token_f1
from support.common import demo_rows, write_rows
from support.evaluate_stage import make_work, read_csv, run

METRIC_KEYS = {
    "base_eval_loss",
    "finetuned_eval_loss",
    "base_perplexity",
    "finetuned_perplexity",
    "eval_loss_ratio",
    "base_eval_exact_match",
    "eval_exact_match",
    "eval_token_f1",
    "scored_on",
    "metrics",
    "classification",
    "lm_eval",
    "num_samples",
    "generation_skipped",
    "generation_skipped_reason",
    "wall_time_s",
    "peak_memory",
}
SAMPLE_KEYS = {"index", "split", "question", "prompt", "reference", "base_answer", "finetuned_answer", "base_exact",
               "finetuned_exact", "base_f1", "finetuned_f1", "base_rouge_l", "finetuned_rouge_l"}
LOSS_TOLERANCE = 1e-6  # relative, the stage's answer loss against the one computed by hand
SIDE = ["answer loss", "perplexity", "exact match", "token F1", "ROUGE-L F"]


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model) -> dict:
    return make_work(tmp_path_factory.mktemp("evaluate"), tiny_model)


@pytest.fixture(scope="module")
def merged_run(work):
    return run(work, "merged")


def finite(*values) -> bool:
    return all(isinstance(v, float) and math.isfinite(v) for v in values)


def test_without_a_test_set_the_eval_rows_are_scored_and_the_report_says_so(merged_run, work):
    metrics, samples = merged_run
    assert METRIC_KEYS <= set(metrics)
    assert finite(metrics["base_eval_loss"], metrics["finetuned_eval_loss"], metrics["eval_loss_ratio"])
    assert finite(metrics["base_perplexity"], metrics["finetuned_perplexity"])
    assert metrics["finetuned_perplexity"] == pytest.approx(math.exp(metrics["finetuned_eval_loss"]))
    assert metrics["eval_loss_ratio"] == pytest.approx(metrics["base_eval_loss"] / metrics["finetuned_eval_loss"])
    assert metrics["base_eval_loss"] != pytest.approx(metrics["finetuned_eval_loss"], abs=1e-3)  # the adapter acts
    assert metrics["eval_loss_rows"] == 3 and metrics["eval_loss_tokens"] > 0
    assert metrics["generation_skipped"] is False and metrics["samples_generated"] == 3
    assert metrics["scored_on"]["fallback"] is True and metrics["scored_on"]["split"] == "eval"
    assert any("no test set" in note for note in metrics["notes"])
    report = (work["root"] / "merged.report.txt").read_text()
    assert "held-out eval rows (no test set" in report and "no test set" in report

    eval_rows = demo_rows(10, 13)
    assert [s["split"] for s in samples] == ["eval"] * 3
    for sample, row in zip(samples, eval_rows, strict=True):
        assert SAMPLE_KEYS <= set(sample)
        assert sample["reference"] == row["messages"][-1]["content"]
        assert sample["question"] == row["messages"][-2]["content"]
        assert sample["prompt"].endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
        for model in ("base", "finetuned"):
            answer = sample[f"{model}_answer"]
            assert isinstance(answer, str)
            assert sample[f"{model}_exact"] == float(answer.strip() == sample["reference"].strip())
            assert sample[f"{model}_f1"] == pytest.approx(token_f1(answer, sample["reference"]), abs=1e-4)
            assert sample[f"{model}_rouge_l"] == pytest.approx(rouge_l(answer, sample["reference"]), abs=1e-4)
    # the side-by-side metrics are the means of the per-sample scores, for both models
    side = metrics["metrics"]
    for name, key in (("exact_match", "exact"), ("token_f1", "f1"), ("rouge_l", "rouge_l")):
        for model in ("base", "finetuned"):
            assert side[name][model] == pytest.approx(sum(s[f"{model}_{key}"] for s in samples) / 3, abs=1e-4)
        assert side[name]["rows"] == 3
    assert side["answer_loss"] == {"base": metrics["base_eval_loss"], "finetuned": metrics["finetuned_eval_loss"],
                                   "rows": 3}


def answer_loss_by_hand(model_dir: Path, rows: list[dict]) -> dict:
    """The answer loss computed here, apart from the product: each chat row alone (no batch, no padding) through
    the model in float32, log-probabilities in float64. The answer is what the chat template renders after the
    prompt (every turn but the last, with the generation prompt): the tokens of the whole chat whose characters
    end past the prompt's (offsets, not the product's comparison of two tokenisations); each is predicted from
    the tokens before it. The loss is the sum of their negative log-likelihoods over the number of answer tokens of
    all rows. Also what other definitions would give, so that the test shows it tells them apart."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    answers, prompts, last_turn_ends = [], [], []
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, tokenize=False)
        chat = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        assert chat.startswith(prompt) and row["messages"][-1]["content"] in chat[len(prompt):]
        encoded = tokenizer(chat, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
        nll = [-float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]  # nll[i - 1]: token i given the ones before
        first = next(i for i, (_, end) in enumerate(encoded["offset_mapping"]) if end > len(prompt))
        assert first > 0
        answers.append(nll[first - 1:])
        prompts.append(nll[: first - 1])
        last_turn_ends.append(ids[-1] == tokenizer.convert_tokens_to_ids("<|eot_id|>"))
    tokens = sum(len(a) for a in answers)
    return {
        "loss": sum(map(sum, answers)) / tokens,
        "tokens": tokens,
        "other definitions": {
            "mean of the rows' means": sum(sum(a) / len(a) for a in answers) / len(answers),
            "prompt tokens counted too": (sum(map(sum, answers)) + sum(map(sum, prompts)))
            / (tokens + sum(map(len, prompts))),
            "end of turn left out": sum(sum(a[:-1]) for a in answers) / (tokens - len(answers)),
        },
        "every answer ends with the end of turn": all(last_turn_ends),
    }


def test_the_answer_loss_is_the_mean_over_reference_tokens_computed_by_hand(merged_run, work):
    """The evaluate stage's answer loss against a reference computed by hand (answer_loss_by_hand) for the base and
    the merged model: prompt tokens excluded, the mean over the answer tokens of all rows (token-weighted), the
    end-of-turn token included. The product batches and pads in float32, the reference goes row by row in float64:
    measured 5e-8 apart (relative), the tolerance is 1e-6. The other definitions (the mean of per-row means, prompt
    tokens counted, the end of turn left out) are 8e-4 to 8e-3 away: a changed definition fails here."""
    metrics, _ = merged_run
    rows = demo_rows(10, 13)  # the eval rows merged_run scored (no test set)
    for side, directory in (("base", work["base"]), ("finetuned", work["merged"])):
        hand = answer_loss_by_hand(directory, rows)
        assert hand["every answer ends with the end of turn"]
        assert metrics[f"{side}_eval_loss"] == pytest.approx(hand["loss"], rel=LOSS_TOLERANCE), side
        assert metrics["eval_loss_tokens"] == hand["tokens"] and metrics["eval_loss_rows"] == len(rows)
        for name, other in hand["other definitions"].items():
            assert abs(other - hand["loss"]) > 100 * LOSS_TOLERANCE * hand["loss"], (side, name, other, hand["loss"])


def test_a_test_set_is_scored_instead_and_both_files_hold_one_row_per_prompt(work):
    metrics, samples = run(work, "test", test_data=str(work["test"]), num_samples=None)
    assert metrics["scored_on"] == {"split": "test", "path": str(work["test"]), "rows": 5, "scored": 5,
                                    "fallback": False, "description": f"5 rows of the test set {work['test']}"}
    assert not any("no test set" in note for note in metrics["notes"])
    assert [s["reference"] for s in samples] == [r["messages"][-1]["content"] for r in demo_rows(20, 25)]
    table = read_csv(work["root"] / "test.samples.csv")
    assert len(table) == 5 and list(table[0]) == [c for c in SAMPLE_COLUMNS]
    for line, sample in zip(table, samples, strict=True):
        assert line["question"] == sample["question"] and line["base_answer"] == sample["base_answer"]
        assert float(line["finetuned_f1"]) == sample["finetuned_f1"]
    rows = comparison_rows(metrics)
    assert [r[0] for r in rows] == SIDE and all(r[3] == 5 for r in rows)
    report = (work["root"] / "test.report.txt").read_text()
    for name, base, tuned, _ in rows:
        line = next(x for x in report.splitlines() if x.startswith(name + " "))
        assert fmt(base) in line and fmt(tuned) in line
    _, capped = run(work, "capped", test_data=str(work["test"]), num_samples=2)
    assert [s["reference"] for s in capped] == [s["reference"] for s in samples[:2]]


def test_adapter_path_scores_like_the_merged_model(work, merged_run):
    metrics, samples = run(work, "adapter", finetuned=str(work["adapter"]), merged=False)
    merged_metrics, merged_samples = merged_run
    assert METRIC_KEYS <= set(metrics)
    assert metrics["base_eval_loss"] == pytest.approx(merged_metrics["base_eval_loss"], abs=1e-6)
    # base+adapter (unmerged) and the merged model are the same function: same loss, same greedy answers; with
    # the adapter disabled, the same answers as the base model loaded on its own.
    assert metrics["finetuned_eval_loss"] == pytest.approx(merged_metrics["finetuned_eval_loss"], abs=1e-4)
    assert [s["finetuned_answer"] for s in samples] == [s["finetuned_answer"] for s in merged_samples]
    assert [s["base_answer"] for s in samples] == [s["base_answer"] for s in merged_samples]


def test_text_rows_skip_generation(work):
    texts = [{"text": r["messages"][-1]["content"]} for r in demo_rows(0, 6)]
    train = write_rows(work["root"] / "text-train.jsonl", texts[:4])
    eval_ = write_rows(work["root"] / "text-eval.jsonl", texts[4:])
    metrics, samples = run(work, "text", train_data=str(train), eval_data=str(eval_))
    assert metrics["generation_skipped"] is True and "text" in metrics["generation_skipped_reason"]
    assert samples == [] and metrics["data_format"] == "text" and metrics["classification"] is None
    assert finite(metrics["base_eval_loss"], metrics["finetuned_eval_loss"], metrics["eval_loss_ratio"])
    assert metrics["eval_exact_match"] is None and metrics["eval_token_f1"] is None
    assert read_csv(work["root"] / "text.samples.csv") == []


def test_empty_eval_data_and_no_test_set_prompt_completion_rows(work):
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
    assert any("nothing to score" in note for note in metrics["notes"]) and samples == []
    assert finite(metrics["base_train_loss"], metrics["finetuned_train_loss"])
    _, answered = run(work, "pc-test", train_data=str(train), eval_data=str(empty), test_data=str(train))
    assert [s["question"] for s in answered] == [r["prompt"] for r in rows]


def test_labels_are_checked_before_any_model_is_loaded(work, tmp_path):
    """A reference that is no label, or a label no reference uses: an error naming the file and row, raised
    before a model is loaded (the base model's record points at a directory without a model)."""
    from hpc_finetune.io.cli import StageError

    (tmp_path / "no-model").mkdir()
    (tmp_path / "model.json").write_text(json.dumps({"path": str(tmp_path / "no-model")}))
    rows = [{"messages": [{"role": "user", "content": f"case {i}"}, {"role": "assistant", "content": label}]}
            for i, label in enumerate(["urgent", "routine", "Urgent.", "soon"])]
    test = write_rows(tmp_path / "test.jsonl", rows)
    with pytest.raises(StageError, match=rf"{test} row 4: the reference answer 'soon' is not one of evaluate.labels"):
        run(work, "labels", model_json=str(tmp_path / "model.json"), test_data=str(test), labels=["urgent", "routine"])
    test = write_rows(tmp_path / "test.jsonl", rows[:3])
    with pytest.raises(StageError, match=rf"{test}: evaluate.labels 'soon' never occur"):
        run(work, "labels", model_json=str(tmp_path / "model.json"), test_data=str(test),
            labels=["urgent", "routine", "soon"])


def test_mismatched_merged_flag_is_a_clear_error(work):
    from hpc_finetune.io.cli import StageError

    with pytest.raises(StageError, match="is an adapter, not a merged model: pass --merged false"):
        run(work, "wrong", finetuned=str(work["adapter"]), merged=True)
    with pytest.raises(StageError, match="pass --merged true"):
        run(work, "wrong", finetuned=str(work["merged"]), merged=False)


# --- the scores, labels and the report, on known values -------------------------------------------------------


def test_word_scores():
    assert token_f1("Rest, and drink water.", "rest and water") == pytest.approx(2 * 0.75 * 1 / 1.75)
    # LCS of "the cat sat on the mat" / "the cat on a mat" is "the cat on mat": P 4/6, R 4/5
    assert rouge_l("The cat sat on the mat.", "the cat on a mat") == pytest.approx(2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5))
    assert rouge_l("mat on the cat", "the cat on a mat") == pytest.approx(2 * (2 / 4) * (2 / 5) / (2 / 4 + 2 / 5))
    assert rouge_l("", "") == 1.0 and rouge_l("x", "") == 0.0 and rouge_l("a b", "c d") == 0.0
    assert rouge_l("Fièvre, toux", "fièvre toux") == 1.0  # non-ASCII words count


def test_label_rule_and_detection():
    labels = ["urgent", "routine"]
    assert to_label(" Urgent. ", labels) == "urgent"  # equal after normalising
    assert to_label("routine care at the GP", labels) == "routine"  # starts with it
    assert to_label("this sounds urgent to me", labels) == "urgent"  # the only label it contains
    assert to_label("urgently", labels) is None and to_label("urgent or routine", labels) == "urgent"
    assert to_label("not sure: routine, or urgent", labels) is None  # two labels inside, neither first
    assert to_label("Emergency department", ["emergency department", "emergency"]) == "emergency department"
    assert detect(["urgent", "Routine", "urgent.", "routine"], 10) == ["routine", "urgent"]
    assert detect(["urgent", "routine", "soon"], 10) is None  # fewer than two rows per value
    assert detect(["It usually causes a runny nose."] * 3 + ["Rest and fluids help a lot."] * 3, 10) is None
    assert detect(["yes", "no"] * 3, 0) is None and detect(["yes"] * 6, 10) is None


def test_classification_metrics_on_known_answers():
    labels = ["urgent", "routine"]
    refs = ["urgent", "urgent", "urgent", "routine", "routine", "routine"]
    tuned = ["urgent", "urgent", "routine", "routine", "routine", "routine"]
    base = ["urgent", "no idea", "urgent", "urgent", "no idea", "routine"]
    rendered = [Rendered("p", r, r) for r in refs]
    samples = sample_rows("test", rendered, ["q"] * 6, {"base": base, "finetuned": tuned}, labels)
    result = classification(samples, labels)
    ft = result["finetuned"]
    assert ft["accuracy"] == pytest.approx(5 / 6, abs=1e-4)
    # urgent: P 2/2, R 2/3, F1 0.8; routine: P 3/4, R 3/3, F1 6/7
    assert ft["per_label"]["urgent"] == {"support": 3, "predicted": 2, "correct": 2, "precision": 1.0,
                                         "recall": 0.6667, "f1": 0.8}
    assert ft["macro_precision"] == pytest.approx((1 + 0.75) / 2, abs=1e-4)
    assert ft["macro_recall"] == pytest.approx((2 / 3 + 1) / 2, abs=1e-4)
    assert ft["macro_f1"] == pytest.approx((0.8 + 6 / 7) / 2, abs=1e-4)
    assert ft["confusion"] == {"urgent": {"urgent": 2, "routine": 1, UNMATCHED: 0},
                               "routine": {"urgent": 0, "routine": 3, UNMATCHED: 0}}
    b = result["base"]
    assert b["accuracy"] == pytest.approx(3 / 6, abs=1e-4) and b["unmatched"] == 2
    assert b["confusion"]["urgent"] == {"urgent": 2, "routine": 0, UNMATCHED: 1}
    assert b["per_label"]["routine"] == {"support": 3, "predicted": 1, "correct": 1, "precision": 1.0,
                                         "recall": 0.3333, "f1": 0.5}
    rows = classification_metrics(result)
    assert rows["accuracy"] == {"base": 0.5, "finetuned": 0.8333, "rows": 6}
    # a label no scored row has: no recall, left out of the macro averages
    lone = classification(sample_rows("test", rendered[:3], ["q"] * 3, {"base": base[:3], "finetuned": tuned[:3]},
                                      labels), labels)
    assert lone["finetuned"]["per_label"]["routine"]["recall"] is None
    assert lone["finetuned"]["macro_recall"] == pytest.approx(2 / 3, abs=1e-4)


def test_comparison_rows_and_who_is_ahead():
    metrics = {"metrics": {"answer_loss": {"base": 3.0, "finetuned": 1.0, "rows": 4},
                           "exact_match": {"base": 0.5, "finetuned": 0.25, "rows": 4},
                           "rouge_l": {"base": None, "finetuned": 0.5, "rows": 0}},
               "lm_eval": {"results": {"arc": {"acc": {"base": 0.25, "finetuned": 0.25, "rows": 8}}}}}
    assert comparison_rows(metrics) == [("answer loss", 3.0, 1.0, 4), ("exact match", 0.5, 0.25, 4),
                                        ("ROUGE-L F", None, 0.5, 0), ("lm-eval arc acc", 0.25, 0.25, 8)]
    assert ahead(metrics) == {"answer loss": "fine-tuned", "exact match": "base", "ROUGE-L F": "",
                              "lm-eval arc acc": "tie"}


def test_samples_csv_quotes_what_a_spreadsheet_needs(tmp_path):
    sample = {c: "" for c in SAMPLE_COLUMNS} | {"question": 'Fièvre, "toux"\nsecond line', "base_answer": "a,b"}
    write_samples_csv(tmp_path / "s.csv", [sample, sample | {"index": 1}])
    raw = (tmp_path / "s.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") and b'"Fi\xc3\xa8vre, ""toux""\nsecond line"' in raw
    assert [r["question"] for r in read_csv(tmp_path / "s.csv")] == ['Fièvre, "toux"\nsecond line'] * 2


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
    argv += " --eval-data E --metrics-out X --samples-out S --labels [\"urgent\",\"routine\"] --lm-eval-tasks []"
    argv += " --lm-eval-limit null --test-data D"
    cfg = parse_args(evaluate.Config, argv.split())
    assert (
        cfg.merged is False and cfg.num_samples == 16 and cfg.max_new_tokens == 96 and cfg.samples_out == "S"
    )
    assert cfg.labels == ["urgent", "routine"] and cfg.lm_eval_tasks == [] and cfg.lm_eval_limit is None
    assert parse_args(evaluate.Config, argv.replace("16", "null").split()).num_samples is None
