r"""Performance benchmarks: our train stage against a plain TRL+PEFT baseline, the streaming merge against peft's
merge_and_unload, and the workflow's own overhead.

    python scripts/bench.py train [--preset auto] [--steps 12] [--warmup 3] [--out results/bench/train.json]
    python scripts/bench.py merge [--arch llama-1b] [--out results/bench/merge.json]
    python scripts/bench.py workflow [--directory .] [--out results/bench/workflow.json]

train: for the architecture of a preset (random weights of the real config: nothing is downloaded), runs N
optimizer steps of scripts/train.py (our stage, with its speed levers at their defaults) and, in the same
invocation, of `baseline()` below: a plain TRL SFTTrainer + PEFT LoRA script with the same model, data, micro-batch,
gradient accumulation, sequence length, quantization, LoRA, learning rate, precision and gradient checkpointing, and
TRL's defaults for everything else. Each runs in its own process. The first `warmup` steps are not timed. Printed
and written as JSON: tokens/s (non-padding tokens), step time, peak GPU memory (peak RSS on the CPU), estimated MFU
(6 * parameters * tokens/s over the device's peak dense bf16 FLOP/s; on the CPU over a measured fp32 matmul rate),
and our ratio to the baseline. Without a GPU the preset is the demo's tiny model, so it always runs.

merge: builds a random Llama (~1.1B parameters by default, bfloat16, sharded) and a LoRA adapter, then merges it
in two child processes, peft (load, merge_and_unload, save_pretrained) and scripts/merge_streaming.py; reports
each one's peak RSS (their own, from wait4) and time, and the largest shard.

workflow: on a completed run, the wall time of a dry-run (`snakemake -n`) and of a no-op re-run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))
sys.path.insert(0, str(REPO / "workflow"))

from common import log, peak_rss_mb, setup_logging, table, write_json  # noqa: E402

# Architectures of the presets (their real configs, random weights). `demo` is the demo's own tiny model.
ARCHS: dict[str, dict] = {
    "llama3-8b-medical": dict(  # meta-llama/Llama-3.1-8B
        model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False),
    "mistral-7b": dict(  # mistralai/Mistral-7B-v0.3
        model_type="mistral", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=32768, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama-1b": dict(  # meta-llama/Llama-3.2-1B (1.24B parameters)
        model_type="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=8192, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True),
    "tinyllama-1.1b": dict(  # TinyLlama-1.1B (1.10B parameters, untied 32k vocabulary)
        model_type="llama", hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
        intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048, rope_theta=10000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False),
    "small": dict(  # a slightly bigger random Llama for CPU runs
        model_type="llama", hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
        intermediate_size=688, vocab_size=8192, max_position_embeddings=2048, rms_norm_eps=1e-5,
        tie_word_embeddings=False),
}
# Peak dense bf16 tensor FLOP/s (no sparsity), by device name.
PEAK_FLOPS = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
              ("A10", 125e12), ("L4", 121e12), ("RTX 4090", 165e12), ("A6000", 155e12)]
DEMO_DATA = REPO / "data" / "demo" / "medical_qa.jsonl"


# --- shared helpers --------------------------------------------------------------------------------------------------


def device_info(threads: int) -> dict:
    """Device name and peak FLOP/s: the datasheet figure of a known GPU; on the CPU a measured fp32 matmul rate."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        peak = next((flops for key, flops in PEAK_FLOPS if key in name), None)
        return {"device": name, "peak_flops": peak, "peak_source": "datasheet dense bf16" if peak else "unknown"}
    torch.set_num_threads(threads)
    a = torch.randn(1024, 1024)
    a @ a
    start, n = time.perf_counter(), 20
    for _ in range(n):
        a @ a
    rate = n * 2 * 1024**3 / (time.perf_counter() - start)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "CPU") if Path("/proc/cpuinfo").is_file() else "CPU"
    return {"device": f"{cpu} ({threads} thread{'s' * (threads > 1)}, {os.cpu_count()} cores)", "peak_flops": rate,
            "peak_source": "measured fp32 1024x1024 matmul"}


