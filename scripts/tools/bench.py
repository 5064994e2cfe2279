r"""Performance benchmarks: our train stage against a plain TRL+PEFT baseline, the streaming merge against peft's
merge_and_unload, and the workflow's own overhead.

    python scripts/tools/bench.py train [--preset auto] [--steps 12] [--warmup 3] [--out results/bench/train.json]
    python scripts/tools/bench.py merge [--arch llama-1b] [--out results/bench/merge.json]
    python scripts/tools/bench.py workflow [--directory .] [--out results/bench/workflow.json]
    python scripts/tools/bench.py workflow --runs 1 10 50 [--out results/bench/workflow-runs.json]
    python scripts/tools/bench.py data [--rows 20000 200000 1000000] [--formats jsonl csv parquet] [--out ...]
    python scripts/tools/bench.py evaluate --vllm .venv-vllm/bin/python [--run results/demo] [--prompts 1000]

train: for the architecture of a preset (random weights of the real config: nothing is downloaded), runs N
optimizer steps of scripts/train.py (our stage, with its speed levers at their defaults) and, in the same
invocation, of `baseline()` below: a plain TRL SFTTrainer + PEFT LoRA script with the same model, data, micro-batch,
gradient accumulation, sequence length, quantization, LoRA, learning rate, precision and gradient checkpointing, and
TRL's defaults for everything else. Each runs in its own process. The first `warmup` steps are not timed. Printed
and written as JSON: tokens/s (non-padding tokens), step time, peak GPU memory (peak RSS on the CPU), estimated MFU
(6 * parameters * tokens/s over the device's peak dense bf16 FLOP/s; on the CPU over a measured fp32 matmul rate),
and our ratio to the baseline. Without a GPU the preset is the demo's tiny model, so it always runs. The JSON is
rewritten after each run, so a killed benchmark leaves what it measured (`complete: false`); with --keep-going a
failed --variant run is recorded under `failed` and the others still run.

merge: builds a random Llama (~1.1B parameters by default, bfloat16, sharded) and a LoRA adapter, then merges it
in two child processes, peft (load, merge_and_unload, save_pretrained) and the streaming merge; reports
each one's peak RSS (their own, from wait4) and time, and the largest shard.

workflow: on a completed run, the wall time of a dry-run (`snakemake -n`) and of a no-op re-run.

data: the data stage on generated demo-shaped chat rows of each size, in a child process each: rows/s and peak RSS;
then the train stage's loading of what it wrote (time, peak RSS).

evaluate: the evaluate stage with evaluate.engine transformers and vllm, each in a child process, on a completed
run (--run: the demo's) and on --prompts generated questions answered by the `small` architecture with random
weights: stage wall time, answer time (vLLM's load time apart), answers/s, vLLM's ratio, whether the answers agree.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: the tools' package and the library

from hpc_finetune.io.cli import setup_logging  # noqa: E402
from tools.benchmarks.data import bench_data, data_child, train_data_child  # noqa: E402
from tools.benchmarks.evaluate import bench_evaluate  # noqa: E402
from tools.benchmarks.merge import bench_merge, merge_child  # noqa: E402
from tools.benchmarks.models import ARCHS  # noqa: E402
from tools.benchmarks.train import bench_train, child  # noqa: E402
from tools.benchmarks.workflow import bench_workflow  # noqa: E402


def main(argv: list[str] | None = None) -> Any:
    setup_logging()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        return child(*argv[1:4])
    if argv[:1] == ["_merge_child"]:
        return merge_child(*argv[1:6])
    if argv[:1] == ["_data_child"]:
        return data_child(*argv[1:4])
    if argv[:1] == ["_train_data_child"]:
        return train_data_child(*argv[1:3])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="our train stage vs a plain TRL+PEFT baseline")
    tr.add_argument("--preset", default="auto",
                    help="demo, small, llama-1b, tinyllama-1.1b, llama3-8b-medical, mistral-7b; auto: 8B on a GPU, "
                         "demo on the CPU")
    tr.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    tr.add_argument("--warmup", type=int, default=3, help="first steps not timed")
    tr.add_argument("--repeats", type=int, default=1,
                    help="runs of each kind, interleaved; the median counts (use 3+ on a shared machine)")
    tr.add_argument("--micro-batch-size", type=int)
    tr.add_argument("--gradient-accumulation", type=int)
    tr.add_argument("--max-seq-length", type=int)
    tr.add_argument("--quantization", choices=["4bit", "8bit", "none"])
    tr.add_argument("--gradient-checkpointing", choices=["true", "false"])
    tr.add_argument("--threads", type=int, default=1 if not _cuda() else 8, help="torch threads (CPU)")
    tr.add_argument("--ours", action="append", default=[], metavar="KEY=VALUE",
                    help="override one of our stage's training keys (e.g. padding_free=false)")
    tr.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                    help="also run ours with these keys changed (a lever measured against the defaults)")
    tr.add_argument("--keep-going", action="store_true",
                    help="a failed --variant run is recorded as failed and the others still run")
    tr.add_argument("--child-timeout", type=float, help="seconds one run may take before it is killed")
    tr.add_argument("--work", default="results/bench")
    tr.add_argument("--out", default="results/bench/train.json")
    mg = sub.add_parser("merge", help="streaming merge vs peft merge_and_unload (CPU)")
    mg.add_argument("--arch", default="tinyllama-1.1b", choices=sorted(ARCHS))
    mg.add_argument("--base", help="merge into this model directory (bf16 safetensors) instead of building one")
    mg.add_argument("--max-shard-size", default="1GB")
    mg.add_argument("--methods", nargs="+", default=["peft", "streaming"])
    mg.add_argument("--work", default="results/bench")
    mg.add_argument("--out", default="results/bench/merge.json")
    wf = sub.add_parser("workflow", help="dry-run and no-op re-run time of a completed run")
    wf.add_argument("--directory", default=".")
    wf.add_argument("--profile", default="profiles/local")
    wf.add_argument("--repeats", type=int, default=3)
    wf.add_argument("--snakemake-args", nargs="*", default=[])
    wf.add_argument("--runs", type=int, nargs="+", help="instead: dry-run time of experiments of N runs (e.g. 1 10 50)")
    wf.add_argument("--work", default="results/bench", help="where --runs makes its projects")
    wf.add_argument("--out", default="results/bench/workflow.json")
    dt = sub.add_parser("data", help="the data stage's rows/s and peak RSS on generated demo-shaped rows")
    dt.add_argument("--rows", type=int, nargs="+", default=[20000, 200000, 1000000], help="dataset sizes")
    dt.add_argument("--formats", nargs="+", default=["jsonl"], choices=["jsonl", "csv", "parquet"],
                    help="the input's file type (csv, parquet: the same rows as prompt/completion columns)")
    dt.add_argument("--child-timeout", type=float, help="seconds one size may take before it is killed")
    dt.add_argument("--work", default="results/bench")
    dt.add_argument("--out", default="results/bench/data.json")
    ev = sub.add_parser("evaluate", help="the evaluate stage with transformers vs vLLM generating the answers")
    ev.add_argument("--vllm", required=True, help="vLLM's interpreter (make vllm-env: .venv-vllm/bin/python)")
    ev.add_argument("--engines", nargs="+", default=["transformers", "vllm"], choices=["transformers", "vllm"])
    ev.add_argument("--run", help="a completed run directory (results/demo): its models and held-out rows")
    ev.add_argument("--prompts", type=int, default=1000, help="generated test prompts for the small model; 0: none")
    ev.add_argument("--max-new-tokens", type=int, default=32, help="answer budget on the generated test set")
    ev.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile warm-up")
    ev.add_argument("--work", default="results/bench")
    ev.add_argument("--out", default="results/bench/evaluate.json")
    args = parser.parse_args(argv)
    return {"train": bench_train, "merge": bench_merge, "workflow": bench_workflow,
            "data": bench_data, "evaluate": bench_evaluate}[args.command](args)


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
