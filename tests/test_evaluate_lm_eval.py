"""lm-evaluation-harness tasks in the evaluate stage (evaluate.lm_eval_tasks): the small local task shipped in
tests/lm_eval_tasks (`dataset_path: json`, offline) on the base and the fine-tuned model through lm-eval's own
command line, its accuracy checked against the log-likelihoods computed here; and every way it is skipped with a
reason instead of failing the stage."""

from __future__ import annotations

import json

import pytest
from support.common import REPO, adapter_inputs

TASKS = REPO / "tests" / "lm_eval_tasks"
CHOICES = ["urgent", "routine"]
LIMIT = 6


def multiple_choice_accuracy(model, tokenizer, docs: list[dict]) -> float:
    """What lm-eval's multiple_choice `acc` is: the choice (after the " " target delimiter) with the highest
    summed log-likelihood after the context, compared with the target."""
    import torch

    right = 0
    for doc in docs:
        context = f"{doc['message']}\nAnswer:"
        scores = []
        for choice in CHOICES:
            whole = tokenizer(context + " " + choice)["input_ids"]
            head = tokenizer(context)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(float(logits[i - 1, whole[i]]) for i in range(len(head), len(whole))))
        right += CHOICES[scores.index(max(scores))] == doc["label"]
    return right / len(docs)


@pytest.fixture(scope="module")
def stage(tmp_path_factory, tiny_model) -> dict:
    import evaluate

    work = adapter_inputs(tmp_path_factory.mktemp("lm-eval"), tiny_model, eval_rows=(10, 12), train_rows=(0, 2))
    metrics = evaluate.main(evaluate.Config(
        model_json=work["model_json"], finetuned=str(work["adapter"]), merged=False, train_data=str(work["train"]),
        eval_data=str(work["eval"]), metrics_out=str(work["root"] / "evaluate.json"),
        samples_out=str(work["root"] / "eval" / "samples.jsonl"), report_out=str(work["root"] / "eval" / "report.txt"),
        num_samples=2, max_new_tokens=4, dtype="float32", lm_eval_tasks=["triage_mc"], lm_eval_limit=LIMIT,
        lm_eval_include_path=str(TASKS)))
    return work | {"metrics": metrics}


def test_a_local_task_runs_on_both_models_and_scores_as_lm_eval_defines(stage, tiny_model):
    from hpc_finetune.evaluate.report import comparison_rows
    from hpc_finetune.model.load import load_adapter, load_model, load_tokenizer
    from transformers import AutoTokenizer

    result = stage["metrics"]["lm_eval"]
    assert result["skipped"] is None and result["tasks"] == ["triage_mc"] and result["limit"] == LIMIT
    acc = result["results"]["triage_mc"]["acc"]
    assert acc["rows"] == LIMIT
    docs = [json.loads(line) for line in (TASKS / "triage_mc.jsonl").read_text().splitlines()][:LIMIT]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    base = load_model(tiny_model, __import__("torch").float32, "base")
    assert acc["base"] == pytest.approx(multiple_choice_accuracy(base, tokenizer, docs))
    tuned = load_adapter(base, stage["adapter"])
    assert acc["finetuned"] == pytest.approx(
        multiple_choice_accuracy(tuned, load_tokenizer(stage["adapter"], tiny_model), docs))
    row = next(r for r in comparison_rows(stage["metrics"]) if r[0] == "lm-eval triage_mc acc")
    assert row == ("lm-eval triage_mc acc", acc["base"], acc["finetuned"], LIMIT)
    assert "lm-eval triage_mc acc" in (stage["root"] / "eval" / "report.txt").read_text()
    assert (stage["root"] / "eval" / "lm_eval" / "finetuned" / "lm_eval.log").is_file()


def test_unknown_tasks_missing_lm_eval_and_a_bad_include_path_are_skipped_with_the_reason(tmp_path, monkeypatch,
                                                                                         tiny_model):
    from hpc_finetune.evaluate import harness

    models = {"base": harness.model_args(str(tiny_model), "float32"),
              "finetuned": harness.model_args(str(tiny_model), "float32")}

    def run(tasks, include=str(TASKS)):
        return harness.run_tasks(tasks, 2, include, models, "cpu", 2, str(tmp_path / "out"))

    assert run([]) is None  # no tasks: nothing to run or report
    result = run(["no_such_task"])
    assert result["results"] == {} and "lm-eval failed on the base model" in result["skipped"]
    assert "no_such_task" in result["skipped"], result["skipped"]
    assert "is not a directory" in run(["triage_mc"], include=str(tmp_path / "none"))["skipped"]
    real = harness.importlib.util.find_spec
    monkeypatch.setattr(harness.importlib.util, "find_spec", lambda name: None if name == "lm_eval" else real(name))
    assert run(["triage_mc"])["skipped"].startswith("lm-eval is not installed")