def run_child(args: list[str], env: dict | None = None) -> tuple[int, float]:
    """Run a child Python process; return its exit status and wall seconds. The child reports its own peak RSS
    (peak_rss_mb): its rusage would not do, Linux counts the parent's resident set at fork/exec into ru_maxrss."""
    start = time.perf_counter()
    status = subprocess.run([sys.executable, *args], env={**os.environ, **(env or {})}).returncode
    return status, time.perf_counter() - start


def build_random_model(arch: str, out: Path, tokenizer_dir: Path | None, dtype: str = "bfloat16") -> Path:
    """A model with the architecture's real config and random weights, saved in `dtype` (cached in `out`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (out / "config.json").is_file():
        return out
    spec = dict(ARCHS[arch])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec, dtype=dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    log.info("building a random %s (%s) on %s", arch, dtype, device)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="1GB")
    del model
    if tokenizer_dir is not None:
        for path in tokenizer_dir.iterdir():
            if path.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy2(path, tmp / path.name)
    tmp.rename(out)
    return out


# --- train benchmark -------------------------------------------------------------------------------------------------


def timer_callback(warmup: int):
    """Marks (time, tokens seen) at the end of each optimizer step, and the model's parameter count."""
    import torch
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self):
            self.marks: list[tuple[float, int]] = []
            self.params = 0

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is not None and hasattr(model, "get_nb_trainable_parameters"):
                self.params = model.get_nb_trainable_parameters()[1]  # counts 4-bit weights unpacked
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
    import train

    work = Path(spec["work"])
    (work / "model.json").write_text(json.dumps({"path": spec["model"]}))
    (work / "preflight.json").write_text(json.dumps({"device": "cuda" if spec["cuda"] else "cpu",
                                                      "bf16": spec["bf16"]}))
    (work / "eval.jsonl").write_text("")
    fields = {f for f in train.Config.__dataclass_fields__}
    settings = {k: v for k, v in spec["settings"].items() if k in fields}
    settings.update(max_steps=spec["steps"], save_steps=10**6, eval_steps=10**6,
                    bf16=spec["bf16"], **spec["variants"][variant])
    cfg = train.Config(
        model_json=str(work / "model.json"), train_data=spec["train"], eval_data=str(work / "eval.jsonl"),
        preflight=str(work / "preflight.json"), output_dir=str(work / "ours-adapter"),
        metrics_out=str(work / "ours-metrics.json"), checkpoint_root=str(work / "ours-checkpoints"),
        tensorboard_dir=str(work / "ours-tb"), **settings,
    )
    shutil.rmtree(work / "ours-checkpoints", ignore_errors=True)  # a fresh run, never a resumed one
    shutil.rmtree(work / "ours-adapter", ignore_errors=True)
    train.main(cfg, callbacks=(callback,))


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
    import build_demo_model
    import helpers
    import torch
    from transformers import AutoTokenizer

    cuda = torch.cuda.is_available()
    preset = args.preset if args.preset != "auto" else ("llama3-8b-medical" if cuda else "demo")
    root = Path(args.work)
    root.mkdir(parents=True, exist_ok=True)
    demo_dir = root / "models" / "demo"
    if not (demo_dir / "config.json").is_file():
        build_demo_model.main(build_demo_model.Config(data=str(DEMO_DATA), output=str(demo_dir)))
    # the preset's training settings; an architecture without a preset of its own takes the demo's on the CPU
    # and the 8B preset's on a GPU
    settings_preset = preset if preset in helpers_presets() else ("llama3-8b-medical" if cuda else "demo")
    settings = helpers.resolve_config({"run_name": "bench", "preset": settings_preset})["training"]
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
    for repeat in range(args.repeats):  # interleaved, so that a change of the machine's load hits every kind
        for kind in runs:
            log.info("running %s (%d steps, %d timed; repeat %d of %d)", kind, args.steps, args.steps - args.warmup,
                     repeat + 1, args.repeats)
            out = work / f"{kind.replace('=', '-')}.json"
            out.unlink(missing_ok=True)
            status, wall = run_child([__file__, "_child", kind, str(work / "spec.json"), str(out)],
                                     {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads)})
            if status != 0 or not out.is_file():
                raise SystemExit(f"the {kind} run failed (exit status {status}); see its log above")
            runs[kind].append({**json.loads(out.read_text()), "wall_s": wall})
    results = {}
    for kind, samples in runs.items():  # the run of median tokens/s stands for the kind
        ordered = sorted(samples, key=lambda r: r["tokens_per_s"])
        results[kind] = {**ordered[len(ordered) // 2], "tokens_per_s_all": [r["tokens_per_s"] for r in samples]}
        params = results[kind]["parameters"]
        results[kind]["mfu"] = (6 * params * results[kind]["tokens_per_s"] / info["peak_flops"]
                                if info["peak_flops"] else None)
    ratio = results["ours"]["tokens_per_s"] / results["baseline"]["tokens_per_s"]
    report = {"benchmark": "train", "preset": preset, "model": str(model), **info, "steps": args.steps,
              "warmup_steps": args.warmup, "repeats": args.repeats, "bf16": bf16, "threads": args.threads,
              "settings": {k: settings[k] for k in ("micro_batch_size", "gradient_accumulation", "max_seq_length",
                                                    "quantization", "lora_r", "lora_alpha", "target_modules",
                                                    "gradient_checkpointing", "learning_rate")},
              "ours_levers": {k: settings.get(k) for k in LEVERS} | spec["variants"]["ours"],
              "results": results, "speedup_tokens_per_s": ratio,
              "memory_ratio": memory_of(results["ours"]) / memory_of(results["baseline"]),
              "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(train_table(report))
    write_json(args.out, report)
    log.info("wrote %s", args.out)
    return report


def overrides(pairs: list[str]) -> dict:
    """KEY=VALUE settings of our stage, typed as its command line types them."""
    import train
    from common import parse_args

    values = dict(pair.split("=", 1) for pair in pairs if pair)
    argv = [a for f in train.PATH_FIELDS for a in (f"--{f.replace('_', '-')}", "x")]
    argv += [a for k, v in values.items() for a in (f"--{k.replace('_', '-')}", v)]
    cfg = parse_args(train.Config, argv)
    return {k: getattr(cfg, k) for k in values}


LEVERS = ("padding_free", "packing", "attn_implementation", "gradient_checkpointing_mode", "torch_compile",
          "liger_kernels", "optim", "dataloader_num_workers", "dataloader_pin_memory")


def helpers_presets() -> set[str]:
    import helpers

    return set(helpers.load_yaml(REPO / "workflow" / "presets" / "models.yaml"))


def memory_of(result: dict) -> float:
    return result.get("peak_gpu_gib", result["peak_rss_mb"] / 1024)


def train_table(report: dict) -> str:
    gpu = "peak_gpu_gib" in report["results"]["ours"]
    width = max(10, *(len(k) + 2 for k in report["results"]))
    header = f"{'run':<{width}}{'tokens/s':>12}{'step s':>10}{'peak GPU GiB' if gpu else 'peak RSS MB':>14}{'MFU':>9}"
    lines = [f"train benchmark: {report['preset']} on {report['device']}",
             f"settings: {json.dumps(report['settings'])}", f"our levers: {json.dumps(report['ours_levers'])}",
             header, "-" * len(header)]
    for kind, r in report["results"].items():
        mem = f"{r['peak_gpu_gib']:.2f}" if gpu else f"{r['peak_rss_mb']:.0f}"
        mfu = f"{100 * r['mfu']:.2f}%" if r["mfu"] is not None else "n/a"
        spread = "" if len(r["tokens_per_s_all"]) < 2 else "  (runs: " + ", ".join(
            f"{t:,.0f}" for t in r["tokens_per_s_all"]) + ")"
        lines.append(f"{kind:<{width}}{r['tokens_per_s']:>12,.0f}{r['step_time_s']:>10.3f}{mem:>14}{mfu:>9}{spread}")
    lines.append(f"ours / baseline: {report['speedup_tokens_per_s']:.2f}x tokens/s, "
                 f"{report['memory_ratio']:.2f}x peak memory")
    lines.append(f"MFU = 6 x {report['results']['ours']['parameters']:,} parameters x tokens/s / "
                 f"{report['peak_flops'] / 1e12:.3g} TFLOP/s ({report['peak_source']})" if report["peak_flops"]
                 else "MFU: peak FLOP/s of this device unknown")
    return "\n".join(lines)


# --- merge benchmark -------------------------------------------------------------------------------------------------


def merge_child(method: str, base: str, adapter: str, out: str, max_shard_size: str) -> None:
    import torch

    start = time.perf_counter()
    if method == "peft":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload(safe_merge=True)
        merged.save_pretrained(out, max_shard_size=max_shard_size)
    else:
        import merge_streaming

        merge_streaming.merge(base, adapter, out, torch.bfloat16, max_shard_size)
    Path(out + ".json").write_text(json.dumps({"inner_s": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}))


def make_random_adapter(base: Path, out: Path, r: int = 16) -> Path:
    """A LoRA adapter (r, all linear layers of the decoder, random A and B) written from shapes alone: the base is
    never loaded."""
    import merge_streaming
    import torch
    from safetensors.torch import save_file

    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    gen = torch.Generator().manual_seed(0)
    state = {}
    for path in merge_streaming.base_files(base):
        header, _ = merge_streaming.read_header(path)
        for name, info in header.items():
            module = name.removesuffix(".weight")
            if name.endswith(".weight") and module.rsplit(".", 1)[-1] in targets:
                rows, cols = info["shape"]
                state[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, cols, generator=gen) * 0.01
                state[f"base_model.model.{module}.lora_B.weight"] = torch.randn(rows, r, generator=gen) * 0.01
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / "adapter_model.safetensors", metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
        "target_modules": list(targets), "fan_in_fan_out": False, "bias": "none", "use_rslora": False,
        "use_dora": False, "base_model_name_or_path": str(base)}))
    return out


