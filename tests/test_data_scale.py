"""The data stage at scale: a generated 100k-row file whose counts (kept, dropped by reason, split sizes, the test
set's leaks) and whose exact train/eval rows are checked against a reference computed here by hand, from how the
file was made. The stage streams (hpc_finetune.data.clean); this is what keeps its semantics exact at any size."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from support.common import REPO, write_input
from support.data import write_jsonl
from support.workflow import run_workflow

N = 100_000
LONG = " ".join(["word"] * 300)  # far over max_seq_length=64 with the demo tokenizer


def generated(i: int) -> dict:
    """Row i of the file: every 50th repeats the row before it, one in 1000 has an empty completion, one in 250 is
    too long; no row is two of these."""
    if i % 50 == 49:
        i -= 1
    if i % 1000 == 500:
        return {"prompt": f"question {i}", "completion": ""}
    return {"prompt": f"question {i}", "completion": LONG if i % 250 == 100 else f"answer {i}"}


def test_counts_and_splits_of_100k_rows_match_a_reference(run, tmp_path):
    rows = [generated(i) for i in range(N)]
    data = write_jsonl(tmp_path / "big.jsonl", rows)
    # the test set: 1000 new rows, 300 that repeat a training row, 100 that repeat one of its own rows
    fresh = [{"prompt": f"new question {i}", "completion": f"new answer {i}"} for i in range(1000)]
    leaked = [generated(i) for i in range(1, 3000, 10)]  # i % 10 == 1: rows never dropped
    test = write_jsonl(tmp_path / "test.jsonl", fresh + leaked + fresh[:100])

    report = run(data, max_seq_length=64, long_rows="drop", eval_fraction=0.1, max_samples=50_000, seed=7,
                 max_dropped_fraction=0.5, test_path=str(test))

    # by hand: 2000 repeats (i % 50 == 49), 100 empty (i % 1000 == 500), 400 too long (i % 250 == 100)
    kept = [generated(i) for i in range(N) if i % 50 != 49 and i % 1000 != 500 and i % 250 != 100]
    assert len(kept) == N - 2000 - 100 - 400 == 97_500
    assert report["input_rows"] == N and report["kept"] == 97_500
    assert report["dropped"] == {"empty": 100, "duplicate": 2000, "too_long": 400}
    # the sampling: the kept rows in file order, shuffled by the seed, the first max_samples; 10 % of them held out
    random.Random(7).shuffle(kept)
    sample = kept[:50_000]
    assert (report["train_rows"], report["eval_rows"]) == (45_000, 5_000)
    assert run.eval == sample[:5_000] and run.train == sample[5_000:]
    assert report["test_rows"] == 1000 and sorted(run.test, key=json.dumps) == sorted(fresh, key=json.dumps)
    assert report["test_source"]["dropped"] == {"empty": 0, "duplicate": 100, "too_long": 0, "in_train": 300}
    assert report["tokens"]["max"] <= 64


def test_csv_parquet_and_a_saved_dataset_give_what_json_lines_gives(run, tmp_path):
    """The same 10k rows as JSON Lines, CSV, Parquet and a save_to_disk dataset (both read in batches): every reader
    streams them, and the outputs and reports are the same."""
    rows = [generated(i) for i in range(10_000)]
    results = {}
    for kind in ("jsonl", "csv", "parquet", "dataset"):
        (tmp_path / kind).mkdir()
        report = run(write_input(kind, tmp_path / kind, rows), max_seq_length=64, max_samples=7_500, seed=3)
        results[kind] = ({k: v for k, v in report.items() if k != "source"}, run.train, run.eval)
    assert results["jsonl"][0]["kept"] == 10_000 - 200 - 10 - 40
    assert results["csv"] == results["parquet"] == results["dataset"] == results["jsonl"]


def test_the_data_stage_asks_for_memory_that_follows_the_dataset(tmp_path):
    """The memory request of prepare_data is resources.cpu_mem_mb (2000 in the demo) plus 2 MB per MB of data: a
    (sparse) 1500 MB dataset plans a 5000 MB job."""
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    with open(tmp_path / "big.jsonl", "wb") as fh:
        fh.truncate(1500 << 20)
    plan = run_workflow(tmp_path, "-n", "results/demo/data/report.json", "--config", "dataset__path=big.jsonl")
    job = (plan.stdout + plan.stderr).split("rule prepare_data:", 1)[1].split("Shell command", 1)[0]
    assert re.search(r"\bmem_mb=(\d+)", job).group(1) == str(2000 + 2 * 1500)


def test_the_train_stage_reads_its_arrow_beside_the_data_and_new_data_removes_it(run, tmp_path, monkeypatch):
    """The Arrow form of train.jsonl goes beside it, not to datasets' cache in HF_HOME where every run's data would
    stay; the data stage removes it with the data it was made from."""
    from hpc_finetune.train.data import ARROW_CACHE, read_data

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    run(write_jsonl(tmp_path / "d.jsonl", [generated(i) for i in range(200)]), seed=1)
    train, eval_rows, fmt = read_data(str(run.out / "train.jsonl"), str(run.out / "eval.jsonl"))
    assert (fmt, len(train), len(eval_rows)) == ("prompt_completion", 175, 20)  # 200 rows less 4 repeats and 1 too long
    assert all(Path(f["filename"]).is_relative_to(run.out / ARROW_CACHE) for f in train.cache_files + eval_rows.cache_files)
    assert not list((tmp_path / "hf-home").rglob("*.arrow"))
    run(tmp_path / "d.jsonl", seed=2)
    assert not (run.out / ARROW_CACHE).exists()


def test_csv_and_parquet_stream_like_json_lines(tmp_path):
    """100k rows of CSV and of Parquet are read as JSON Lines are, a batch at a time: every row, in order, with the
    Python heap and Arrow's pool a few MB whatever the count (the rows would take ~40 MB as Python objects; the
    bound does not grow with the count, so this stands for a million rows at a tenth of the test's time)."""
    import csv
    import tracemalloc

    import pyarrow as pa
    import pyarrow.parquet as pq
    from hpc_finetune.data.readers import read_file

    n, chunk = 100_000, 25_000
    with open(tmp_path / "big.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["prompt", "completion"])
        writer.writerows((f"question {i}", f"answer {i}") for i in range(n))
    with pq.ParquetWriter(tmp_path / "big.parquet", pa.schema([("prompt", pa.string()), ("completion", pa.string())])) as pw:
        for start in range(0, n, chunk):
            pw.write_table(pa.table({"prompt": [f"question {i}" for i in range(start, start + chunk)],
                                     "completion": [f"answer {i}" for i in range(start, start + chunk)]}))
    for name in ("big.csv", "big.parquet"):
        rows = read_file(tmp_path / name)
        assert rows.columns() == ["prompt", "completion"] and len(rows) == n
        count, arrow_peak = 0, 0
        tracemalloc.start()
        for count, row in enumerate(rows, start=1):
            if count % 10_000 == 1:
                assert row == {"prompt": f"question {count - 1}", "completion": f"answer {count - 1}"}, name
                arrow_peak = max(arrow_peak, pa.total_allocated_bytes())
        heap_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert count == n and row == {"prompt": f"question {n - 1}", "completion": f"answer {n - 1}"}
        assert heap_peak < 4 << 20 and arrow_peak < 32 << 20, (name, heap_peak, arrow_peak)


def test_a_repository_of_several_shards_is_read_a_batch_at_a_time(tmp_path):
    """What a hub dataset's snapshot and an s3:// prefix become on disk (hpc_finetune.data.hub, .remote): a directory
    of data files named by split, here 100k training rows in four Parquet shards and a test shard (one format for
    every split: datasets refuses a mix, and the stage says so with the formats it found). Read
    through datasets' memory-mapped Arrow form: every row once, in shard order, and the Python heap a few MB while
    reading (the rows would take ~40 MB as Python objects)."""
    import tracemalloc

    import pyarrow as pa
    import pyarrow.parquet as pq
    from hpc_finetune.data.readers import read_splits

    n, shards = 100_000, 4
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    per = n // shards
    for s in range(shards):
        ids = range(s * per, (s + 1) * per)
        pq.write_table(pa.table({"prompt": [f"question {i}" for i in ids], "completion": [f"answer {i}" for i in ids]}),
                       repo / "data" / f"train-{s:05d}-of-{shards:05d}.parquet", row_group_size=10_000)
    pq.write_table(pa.table({"prompt": [f"held out {i}" for i in range(100)],
                             "completion": [f"answer {i}" for i in range(100)]}),
                   repo / "data" / "test-00000-of-00001.parquet")
    splits = read_splits(repo, None, cache_dir=str(tmp_path / "arrow"))
    assert sorted(splits) == ["test", "train"]
    rows = splits["train"]()
    assert len(rows) == n and rows.columns() == ["prompt", "completion"]
    tracemalloc.start()
    count = 0
    for count, row in enumerate(rows, start=1):
        if count % 20_000 == 1:
            assert row == {"prompt": f"question {count - 1}", "completion": f"answer {count - 1}"}
    heap_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == n and row == {"prompt": f"question {n - 1}", "completion": f"answer {n - 1}"}
    assert heap_peak < 4 << 20, heap_peak
    assert [r["prompt"] for r in splits["test"]()][:2] == ["held out 0", "held out 1"]
