"""`bench.py data`: the data stage (scripts/prepare_data.py) on generated demo-shaped chat rows of several sizes,
each in a child process of its own; rows/s (input rows over the stage's own wall time), rows per CPU second (all
its threads: what a loaded machine does not change much) and the child's peak RSS.
Then, in another child, the train stage's data loading of what the stage wrote (hpc_finetune.train.data: the rows
checked, read memory-mapped and put in the form the loss needs, as before the first step): time and peak RSS.

The rows are the demo's conversations (system, user, assistant) with a numbered case in the question and the
answer, so every row is distinct and about as long as a demo row; 1 % repeat an earlier row and 0.1 % have an
empty answer, so the duplicate and empty checks do real work. The tokenizer is the demo model's (built once).
`--formats csv parquet`: the same rows as prompt/completion columns (the user's question and the answer; the system
prompt left out) in a CSV or Parquet file, read by the stage's streaming readers.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from hpc_finetune.io.cli import log, table
from hpc_finetune.io.files import write_json
from hpc_finetune.io.measure import peak_rss_mb
from tools.benchmarks.models import BENCH, DEMO_DATA, run_child


def demo_shaped(path: Path, rows: int) -> Path:
    """`rows` demo-shaped chat rows in JSON Lines at `path` (kept when it already has them)."""
    if path.is_file() and sum(1 for _ in path.open()) == rows:
        return path
    demo = [json.loads(line) for line in DEMO_DATA.read_text().splitlines()]
    last = ""
    with path.open("w") as fh:
        for i in range(rows):
            if i % 100 == 99:  # a repeat of an earlier row
                fh.write(last + "\n")
                continue
            system, user, assistant = demo[i % len(demo)]["messages"]
            answer = "" if i % 1000 == 500 else f"{assistant['content']} (case {i})"
            last = json.dumps({"messages": [system, {"role": "user", "content": f"{user['content']} (case {i})"},
                                            {"role": "assistant", "content": answer}]})
            fh.write(last + "\n")
    return path


def as_format(jsonl: Path, fmt: str) -> Path:
    """The rows of `jsonl` as prompt/completion columns in a .csv or .parquet next to it (kept when it is there),
    written a chunk at a time."""
    import csv

    path = jsonl.with_suffix(f".{fmt}")
    if path.is_file():  # the JSON Lines file itself, or a conversion made before
        return path
    tmp = path.with_name(f".{path.name}.tmp")

    def pairs():
        with jsonl.open() as fh:
            for line in fh:
                _, user, assistant = json.loads(line)["messages"]
                yield user["content"], assistant["content"]

    if fmt == "csv":
        with tmp.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["prompt", "completion"])
            writer.writerows(pairs())
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([("prompt", pa.string()), ("completion", pa.string())])
        with pq.ParquetWriter(tmp, schema) as writer:
            chunk = []
            for pair in pairs():
                chunk.append(pair)
                if len(chunk) == 50_000:
                    writer.write_table(pa.table(list(zip(*chunk, strict=True)), schema=schema))
                    chunk = []
            if chunk:
                writer.write_table(pa.table(list(zip(*chunk, strict=True)), schema=schema))
    tmp.rename(path)
    return path


def data_child(data: str, model_json: str, out: str) -> None:
    """One run of the data stage in this process; its own time and peak RSS go to {out}/bench.json."""
    import prepare_data

    start, cpu = time.perf_counter(), time.process_time()
    cfg = prepare_data.Config(path=data, model_json=model_json, train_out=f"{out}/train.jsonl",
                              eval_out=f"{out}/eval.jsonl", report_out=f"{out}/report.json",
                              test_out=f"{out}/test.jsonl", max_seq_length=256)
    report = prepare_data.main(cfg)
    Path(out, "bench.json").write_text(json.dumps({"inner_s": time.perf_counter() - start, "kept": report["kept"],
                                                    "cpu_s": time.process_time() - cpu, "peak_rss_mb": peak_rss_mb()}))


def train_data_child(out: str, model_json: str) -> None:
    """The train stage's data loading of {out}/train.jsonl and eval.jsonl in this process; its own time and peak
    RSS go to {out}/bench-train.json."""
    from hpc_finetune.train.data import loss_mode, read_data, to_dataset
    from transformers import AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(json.loads(Path(model_json).read_text())["path"])
    rows, eval_rows, fmt = read_data(f"{out}/train.jsonl", f"{out}/eval.jsonl")
    mode = loss_mode(fmt, tokenizer, True)
    train, _ = to_dataset(rows, fmt, mode), to_dataset(eval_rows, fmt, mode)
    Path(out, "bench-train.json").write_text(json.dumps({"inner_s": time.perf_counter() - start, "rows": len(train),
                                                          "peak_rss_mb": peak_rss_mb()}))


def demo_model(work: Path) -> Path:
    """The demo's tiny model (its tokenizer measures the rows) and its record."""
    import build_demo_model

    model = work / "model"
    if not (model / "config.json").is_file():
        build_demo_model.main(build_demo_model.Config(data=str(DEMO_DATA), output=str(model)))
    record = work / "model.json"
    record.write_text(json.dumps({"path": str(model)}))
    return record


def bench_data(args) -> dict:
    work = Path(args.work) / "data"
    work.mkdir(parents=True, exist_ok=True)
    model_json = demo_model(work)
    report = {"benchmark": "data", "sizes": [], "cores": os.cpu_count(), "load_average": os.getloadavg(),
              "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    for rows, fmt in ((rows, fmt) for rows in args.rows for fmt in args.formats):
        data = as_format(demo_shaped(work / f"rows-{rows}.jsonl", rows), fmt)
        out = work / f"out-{rows}-{fmt}"
        out.mkdir(exist_ok=True)
        log.info("data stage on %d demo-shaped rows (%s)", rows, fmt)
        status, wall = run_child([str(BENCH), "_data_child", str(data), str(model_json), str(out)],
                                 timeout=args.child_timeout)
        if status != 0:
            report["sizes"].append({"rows": rows, "format": fmt,
                                    "failed": "timeout" if status is None else f"exit {status}"})
            continue
        child = json.loads((out / "bench.json").read_text())
        report["sizes"].append({"rows": rows, "format": fmt, "wall_s": round(wall, 1), "stage_s": round(child["inner_s"], 1),
                                "rows_per_s": round(rows / child["inner_s"]), "peak_rss_mb": round(child["peak_rss_mb"]),
                                "cpu_s": round(child["cpu_s"], 1), "rows_per_cpu_s": round(rows / child["cpu_s"]),
                                "kept": child["kept"]})
        status, _ = run_child([str(BENCH), "_train_data_child", str(out), str(model_json)], timeout=args.child_timeout)
        if status == 0:
            loading = json.loads((out / "bench-train.json").read_text())
            report["sizes"][-1] |= {"train_load_s": round(loading["inner_s"], 1),
                                    "train_load_peak_rss_mb": round(loading["peak_rss_mb"])}
        write_json(args.out, report)
    write_json(args.out, report)
    print(table([(f"{s['rows']} rows {s['format']}", s.get("failed") or f"{s['rows_per_s']} rows/s ({s['rows_per_cpu_s']} per CPU "
                  f"second), peak RSS {s['peak_rss_mb']} MB, "
                  f"{s['stage_s']} s; train loading {s.get('train_load_s')} s, peak RSS "
                  f"{s.get('train_load_peak_rss_mb')} MB") for s in report["sizes"]], "data stage (bench.py data)"))
    return report
