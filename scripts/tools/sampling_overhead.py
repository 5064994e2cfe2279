r"""What the train job's resource sampling costs: the train stage on the demo's tiny model, with sampling on and
off, alternating, a few repeats each, in one process (so imports are paid once).

    python scripts/tools/sampling_overhead.py [--repeats 3] [--steps 60] [--interval 5] [--out overhead.json]

Per run: wall time of train.main and the process's CPU time (user + system, from getrusage: the machine may be
shared, CPU time is the steadier figure). For the sampled runs also the sampler thread's own CPU time
(time.thread_time around each sample) and the number of samples. Printed as a table and written as JSON: the
median of each, and the overhead as the difference of the medians and as sampler CPU over train wall time.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hpc_finetune.io.cli import log, setup_logging, table
from hpc_finetune.io.files import read_jsonl
from hpc_finetune.train import resources

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = dict(learning_rate=1e-2, lr_scheduler="linear", warmup_ratio=0.0, micro_batch_size=16,
                gradient_accumulation=1, max_seq_length=256, lora_dropout=0.0, gradient_checkpointing=False,
                optim="adamw_torch", logging_steps=10, eval_steps=30, save_steps=1000)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed_sampling() -> dict:
    """Wrap ResourceSampler.sample to add up the sampling thread's CPU time."""
    spent = {"cpu_s": 0.0, "samples": 0}
    original = resources.ResourceSampler.sample

    def sample(self):
        start = time.thread_time()
        original(self)
        spent["cpu_s"] += time.thread_time() - start
        spent["samples"] += 1

    resources.ResourceSampler.sample = sample
    return spent


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    setup_logging()
    sys.path.insert(0, str(ROOT / "scripts"))  # the stage programs
    import build_demo_model
    import torch
    import train

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="sampling-overhead-"))
    data = ROOT / "data" / "demo" / "medical_qa.jsonl"
    build_demo_model.main(build_demo_model.Config(data=str(data), output=str(work / "model")))
    rows = read_jsonl(data)
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:240]))
    (work / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[240:]))
    (work / "model.json").write_text(json.dumps({"path": str(work / "model"), "model_id": "demo"}))
    (work / "preflight.json").write_text(json.dumps({"device": "cpu", "bf16": False}))
    spent = timed_sampling()
    runs = []
    for i in range(2 * args.repeats):
        sampled = i % 2 == 1
        out = work / f"run{i}"
        cfg = train.Config(
            model_json=str(work / "model.json"), train_data=str(work / "train.jsonl"),
            eval_data=str(work / "eval.jsonl"), preflight=str(work / "preflight.json"),
            output_dir=str(out / "adapters"), metrics_out=str(out / "train.json"),
            checkpoint_root=str(out / "checkpoints"), tensorboard_dir=str(out / "tb"), max_steps=args.steps,
            resources_out=str(out / "resources.csv") if sampled else "", resource_interval_s=args.interval,
            **SETTINGS)
        before_spent = dict(spent)
        cpu0 = cpu_seconds()
        metrics = train.main(cfg)
        runs.append({"sampling": sampled, "train_seconds": metrics["train_seconds"],
                     "wall_time_s": metrics["wall_time_s"], "process_cpu_s": round(cpu_seconds() - cpu0, 2),
                     "sampler_cpu_s": round(spent["cpu_s"] - before_spent["cpu_s"], 5),
                     "samples": spent["samples"] - before_spent["samples"]})
        log.info("run %d: %s", i, runs[-1])
    on = [r for r in runs if r["sampling"]]
    off = [r for r in runs if not r["sampling"]]

    def median(rs, key):
        return statistics.median(r[key] for r in rs)

    result = {
        "interval_s": args.interval, "steps": args.steps, "repeats": args.repeats, "runs": runs,
        "train_seconds_off": median(off, "train_seconds"), "train_seconds_on": median(on, "train_seconds"),
        "process_cpu_s_off": median(off, "process_cpu_s"), "process_cpu_s_on": median(on, "process_cpu_s"),
        "sampler_cpu_s": median(on, "sampler_cpu_s"), "samples": median(on, "samples"),
    }
    result["wall_overhead_pct"] = round(100 * (result["train_seconds_on"] / result["train_seconds_off"] - 1), 2)
    result["cpu_overhead_pct"] = round(100 * (result["process_cpu_s_on"] / result["process_cpu_s_off"] - 1), 2)
    result["sampler_share_pct"] = round(100 * result["sampler_cpu_s"] / result["train_seconds_on"], 4)
    log.info("\n%s", table([(k, v) for k, v in result.items() if k != "runs"], "Resource sampling overhead"))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
