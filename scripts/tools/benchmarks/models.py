"""What the benchmarks share: the architectures of the presets (their real configs, built with random weights:
nothing is downloaded), the device's peak FLOP/s for MFU, and timed child processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from hpc_finetune.io.cli import log

REPO = Path(__file__).resolve().parents[3]
DEMO_DATA = REPO / "data" / "demo" / "medical_qa.jsonl"
BENCH = REPO / "scripts" / "tools" / "bench.py"

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


def run_child(args: list[str], env: dict | None = None, timeout: float | None = None) -> tuple[int | None, float]:
    """Run a child Python process; return its exit status (None when it ran past `timeout` seconds and was killed)
    and wall seconds. The child reports its own peak RSS (peak_rss_mb): its rusage would not do, Linux counts the
    parent's resident set at fork/exec into ru_maxrss."""
    start = time.perf_counter()
    try:
        status = subprocess.run([sys.executable, *args], env={**os.environ, **(env or {})}, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        status = None
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