def bench_merge(args) -> dict:
    root = Path(args.work)
    base = build_random_model(args.arch, root / "models" / f"{args.arch}-bf16", None, "bfloat16")
    adapter = make_random_adapter(base, root / f"merge-{args.arch}" / "adapter")
    shards = sorted(base.glob("*.safetensors"))
    largest = max(p.stat().st_size for p in shards)
    rows = {}
    for method in args.methods:
        out = root / f"merge-{args.arch}" / f"merged-{method}"
        shutil.rmtree(out, ignore_errors=True)
        result = out.with_name(out.name + ".json")
        status, wall = run_child([__file__, "_merge_child", method, str(base), str(adapter), str(out),
                                       args.max_shard_size])
        if status != 0:
            raise SystemExit(f"the {method} merge failed (exit status {status})")
        rss = json.loads(result.read_text())["peak_rss_mb"]
        rows[method] = {"wall_s": wall, "peak_rss_mb": rss, "peak_rss_over_largest_shard": rss * 2**20 / largest,
                        "merge_s": json.loads(result.read_text())["inner_s"]}
        shutil.rmtree(out, ignore_errors=True)
    import merge_streaming

    report = {"benchmark": "merge", "arch": args.arch, "dtype": "bfloat16", "device": "cpu",
              "weights_bytes": merge_streaming.weights_bytes(base), "shards": len(shards),
              "largest_shard_bytes": largest, "max_shard_size": args.max_shard_size, "results": rows,
              "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    header = f"{'method':<11}{'merge s':>9}{'process s':>11}{'peak RSS MB':>13}{'x largest shard':>17}"
    lines = [f"merge benchmark: random {args.arch}, {report['weights_bytes'] / 1e9:.2f} GB bf16 in {len(shards)}"
             f" shards (largest {largest / 1e9:.2f} GB)", header, "-" * len(header)]
    lines += [f"{m:<11}{r['merge_s']:>9.1f}{r['wall_s']:>11.1f}{r['peak_rss_mb']:>13,.0f}{r['peak_rss_over_largest_shard']:>17.2f}"
              for m, r in rows.items()]
    print("\n".join(lines))
    write_json(args.out, report)
    return report


# --- workflow overhead -----------------------------------------------------------------------------------------------


def slurm_probe_s() -> float | None:
    """How long the Slurm executor plugin's import-time probe (`scontrol show config`, 10 s timeout) takes here;
    None where Slurm is not installed and the plugin skips it."""
    if not shutil.which("sinfo") or not shutil.which("scontrol"):
        return None
    start = time.perf_counter()
    try:
        subprocess.run(["scontrol", "show", "config"], capture_output=True, timeout=10)
    except subprocess.TimeoutExpired:
        pass
    return time.perf_counter() - start


def bench_workflow(args) -> dict:
    """Wall and CPU time of a dry-run and of a no-op re-run of a completed run (median of `repeats`), next to
    Snakemake's own start-up (`snakemake --version`), which no workflow can go below."""
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    profile = str(Path(args.profile).resolve() if Path(args.profile).is_dir() else REPO / args.profile)
    base = [snakemake, "-s", str(REPO / "Snakefile"), "--profile", profile, "--directory", args.directory,
            *args.snakemake_args]
    runs = {"startup": [snakemake, "--version"], "dry_run": [*base, "-n"], "noop_rerun": base}
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, command in runs.items():
            start = time.perf_counter()
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    cwd=args.directory)
            output = proc.stdout.read()
            _, status, usage = os.wait4(proc.pid, 0)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(usage.ru_utime + usage.ru_stime)
            if os.waitstatus_to_exitcode(status) != 0:
                raise SystemExit(f"{name} failed:\n{output}")
            if name != "startup" and "Nothing to be done" not in output:
                raise SystemExit(f"the run in {args.directory} is not complete: snakemake has work to do\n{output}")
    report = {"benchmark": "workflow", "directory": str(Path(args.directory).resolve()), "repeats": args.repeats,
              **{f"{k}_s": statistics.median(v) for k, v in wall.items()}, "slurm_probe_s": slurm_probe_s(),
              **{f"{k}_cpu_s": statistics.median(v) for k, v in cpu.items()}, "wall_s": wall, "cpu_s": cpu,
              "load_average": os.getloadavg(), "cores": os.cpu_count(),
              "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(table([(label, f"{report[name + '_s']:.2f} s wall, {report[name + '_cpu_s']:.2f} s CPU") for name, label in (
        ("dry_run", "dry-run (snakemake -n)"), ("noop_rerun", "no-op re-run"),
        ("startup", "snakemake --version alone"))],
        f"workflow overhead (median of {args.repeats}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"))
    if (report["slurm_probe_s"] or 0) > 1:
        print(f"note: Slurm is installed but `scontrol show config` took {report['slurm_probe_s']:.1f} s (no controller "
              "answers?). The Slurm executor plugin runs it on every snakemake start, so each figure above includes it.")
    write_json(args.out, report)
    return report


# --- command line ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> Any:
    setup_logging()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        return child(*argv[1:4])
    if argv[:1] == ["_merge_child"]:
        return merge_child(*argv[1:6])
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
    tr.add_argument("--work", default="results/bench")
    tr.add_argument("--out", default="results/bench/train.json")
    mg = sub.add_parser("merge", help="streaming merge vs peft merge_and_unload (CPU)")
    mg.add_argument("--arch", default="tinyllama-1.1b", choices=sorted(ARCHS))
    mg.add_argument("--max-shard-size", default="1GB")
    mg.add_argument("--methods", nargs="+", default=["peft", "streaming"])
    mg.add_argument("--work", default="results/bench")
    mg.add_argument("--out", default="results/bench/merge.json")
    wf = sub.add_parser("workflow", help="dry-run and no-op re-run time of a completed run")
    wf.add_argument("--directory", default=".")
    wf.add_argument("--profile", default="profiles/local")
    wf.add_argument("--repeats", type=int, default=3)
    wf.add_argument("--snakemake-args", nargs="*", default=[])
    wf.add_argument("--out", default="results/bench/workflow.json")
    args = parser.parse_args(argv)
    return {"train": bench_train, "merge": bench_merge, "workflow": bench_workflow}[args.command](args)


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
