"""`bench.py evaluate`: the evaluate stage with each generator (evaluate.engine transformers and vllm), in a child
process each, on a completed run (the demo's: its base, merged model and held-out rows) and on a generated test set
of demo-shaped questions answered by the `small` preset's architecture with random weights (so every answer runs to
max_new_tokens). Per engine: the stage's wall time, the answers' time (vLLM: plus its load time) and answers/s;
and vLLM's ratio to transformers."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from hpc_finetune.io.cli import log, table
from hpc_finetune.io.files import write_json
from tools.benchmarks.data import demo_model
from tools.benchmarks.models import DEMO_DATA, REPO, build_random_model, run_child

EVALUATE = REPO / "scripts" / "evaluate.py"


def test_set(directory: Path, prompts: int) -> Path:
    """model.json-free data files: `prompts` demo-shaped chat rows as test.jsonl, 8 train rows, no eval rows."""
    directory.mkdir(parents=True, exist_ok=True)
    demo = [json.loads(line) for line in DEMO_DATA.read_text().splitlines()]
    rows = []
    for i in range(prompts):
        system, user, assistant = demo[i % len(demo)]["messages"]
        rows.append({"messages": [system, {"role": "user", "content": f"{user['content']} (case {i})"},
                                  {"role": "assistant", "content": f"{assistant['content']} (case {i})"}]})
    for name, part in (("test", rows), ("train", rows[:8]), ("eval", [])):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return directory


def cases(args, root: Path) -> dict[str, dict]:
    found = {}
    if args.run:
        run = Path(args.run)
        found["demo"] = {"model_json": run / "model" / "model.json", "finetuned": run / "merged", "data": run / "data",
                         "num_samples": "null",  # the run's own answer budget
                         "max_new_tokens": json.loads((run / "metrics" / "evaluate.json").read_text())["max_new_tokens"]}
    if args.prompts:
        tokenizer = Path(json.loads(demo_model(root / "demo").read_text())["path"])
        model = build_random_model("small", root / "models" / "small", tokenizer, "float32")
        record = root / "small.json"
        record.write_text(json.dumps({"path": str(model)}))
        found[f"small-{args.prompts}"] = {"model_json": record, "finetuned": model,
                                          "data": test_set(root / f"data-{args.prompts}", args.prompts),
                                          "num_samples": str(args.prompts), "max_new_tokens": args.max_new_tokens}
    return found


def run_engine(case: dict, engine: str, vllm: str, out: Path, enforce_eager: bool) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    data = case["data"]
    argv = [str(EVALUATE), "--model-json", str(case["model_json"]), "--finetuned", str(case["finetuned"]),
            "--merged", "true", "--train-data", str(data / "train.jsonl"), "--eval-data", str(data / "eval.jsonl"),
            "--test-data", str(data / "test.jsonl"), "--num-samples", case["num_samples"],
            "--max-new-tokens", str(case["max_new_tokens"]), "--max-train-rows", "8", "--engine", engine,
            "--vllm", vllm if engine == "vllm" else "", "--vllm-enforce-eager", str(enforce_eager).lower(),
            "--metrics-out", str(out / "evaluate.json"), "--samples-out", str(out / "samples.jsonl")]
    status, wall = run_child(argv, env={"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")})
    if status != 0:
        return {"failed": f"exit {status}"}
    metrics = json.loads((out / "evaluate.json").read_text())
    models = metrics["generation"]["models"]
    answers = 2 * metrics["samples_generated"]
    generate_s = sum(m["generate_s"] for m in models.values())
    return {"wall_s": round(wall, 1), "answers": answers, "generate_s": round(generate_s, 1),
            "load_s": round(sum(m.get("load_s", 0) for m in models.values()), 1),
            "answers_per_s": round(answers / generate_s, 2), "exact_match": metrics["eval_exact_match"],
            "finetuned_answers": [json.loads(line)["finetuned_answer"] for line in
                                  (out / "samples.jsonl").read_text().splitlines()]}


def bench_evaluate(args) -> dict:
    from tools.benchmarks.models import device_info

    root = Path(args.work) / "evaluate"
    vllm = str(Path(args.vllm).absolute()) if Path(args.vllm).exists() else args.vllm  # vLLM runs in another cwd
    report = {"device": device_info(1)["device"], "engines": args.engines, "cases": {}}
    for name, case in cases(args, root).items():
        runs = {engine: run_engine(case, engine, vllm, root / "runs" / name / engine, args.enforce_eager)
                for engine in args.engines}
        answers = {e: r.pop("finetuned_answers", None) for e, r in runs.items()}
        result = {"max_new_tokens": case["max_new_tokens"], "runs": runs}
        hf, fast = runs.get("transformers", {}), runs.get("vllm", {})
        if "wall_s" in hf and "wall_s" in fast:
            result["vllm_over_transformers"] = {"wall": round(fast["wall_s"] / hf["wall_s"], 2),
                                                "answers_per_s": round(fast["answers_per_s"] / hf["answers_per_s"], 2)}
            result["same_answers"] = answers["vllm"] == answers["transformers"]
        report["cases"][name] = result
        write_json(args.out, report)
    rows = [("case / engine", "stage wall s, answers, answer s (+ vLLM load s), answers/s")]
    for name, result in report["cases"].items():
        for engine, run in result["runs"].items():
            rows.append((f"{name} / {engine}", run.get("failed") or (
                f"{run['wall_s']}, {run['answers']}, {run['generate_s']} (+{run['load_s']}), {run['answers_per_s']}")))
        if "vllm_over_transformers" in result:
            rows.append((f"{name} vllm/transformers", f"wall x{result['vllm_over_transformers']['wall']}, answers/s "
                         f"x{result['vllm_over_transformers']['answers_per_s']}, same answers {result['same_answers']}"))
    log.info("\n%s", table(rows, f"evaluate stage by engine on {report['device']}"))
    return report
