"""`bench.py merge`: a random Llama (bfloat16, sharded) and a LoRA adapter made from its shapes, merged in two child
processes, peft (load, merge_and_unload, save_pretrained) and the streaming merge; each one's own peak RSS and
time, against the largest shard."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from hpc_finetune.io.files import write_json
from hpc_finetune.io.measure import peak_rss_mb
from hpc_finetune.merge import streaming
from hpc_finetune.model.weights import read_header, weight_files, weights_bytes
from tools.benchmarks.models import BENCH, build_random_model, run_child


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
        streaming.merge(base, adapter, out, torch.bfloat16, max_shard_size)
    Path(out + ".json").write_text(json.dumps({"inner_s": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}))


def make_random_adapter(base: Path, out: Path, r: int = 16) -> Path:
    """A LoRA adapter (r, all linear layers of the decoder, random A and B) written from shapes alone: the base is
    never loaded."""
    import torch
    from safetensors.torch import save_file

    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    gen = torch.Generator().manual_seed(0)
    state = {}
    for path in weight_files(base, need_safetensors=True):
        header, _ = read_header(path)
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
    base = Path(args.base) if getattr(args, "base", None) else build_random_model(
        args.arch, root / "models" / f"{args.arch}-bf16", None, "bfloat16")
    adapter = make_random_adapter(base, root / f"merge-{args.arch}" / "adapter")
    shards = sorted(base.glob("*.safetensors"))
    largest = max(p.stat().st_size for p in shards)
    rows = {}
    report = {"benchmark": "merge", "arch": args.arch, "base": str(base), "dtype": "bfloat16", "device": "cpu",
              "weights_bytes": weights_bytes(base), "shards": len(shards),
              "largest_shard_bytes": largest, "max_shard_size": args.max_shard_size, "results": rows}
    for method in args.methods:
        out = root / f"merge-{args.arch}" / f"merged-{method}"
        shutil.rmtree(out, ignore_errors=True)
        result = out.with_name(out.name + ".json")
        status, wall = run_child([str(BENCH), "_merge_child", method, str(base), str(adapter), str(out),
                                       args.max_shard_size])
        if status != 0:
            raise SystemExit(f"the {method} merge failed (exit status {status})")
        rss = json.loads(result.read_text())["peak_rss_mb"]
        rows[method] = {"wall_s": wall, "peak_rss_mb": rss, "peak_rss_over_largest_shard": rss * 2**20 / largest,
                        "merge_s": json.loads(result.read_text())["inner_s"]}
        shutil.rmtree(out, ignore_errors=True)
        write_json(args.out, {**report, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")})  # so far
    header = f"{'method':<11}{'merge s':>9}{'process s':>11}{'peak RSS MB':>13}{'x largest shard':>17}"
    lines = [f"merge benchmark: random {args.arch}, {report['weights_bytes'] / 1e9:.2f} GB bf16 in {len(shards)}"
             f" shards (largest {largest / 1e9:.2f} GB)", header, "-" * len(header)]
    lines += [f"{m:<11}{r['merge_s']:>9.1f}{r['wall_s']:>11.1f}{r['peak_rss_mb']:>13,.0f}{r['peak_rss_over_largest_shard']:>17.2f}"
              for m, r in rows.items()]
    print("\n".join(lines))
    write_json(args.out, report)
    return report
