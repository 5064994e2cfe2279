"""The evaluate stage in two parts (scripts/evaluate.py --part base, then --part finetuned with the base part's
files): together they give exactly what --part both gives (real tiny model, an untrained seeded LoRA adapter and
that adapter merged); the fine-tuned part refuses base files made on other rows or with other settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.common import write_rows
from support.evaluate_stage import make_work, read_csv, run

VOLATILE = {"wall_time_s", "peak_memory", "generation"}  # of the process, not of the models (generation: timings)


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model) -> dict:
    return make_work(tmp_path_factory.mktemp("evaluate-parts"), tiny_model)


@pytest.fixture(scope="module")
def merged_run(work):
    """--part both, the stage as the single-run workflow runs it."""
    return run(work, "merged")


@pytest.fixture(scope="module")
def base_part(work):
    """The base part on merged_run's rows and settings (the eval rows, 3 samples)."""
    return run(work, "base", part="base", finetuned=None, samples_csv=None, report_out=None)


def test_the_two_parts_give_the_metrics_and_samples_of_both_at_once(work, merged_run, base_part):
    record, base_samples = base_part
    assert record["part"] == "base" and record["base_model"] == str(work["base"]) and len(record["digest"]) == 64
    assert "finetuned" not in record and "finetuned_eval_loss" not in record
    assert all(set(v) == {"base", "rows"} for v in record["metrics"].values())  # the base side of evaluate.json
    both, both_samples = merged_run
    assert {k: v["base"] for k, v in record["metrics"].items()} == {k: v["base"] for k, v in both["metrics"].items()}
    assert [s["base_answer"] for s in base_samples] == [s["base_answer"] for s in both_samples]
    metrics, samples = run(work, "tuned-part", part="finetuned", base_metrics=str(work["root"] / "base.json"),
                           base_samples=str(work["root"] / "base.samples.jsonl"))
    strip = lambda m: {k: v for k, v in m.items() if k not in VOLATILE | {"samples_files"}}  # noqa: E731
    assert strip(metrics) == strip(json.loads(json.dumps(both))) and samples == both_samples
    assert metrics["generation"]["engine"] == both["generation"]["engine"] == "transformers"
    assert read_csv(work["root"] / "tuned-part.samples.csv") == read_csv(work["root"] / "merged.samples.csv")
    report = (work["root"] / "tuned-part.report.txt").read_text()
    assert report.replace("tuned-part.", "merged.") == (work["root"] / "merged.report.txt").read_text()
    # the adapter: base + adapter scored here, the base side from the same files
    adapter, adapter_samples = run(work, "adapter-part", part="finetuned", finetuned=str(work["adapter"]), merged=False,
                                   base_metrics=str(work["root"] / "base.json"),
                                   base_samples=str(work["root"] / "base.samples.jsonl"))
    assert adapter["base_eval_loss"] == both["base_eval_loss"]
    assert adapter["finetuned_eval_loss"] == pytest.approx(both["finetuned_eval_loss"], abs=1e-4)
    assert [s["finetuned_answer"] for s in adapter_samples] == [s["finetuned_answer"] for s in both_samples]


def test_the_finetuned_part_refuses_base_files_of_other_rows_or_settings(work, base_part, tmp_path):
    from hpc_finetune.io.cli import StageError

    files = {"base_metrics": str(work["root"] / "base.json"), "base_samples": str(work["root"] / "base.samples.jsonl")}
    with pytest.raises(StageError, match=r"does not match this test set: the digest of its scored rows"):
        run(work, "other-rows", part="finetuned", test_data=str(work["test"]), num_samples=3, **files)
    with pytest.raises(StageError, match=r"other evaluate settings: max_new_tokens 8 there, 4 here"):
        run(work, "other-settings", part="finetuned", max_new_tokens=4, **files)
    with pytest.raises(StageError, match=r"--base-metrics .*missing.json does not exist: run the base part"):
        run(work, "missing", part="finetuned", **files | {"base_metrics": str(tmp_path / "missing.json")})
    with pytest.raises(StageError, match=r"is not a base part's metrics"):
        run(work, "not-base", part="finetuned", **files | {"base_metrics": str(work["root"] / "merged.json")})
    short = write_rows(tmp_path / "short.jsonl", [json.loads(x) for x in Path(files["base_samples"]).read_text()
                                                   .splitlines()[:2]])
    with pytest.raises(StageError, match=r"--base-samples .*short.jsonl does not belong to these rows: 2 samples for 3"):
        run(work, "short", part="finetuned", **files | {"base_samples": str(short)})
    with pytest.raises(StageError, match=r"--part finetuned needs --base-metrics and --base-samples"):
        run(work, "no-files", part="finetuned")
    with pytest.raises(StageError, match=r"--part base writes --metrics-out and --samples-out only"):
        run(work, "base-csv", part="base")
    with pytest.raises(StageError, match=r"--part 'half' is not one of both, base, finetuned"):
        run(work, "half", part="half")
