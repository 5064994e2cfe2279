r"""The GPU check: one prepared run that proves the stack on a GPU machine lent for minutes (issue 18, part 1).

    python scripts/tools/gpu_check.py bundle             # here: the wheels the GPU machine lacks -> .gpu-bundle/
    python scripts/tools/gpu_check.py bundle DIR 3.11    # the same for this Python, to rehearse the install here
    python scripts/tools/gpu_check.py plan               # here: size check (tree + bundle <= 64 MiB), the run call
    python3 scripts/tools/gpu_check.py [--budget 500]    # there: install the bundle, run steps a-e -> $OUT/*.json
    python scripts/tools/gpu_check.py --dry              # here: every step's plumbing on the CPU, small sizes

Steps (tools.benchmarks.gpucheck has the order, sizes and time caps): a the workflow end to end on the GPU
(demo preset, 4-bit QLoRA in bf16, merge, evaluate with generation); b bench.py train on Llama-3.1-8B's
architecture (random weights), micro-batch 1, seq 2048, checkpointing, ours vs plain TRL+PEFT; c the same at a
throughput setting and with each speed lever flipped; d streaming merge vs peft of the 8B model in bf16; e the
seed workflow's quick test (500 rows x 1 epoch) through the train stage, job start to adapter saved. Figures go
as JSON to --out ($OUT when set, else results/gpu-check): env.json, a.json ... e.json, summary.json; a summary
table is printed at the end. `make gpu-check` runs it (DRY=1 for the dry run).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the library, where nothing is installed

from hpc_finetune.io.cli import setup_logging  # noqa: E402
from tools.benchmarks import bundle, gpucheck  # noqa: E402


def plan(args) -> int:
    sizes = bundle.carried(bundle.REPO, Path(args.bundle))
    mib = {k: v / 2**20 for k, v in sizes.items() if k.endswith("_bytes")}
    print(f"working tree {mib['tree_bytes']:.2f} MiB + bundle {mib['bundle_bytes']:.2f} MiB = "
          f"{mib['total_bytes']:.2f} MiB of the {mib['limit_bytes']:.0f} MiB one call carries")
    if not sizes["bundle_bytes"]:
        print(f"no bundle in {args.bundle}: run `make gpu-bundle` first")
    if not sizes["fits"]:
        print("too big: the device tool refuses the call")
        return 1
    print("the device tool's `run`, the whole check (one call):")
    print(json.dumps(gpucheck.invocation(gpucheck.GPU.budget_s), indent=2))
    print("then, with the time left (a later session too), every lever of step c:")
    print(json.dumps(gpucheck.invocation(420, " --only c --levers all"), indent=2))
    return 0 if sizes["bundle_bytes"] else 1


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_step"]:
        from tools.benchmarks.gpusteps import run_step

        run_step(argv[1], json.loads(argv[2]))
        return 0
    if argv[:1] == ["bundle"]:  # bundle [FOLDER [PYTHON_VERSION]]
        folder = Path(argv[1] if len(argv) > 1 else bundle.REPO / bundle.BUNDLE_DIR)
        report = bundle.build(folder, *argv[2:3])
        print(f"{len(report['wheels'])} wheels, {report['bytes'] / 2**20:.1f} MiB in {folder}")
        return plan(argparse.Namespace(bundle=str(folder)))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", choices=["check", "plan"], default="check")
    parser.add_argument("--dry", action="store_true", help="the plumbing on the CPU: small model, few steps")
    parser.add_argument("--only", help="steps to run, e.g. b,c (the model build comes with them)")
    parser.add_argument("--levers", default="core",
                        help="levers of step c: core, all, or names ("
                             + ", ".join(lv.name for lv in gpucheck.LEVERS) + ")")
    parser.add_argument("--budget", type=int, help="seconds for the whole check; default 500 on a GPU, none dry (each step to its end)")
    parser.add_argument("--out", help="folder of the JSON figures; default $OUT, else results/gpu-check")
    parser.add_argument("--work", default=str(bundle.REPO / "results" / "gpu-check-work"),
                        help="models, runs and logs (the 8B model takes 16 GB)")
    parser.add_argument("--bundle", default=str(bundle.REPO / bundle.BUNDLE_DIR), help="folder of the wheels")
    parser.add_argument("--site", default="/tmp/gpu-check-site", help="where the wheels are installed")
    parser.add_argument("--install", action="store_true", help="install the bundle even in a dry run")
    args = parser.parse_args(argv)
    if args.command == "plan":
        return plan(args)
    print("gpu-check:", shlex.join([sys.executable, *sys.argv]), flush=True)
    summary = gpucheck.run_check(args)
    return 0 if all(s["status"] == "ok" for s in summary["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
