"""A classification-style evaluation end to end on the shipped triage set (data/demo/triage: answers `urgent` /
`routine`): the data stage reads its train/validation/test splits, a quick real QLoRA adapter is trained on the
demo model built for it, and the evaluate stage (base + adapter, the base's answers with the adapter disabled) reports
accuracy and macro precision/recall/F1 for both models, with the labels detected from the references."""

from __future__ import annotations

import csv
import json

import pytest
from support.common import REPO
from support.train_stage import make_config

TRIAGE = REPO / "data" / "demo" / "triage"


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
        eval_data=data["eval"], test_data=data["test"], num_samples=None, max_new_tokens=8, dtype="float32", **out))
    return {"report": report, "metrics": metrics, **out}


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
