"""A classification-style evaluation end to end on the shipped triage set (data/demo/triage: answers `urgent` /
`routine`): the data stage reads its train/validation/test splits, a quick real QLoRA adapter is trained on the
demo model built for it, and the evaluate stage (base + adapter, the base's answers with the adapter disabled) reports
accuracy and macro precision/recall/F1 for both models, with the labels detected from the references, and every
metric per complaint category (the test rows' `category` column, evaluate.group_field) with each group's
false-positive and false-negative rates."""

from __future__ import annotations

import csv
import json

import pytest
from support.common import REPO
from support.train_stage import make_config

TRIAGE = REPO / "data" / "demo" / "triage"
MIN_ROWS = 8  # the categories have 8, 8, 7 and 7 test rows: two are scored, two are too small


@pytest.fixture(scope="module")
def triage(tmp_path_factory) -> dict:
    import build_demo_model
    import evaluate
    import prepare_data
    import train
    from hpc_finetune.io.files import read_jsonl

    root = tmp_path_factory.mktemp("triage")
    tiny_model = root / "model"  # the demo model as `preset: demo` builds it for this dataset: its tokenizer knows the words
    build_demo_model.main(build_demo_model.Config(data=str(TRIAGE), output=str(tiny_model)))
    (root / "model.json").write_text(json.dumps({"path": str(tiny_model)}))
    data = {name: str(root / "data" / f"{name}.jsonl") for name in ("train", "eval", "test")}
    report = prepare_data.main(prepare_data.Config(
        path=str(TRIAGE), model_json=str(root / "model.json"), train_out=data["train"], eval_out=data["eval"],
        test_out=data["test"], report_out=str(root / "data" / "report.json"), max_seq_length=256))
    cfg = make_config(tiny_model, root / "train", read_jsonl(data["train"]), read_jsonl(data["eval"]), max_steps=150,
                      learning_rate=1e-2, micro_batch_size=16, eval_steps=75, save_steps=150)
    train.main(cfg)
    out = {"metrics_out": str(root / "evaluate.json"), "samples_out": str(root / "eval" / "samples.jsonl"),
           "samples_csv": str(root / "eval" / "samples.csv"), "report_out": str(root / "eval" / "report.txt")}
    metrics = evaluate.main(evaluate.Config(
        model_json=str(root / "model.json"), finetuned=cfg.output_dir, merged=False, train_data=data["train"],
        eval_data=data["eval"], test_data=data["test"], num_samples=None, max_new_tokens=8, dtype="float32",
        group_field="category", group_min_rows=MIN_ROWS, **out))
    return {"report": report, "metrics": metrics, "test": read_jsonl(data["test"]), **out}


def test_both_models_get_accuracy_and_macro_f1_and_the_fine_tuned_one_is_ahead(triage):
    m = triage["metrics"]
    assert m["scored_on"]["split"] == "test" and m["scored_on"]["scored"] == 30 == triage["report"]["test_rows"]
    assert m["labels_source"].startswith("detected") and m["classification"]["labels"] == ["routine", "urgent"]
    side = m["metrics"]
    for name in ("accuracy", "macro_precision", "macro_recall", "macro_f1"):
        assert side[name]["rows"] == 30 and all(0.0 <= side[name][k] <= 1.0 for k in ("base", "finetuned")), name
    # the untrained base model names no label; the adapter learnt to answer with one, mostly the right one
    assert side["accuracy"]["finetuned"] >= 0.6 > side["accuracy"]["base"], side["accuracy"]
    assert side["macro_f1"]["finetuned"] > side["macro_f1"]["base"], side["macro_f1"]
    tuned = m["classification"]["finetuned"]
    assert sum(sum(row.values()) for row in tuned["confusion"].values()) == 30
    assert {label: c["support"] for label, c in tuned["per_label"].items()} == {"routine": 15, "urgent": 15}
    assert tuned["accuracy"] == side["accuracy"]["finetuned"]


