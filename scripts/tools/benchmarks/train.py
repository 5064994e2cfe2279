"""`bench.py train`: our train stage (scripts/train.py, its speed levers at their defaults) against a plain TRL
SFTTrainer + PEFT script (`baseline()`), N optimizer steps each, in child processes, with the same model, data
and settings; tokens/s, step time, peak memory and MFU, and our ratio to the baseline."""

from __future__ import annotations

import functools
import json
import random
import runpy
import shutil
import time
from pathlib import Path

from hpc_finetune.data.source import dataset_texts
from hpc_finetune.io.cli import log, parse_args
from hpc_finetune.io.files import write_json
from hpc_finetune.io.measure import peak_rss_mb
from hpc_finetune.model.demo import build as build_demo
from hpc_finetune.model.params import count_parameters
from hpc_finetune.train.run import PATH_FIELDS
from hpc_finetune.workflow.config import load_presets, resolve_config
from tools.benchmarks.models import BENCH, DEMO_DATA, REPO, build_random_model, device_info, run_child


@functools.cache
def train_program() -> dict:
    """The train stage program's namespace (Config, main), loaded from its file: what the workflow runs."""
    return runpy.run_path(str(REPO / "scripts" / "train.py"), run_name="train_stage")


def timer_callback(warmup: int):
    """Marks (time, tokens seen) at the end of each optimizer step, and the model's parameter count."""
    import torch
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self):
            self.marks: list[tuple[float, int]] = []
            self.params = 0

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is not None:
                self.params = count_parameters(model)[1]  # 4-bit weights counted unpacked
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), state.num_input_tokens_seen))

        def summary(self) -> dict:
            if len(self.marks) <= warmup:
                raise SystemExit(f"only {len(self.marks)} steps ran; need more than warmup={warmup}")
            first = max(warmup, 1) - 1  # timing starts at the end of the last warm-up step
            (t0, n0), (t1, n1) = self.marks[first], self.marks[-1]
            steps = len(self.marks) - 1 - first
            out = {"tokens_per_s": (n1 - n0) / (t1 - t0), "step_time_s": (t1 - t0) / steps, "timed_steps": steps,
                   "tokens": n1 - n0, "parameters": self.params}
            if torch.cuda.is_available():
                out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
                out["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
            return out

    return Timer()


def baseline(spec: dict, callback) -> None:
    """The plain TRL+PEFT script: what a user writes from the TRL and PEFT docs, with the benchmark's settings."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    s = spec["settings"]
    dtype = torch.bfloat16 if spec["bf16"] else torch.float32
    quant = None
    if s["quantization"] == "4bit":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype)
    elif s["quantization"] == "8bit":
        quant = BitsAndBytesConfig(load_in_8bit=True)
    trainer = SFTTrainer(
        model=spec["model"],
        args=SFTConfig(
            output_dir=spec["work"] + "/baseline", max_steps=spec["steps"], learning_rate=s["learning_rate"],
            per_device_train_batch_size=s["micro_batch_size"], gradient_accumulation_steps=s["gradient_accumulation"],
            max_length=s["max_seq_length"], bf16=spec["bf16"], gradient_checkpointing=s["gradient_checkpointing"],
            logging_steps=s["logging_steps"], save_strategy="no", seed=s["seed"], use_cpu=not spec["cuda"],
            include_num_input_tokens_seen="non_padding",
            model_init_kwargs={"dtype": dtype, "device_map": {"": 0} if spec["cuda"] else "cpu"},
        ),
        train_dataset=load_dataset("json", data_files=spec["train"], split="train"),
        processing_class=AutoTokenizer.from_pretrained(spec["model"]),
        peft_config=LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=s["lora_dropout"],
                               target_modules=s["target_modules"], task_type="CAUSAL_LM"),
        quantization_config=quant,
        callbacks=[callback],
    )
    trainer.train()


def ours(spec: dict, callback, variant: str = "ours") -> None:
    """Our train stage (scripts/train.py main) with the same settings and its speed levers at their defaults."""
    train = train_program()
    work = Path(spec["work"])
    (work / "model.json").write_text(json.dumps({"path": spec["model"]}))
    (work / "preflight.json").write_text(json.dumps({"device": "cuda" if spec["cuda"] else "cpu",
                                                      "bf16": spec["bf16"]}))
    (work / "eval.jsonl").write_text("")
    fields = set(train["Config"].__dataclass_fields__)
    settings = {k: v for k, v in spec["settings"].items() if k in fields}
    settings.update(max_steps=spec["steps"], save_steps=10**6, eval_steps=10**6,
                    bf16=spec["bf16"], **spec["variants"][variant])
    cfg = train["Config"](
        model_json=str(work / "model.json"), train_data=spec["train"], eval_data=str(work / "eval.jsonl"),
        preflight=str(work / "preflight.json"), output_dir=str(work / "ours-adapter"),
        metrics_out=str(work / "ours-metrics.json"), checkpoint_root=str(work / "ours-checkpoints"),
        tensorboard_dir=str(work / "ours-tb"), **settings,
    )
    shutil.rmtree(work / "ours-checkpoints", ignore_errors=True)  # a fresh run, never a resumed one
    shutil.rmtree(work / "ours-adapter", ignore_errors=True)
    train["main"](cfg, callbacks=(callback,))


def child(kind: str, spec_path: str, out_path: str) -> None:
    """One timed run in this process: `baseline`, or a variant of ours (`ours`, `ours[padding_free=false]`, ...)."""
    import torch

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    callback = timer_callback(spec["warmup"])
    if kind == "baseline":
        baseline(spec, callback)
    else:
        ours(spec, callback, kind)
    result = callback.summary()
    result["peak_rss_mb"] = peak_rss_mb()
    Path(out_path).write_text(json.dumps(result))


def text_rows(tokenizer, n: int, max_tokens: int, seed: int) -> list[dict]:
    """n text rows of random lengths between max_tokens/8 and max_tokens - 4 tokens, cut from the demo answers:
    the length spread of real instruction data, every row within max_seq_length (as the data stage ensures)."""
    corpus = " ".join(json.loads(line)["messages"][-1]["content"] for line in DEMO_DATA.read_text().splitlines())
    ids = tokenizer(corpus, add_special_tokens=False)["input_ids"]
    while len(ids) < max_tokens * 2:
        ids = ids + ids
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = rng.randint(max(8, max_tokens // 8), max_tokens - 4)
        start = rng.randrange(0, len(ids) - length)
        text = tokenizer.decode(ids[start:start + length])
        while len(tokenizer(text)["input_ids"]) > max_tokens - 2:  # decode/encode need not round-trip exactly
            text = text[: int(len(text) * 0.95)]
        rows.append({"text": text})
    return rows


def bench_train(args) -> dict:
    import torch
    from transformers import AutoTokenizer

    cuda = torch.cuda.is_available()
    preset = args.preset if args.preset != "auto" else ("llama3-8b-medical" if cuda else "demo")
    root = Path(args.work)
    root.mkdir(parents=True, exist_ok=True)
    demo_dir = root / "models" / "demo"
    if not (demo_dir / "config.json").is_file():
        build_demo(dataset_texts(str(DEMO_DATA)), demo_dir, 0, DEMO_DATA.name)
    # the preset's training settings; an architecture without a preset of its own takes the demo's on the CPU
    # and the 8B preset's on a GPU
    settings_preset = preset if preset in load_presets("models") else ("llama3-8b-medical" if cuda else "demo")
    settings = resolve_config({"run_name": "bench", "preset": settings_preset})["training"]
    model = demo_dir if preset == "demo" else build_random_model(
        preset, root / "models" / preset, demo_dir, "bfloat16" if cuda else "float32")
    for key in ("micro_batch_size", "gradient_accumulation", "max_seq_length", "quantization"):
        if getattr(args, key, None) is not None:
            settings[key] = getattr(args, key)
    if args.gradient_checkpointing is not None:
        settings["gradient_checkpointing"] = args.gradient_checkpointing == "true"
    bf16 = cuda and torch.cuda.is_bf16_supported() if settings["bf16"] == "auto" else bool(settings["bf16"])
    tokenizer = AutoTokenizer.from_pretrained(model)
    work = root / f"train-{preset}"
    work.mkdir(parents=True, exist_ok=True)
    rows_needed = args.steps * settings["micro_batch_size"] * settings["gradient_accumulation"] + 8
    train_path = work / "train.jsonl"
    train_path.write_text("".join(json.dumps(r) + "\n" for r in text_rows(
        tokenizer, rows_needed, settings["max_seq_length"], settings["seed"])))
    spec = {"model": str(model), "train": str(train_path), "work": str(work), "steps": args.steps,
            "warmup": args.warmup, "threads": args.threads, "cuda": cuda, "bf16": bf16, "settings": settings,
            "variants": {"ours": overrides(args.ours)}}
    for variant in args.variant:  # ours with some levers changed, e.g. "padding_free=false"
        spec["variants"][f"ours[{variant}]"] = {**spec["variants"]["ours"], **overrides(variant.split(","))}
    (work / "spec.json").write_text(json.dumps(spec, indent=2))
    info = device_info(args.threads)
    runs: dict[str, list[dict]] = {kind: [] for kind in ("baseline", *spec["variants"])}
    failed: dict[str, str] = {}
    head = {"benchmark": "train", "preset": preset, "model": str(model), **info, "steps": args.steps,
            "warmup_steps": args.warmup, "repeats": args.repeats, "bf16": bf16, "threads": args.threads,
            "settings": {k: settings[k] for k in ("micro_batch_size", "gradient_accumulation", "max_seq_length",
                                                  "quantization", "lora_r", "lora_alpha", "target_modules",
                                                  "gradient_checkpointing", "learning_rate")},
            "ours_levers": {k: settings.get(k) for k in LEVERS} | spec["variants"]["ours"]}
    for repeat in range(args.repeats):  # interleaved, so that a change of the machine's load hits every kind
        for kind in runs:
            if kind in failed:
                continue
            log.info("running %s (%d steps, %d timed; repeat %d of %d)", kind, args.steps, args.steps - args.warmup,
                     repeat + 1, args.repeats)
            out = work / f"{kind.replace('=', '-')}.json"
            out.unlink(missing_ok=True)
            status, wall = run_child([str(BENCH), "_child", kind, str(work / "spec.json"), str(out)],
                                     {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads)},
                                     timeout=args.child_timeout)
            if status != 0 or not out.is_file():
                why = f"timed out after {args.child_timeout} s" if status is None else f"exit status {status}"
                if not args.keep_going or kind in ("baseline", "ours"):
                    write_json(args.out, train_report(head, runs, {**failed, kind: why}, complete=False))
                    raise SystemExit(f"the {kind} run failed ({why}); see its log above")
                log.error("the %s run failed (%s); going on with the others (--keep-going)", kind, why)
                failed[kind] = why
                continue
            runs[kind].append({**json.loads(out.read_text()), "wall_s": wall})
            write_json(args.out, train_report(head, runs, failed, complete=False))  # what is measured so far
    report = train_report(head, runs, failed, complete=True)
    print(train_table(report))
    write_json(args.out, report)
    log.info("wrote %s", args.out)
    return report


def train_report(head: dict, runs: dict[str, list[dict]], failed: dict[str, str], complete: bool) -> dict:
    """The report of the runs measured so far: for each kind the run of median tokens/s, its MFU, and our ratio
    to the baseline once both ran. `failed`: the kinds that failed, and why."""
    results = {}
    for kind, samples in runs.items():
        if not samples:
            continue
        ordered = sorted(samples, key=lambda r: r["tokens_per_s"])
        results[kind] = {**ordered[len(ordered) // 2], "tokens_per_s_all": [r["tokens_per_s"] for r in samples]}
        params = results[kind]["parameters"]
        results[kind]["mfu"] = (6 * params * results[kind]["tokens_per_s"] / head["peak_flops"]
                                if head["peak_flops"] else None)
    both = "ours" in results and "baseline" in results
    return {**head, "results": results, "failed": failed, "complete": complete,
            "speedup_tokens_per_s": results["ours"]["tokens_per_s"] / results["baseline"]["tokens_per_s"]
            if both else None,
            "memory_ratio": memory_of(results["ours"]) / memory_of(results["baseline"]) if both else None,
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}


def overrides(pairs: list[str]) -> dict:
    """KEY=VALUE settings of our stage, typed as its command line types them."""
    values = dict(pair.split("=", 1) for pair in pairs if pair)
    argv = [a for f in PATH_FIELDS for a in (f"--{f.replace('_', '-')}", "x")]
    argv += [a for k, v in values.items() for a in (f"--{k.replace('_', '-')}", v)]
    cfg = parse_args(train_program()["Config"], argv)
    return {k: getattr(cfg, k) for k in values}


LEVERS = ("padding_free", "packing", "attn_implementation", "gradient_checkpointing_mode", "torch_compile",
          "liger_kernels", "optim", "dataloader_num_workers", "dataloader_pin_memory")


def memory_of(result: dict) -> float:
    return result.get("peak_gpu_gib", result["peak_rss_mb"] / 1024)


def train_table(report: dict) -> str:
    gpu = "peak_gpu_gib" in report["results"]["ours"]
    width = max(10, *(len(k) + 2 for k in report["results"]))
    header = (f"{'run':<{width}}{'tokens/s':>12}{'x ours':>8}{'step s':>10}"
              f"{'peak GPU GiB' if gpu else 'peak RSS MB':>14}{'MFU':>9}")
    ours = report["results"]["ours"]["tokens_per_s"]
    lines = [f"train benchmark: {report['preset']} on {report['device']}",
             f"settings: {json.dumps(report['settings'])}", f"our levers: {json.dumps(report['ours_levers'])}",
             header, "-" * len(header)]
    for kind, r in report["results"].items():
        mem = f"{r['peak_gpu_gib']:.2f}" if gpu else f"{r['peak_rss_mb']:.0f}"
        mfu = f"{100 * r['mfu']:.2f}%" if r["mfu"] is not None else "n/a"
        spread = "" if len(r["tokens_per_s_all"]) < 2 else "  (runs: " + ", ".join(
            f"{t:,.0f}" for t in r["tokens_per_s_all"]) + ")"
        lines.append(f"{kind:<{width}}{r['tokens_per_s']:>12,.0f}{r['tokens_per_s'] / ours:>8.2f}"
                     f"{r['step_time_s']:>10.3f}{mem:>14}{mfu:>9}{spread}")
    lines += [f"{kind:<{width}}failed: {why}" for kind, why in report.get("failed", {}).items()]
    lines.append(f"ours / baseline: {report['speedup_tokens_per_s']:.2f}x tokens/s, "
                 f"{report['memory_ratio']:.2f}x peak memory")
    lines.append(f"MFU = 6 x {report['results']['ours']['parameters']:,} parameters x tokens/s / "
                 f"{report['peak_flops'] / 1e12:.3g} TFLOP/s ({report['peak_source']})" if report["peak_flops"]
                 else "MFU: peak FLOP/s of this device unknown")
    return "\n".join(lines)
