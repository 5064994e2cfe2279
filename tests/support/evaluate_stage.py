"""The evaluate stage's inputs on the tiny demo model and one in-process run of it, shared by tests/test_evaluate.py
and tests/test_evaluate_parts.py."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from support.common import adapter_inputs, demo_rows, write_rows


def make_work(root: Path, tiny_model: Path) -> dict:
    """Model record, chat train/eval/test data from the demo set, an adapter, and that adapter merged."""
    import merge

    work = adapter_inputs(root, tiny_model, eval_rows=(10, 13), train_rows=(0, 4)) | {"merged": root / "merged"}
    work["test"] = write_rows(root / "test.jsonl", demo_rows(20, 25))
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
    """scripts/evaluate.py main() on `work` (3 eval rows, 8 new tokens, the merged model unless overridden): its
    metrics (checked equal to the file it wrote) and samples."""
    import evaluate

    values = dict(
        model_json=work["model_json"],
        finetuned=str(work["merged"]),
        train_data=str(work["train"]),
        eval_data=str(work["eval"]),
        metrics_out=str(work["root"] / f"{name}.json"),
        samples_out=str(work["root"] / f"{name}.samples.jsonl"),
        samples_csv=str(work["root"] / f"{name}.samples.csv"),
        report_out=str(work["root"] / f"{name}.report.txt"),
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


def read_csv(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        return list(csv.DictReader(fh))