def test_the_report_and_the_spreadsheet_show_the_labels(triage):
    text = open(triage["report_out"], encoding="utf-8").read()
    for line in ("accuracy", "macro F1", "confusion (rows: reference, columns: answer)", "labels routine, urgent"):
        assert line in text, line
    with open(triage["samples_csv"], newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 30 and {r["reference_label"] for r in rows} == {"urgent", "routine"}
    accuracy = sum(float(r["finetuned_correct"]) for r in rows) / 30
    assert accuracy == pytest.approx(triage["metrics"]["metrics"]["accuracy"]["finetuned"], abs=1e-4)


def test_every_metric_per_category_with_false_positive_and_negative_rates(triage):
    """evaluate.group_field on the shipped set's `category` column: the data stage keeps it in test.jsonl; each
    category with at least MIN_ROWS rows gets every metric, recomputed here from the per-sample records, and each
    label's false-positive/negative rates; the smaller ones are listed with their row counts, not hidden."""
    from hpc_finetune.evaluate.groups import RANKING
    from hpc_finetune.report.tables import evaluation_html

    shipped = [json.loads(line) for line in (TRIAGE / "test.jsonl").read_text().splitlines()]
    assert sorted(r["category"] for r in triage["test"]) == sorted(r["category"] for r in shipped)
    section = triage["metrics"]["groups"]
    assert section["field"] == "category" and section["min_rows"] == MIN_ROWS
    groups = section["groups"]
    assert {g: e["rows"] for g, e in groups.items()} == {"heart_lungs": 7, "nerves_mind": 7, "other": 8, "skin": 8}
    for small in ("heart_lungs", "nerves_mind"):
        assert groups[small]["scored"] is False and "fewer than evaluate.group_min_rows=8" in groups[small]["reason"]
        assert "metrics" not in groups[small]
    with open(triage["samples_csv"], newline="", encoding="utf-8-sig") as fh:
        samples = list(csv.DictReader(fh))
    for name in ("other", "skin"):
        mine = [s for s in samples if s["group"] == name]
        entry = groups[name]
        assert entry["scored"] and len(mine) == 8
        for model in ("base", "finetuned"):
            correct = [float(s[f"{model}_correct"]) for s in mine]
            assert entry["metrics"]["accuracy"][model] == pytest.approx(sum(correct) / 8, abs=1e-4)
            assert entry["metrics"]["exact_match"][model] == pytest.approx(
                sum(float(s[f"{model}_exact"]) for s in mine) / 8, abs=1e-4)
            for label in ("urgent", "routine"):
                positives = [s for s in mine if s["reference_label"] == label]
                negatives = [s for s in mine if s["reference_label"] != label]
                rates = entry["error_rates"][model][label]
                assert rates["positives"] == len(positives) and rates["negatives"] == len(negatives)
                assert rates["false_negative_rate"] == pytest.approx(
                    sum(s[f"{model}_label"] != label for s in positives) / len(positives), abs=1e-4)
                assert rates["false_positive_rate"] == pytest.approx(
                    sum(s[f"{model}_label"] == label for s in negatives) / len(negatives), abs=1e-4)
        loss = entry["metrics"]["answer_loss"]
        assert loss["rows"] == 8 and all(isinstance(loss[m], float) for m in ("base", "finetuned"))
    metric = next(m for m, _ in RANKING if m in groups["skin"]["metrics"])
    assert metric == "accuracy"
    tuned = {g: groups[g]["metrics"]["accuracy"]["finetuned"] for g in ("other", "skin")}
    assert section["worst"]["finetuned"] == {"metric": "accuracy", "group": min(tuned, key=lambda g: (tuned[g], g)),
                                             "value": min(tuned.values())}
    text = open(triage["report_out"], encoding="utf-8").read()
    assert "Groups: evaluate.group_field 'category'" in text and "heart_lungs: 7 rows, fewer than" in text
    assert "False-positive / false-negative rate per group" in text and "worst group (finetuned)" in text
    page = evaluation_html(triage["metrics"], samples)  # the HTML report's evaluation
    assert "<h2>Per group</h2>" in page and "heart_lungs: 7 rows, fewer than" in page
    assert page.count("<td>skin</td>") == 1 + 4  # its metrics row and its 4 rate rows (2 models x 2 labels)
