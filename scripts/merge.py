"""Merge stage: fold the LoRA adapter into the unquantised base model and save full weights that vLLM can serve,
then prove it: the merged model, reloaded from disk, must give the logits of base+adapter.

    python scripts/merge.py --merged-save-format safetensors --dtype auto --max-shard-size 5GB \
        --check-samples 4 --tolerance null --model-json results/demo/model/model.json \
        --adapter-dir results/demo/adapters --eval-data results/demo/data/eval.jsonl \
        --output-dir results/demo/merged --report-out results/demo/metrics/merge.json

The base is reloaded in full precision (float32 on CPU, bfloat16 on GPU with dtype auto), never merged into the
4-bit training model: that would save re-quantised weights. The output is written into a hidden sibling directory
and renamed into place only after the check passes, so a failed merge leaves no half-written model and keeps an
earlier good one. config.json and tokenizer_config.json also carry the transformers-4 keys (scripts/portable.py),
so that vLLM servers still on transformers 4 load the model with the right RoPE and tokenizer.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    StageError,
    cli,
    current_umask,
    model_dir,
    peak_memory,
    read_json,
    read_jsonl,
    table,
    write_json,
)
from portable import make_portable
from rows import FALLBACK_TEXT, detect_format, encode, render

log = logging.getLogger("finetune.merge")

FORMATS = ("safetensors", "bin")
DTYPES = ("auto", "bfloat16", "float16", "float32")
# Longest sequence used by the logit check: the logits of a 128k vocabulary cost 0.25 MB per token in bfloat16.
CHECK_MAX_TOKENS = 256


@dataclass
class Config:
    model_json: str = field(
        metadata={"help": "model record of the model stage (its 'path' is the base model)"}
    )
    adapter_dir: str = field(metadata={"help": "LoRA adapter directory from the train stage"})
    eval_data: str = field(
        metadata={"help": "eval.jsonl; its first rows feed the logit check (may be empty)"}
    )
    output_dir: str = field(metadata={"help": "directory of the merged model"})
    report_out: str = field(metadata={"help": "JSON report of the merge and its check"})
    merged_save_format: str = field(default="safetensors", metadata={"help": "safetensors or bin"})
    dtype: str = field(
        default="auto", metadata={"help": "auto (bfloat16 on GPU, float32 on CPU), bfloat16, ..."}
    )
    max_shard_size: str = field(
        default="5GB", metadata={"help": "largest weight file; bigger models are sharded"}
    )
    check_samples: int = field(default=4, metadata={"help": "eval rows whose logits are compared"})
    tolerance: float | None = field(
        default=None, metadata={"help": "largest allowed logit difference; null: 1e-3 float32, 0.1 16-bit"}
    )
    streaming: str = field(
        default="auto",
        metadata={"help": "merge shard by shard with bounded memory: true, false, or auto (sharded or > 2 GB bases)"},
    )


# --- loading (shared with the evaluate stage) ----------------------------------------------------------------


def resolve_dtype(name: str) -> Any:
    """torch dtype for a config name; auto: bfloat16 when CUDA is available, else float32."""
    import torch

    if name not in DTYPES:
        raise StageError(f"dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def default_tolerance(dtype: Any) -> float:
    import torch

    return 1e-3 if dtype == torch.float32 else 0.1


def load_model(path: str | os.PathLike, dtype: Any, what: str = "model") -> Any:
    """A causal LM in `dtype`, unquantised, on the GPUs when there are any (device_map auto), else on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise StageError(f"{what} directory {path} has no config.json; run the stage that produces it first")
    config = read_json(path / "config.json", f"{what} config")
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise StageError(
            f"{what} {path} is a pre-quantised checkpoint ({method}); merging and evaluation need the unquantised"
            " weights: point the model stage at the full-precision model"
        )
    device_map = "auto" if torch.cuda.is_available() else "cpu"
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map)
    except (OSError, ValueError, RuntimeError) as err:
        raise StageError(f"cannot load the {what} from {path}: {err}") from None
    model.eval()
    return model


def check_adapter(adapter_dir: str | os.PathLike, base_dir: str | os.PathLike) -> dict:
    """The adapter's config, after refusing what cannot be merged into weights that vLLM serves consistently:
    a missing or corrupt adapter, full copies of modules (modules_to_save) and a resized vocabulary."""
    from safetensors import SafetensorError, safe_open

    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise StageError(f"adapter directory {adapter_dir} does not exist; run the train stage first")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise StageError(f"adapter directory {adapter_dir} has no adapter_config.json: not a PEFT adapter")
    config = read_json(adapter_dir / "adapter_config.json", "adapter config")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        if (adapter_dir / "adapter_model.bin").is_file():
            weights = adapter_dir / "adapter_model.bin"
        else:
            raise StageError(
                f"adapter directory {adapter_dir} has no adapter_model.safetensors (adapter weights)"
            )
    keys: list[str] = []
    if weights.suffix == ".safetensors":
        try:
            with safe_open(weights, framework="pt") as fh:
                keys = list(fh.keys())
        except (SafetensorError, OSError) as err:
            raise StageError(
                f"adapter weights {weights} are unreadable (corrupt or truncated): {err}"
            ) from None
    if config.get("modules_to_save"):
        raise StageError(
            f"adapter {adapter_dir} carries full copies of modules_to_save={config['modules_to_save']}: vLLM refuses"
            " such adapters and a merge would hide a changed embedding/head from the tokenizer; train without"
            " modules_to_save (LoRA only)"
        )
    full_copies = [
        k for k in keys if "modules_to_save" in k or k.endswith(("embed_tokens.weight", "lm_head.weight"))
    ]
    if full_copies:
        raise StageError(
            f"adapter {adapter_dir} carries full module weights ({', '.join(full_copies[:3])}): vLLM cannot serve"
            " it consistently; train a LoRA-only adapter"
        )
    base_vocab = read_json(Path(base_dir) / "config.json", "base model config").get("vocab_size")
    tokenizer_size = _tokenizer_size(adapter_dir)
    if base_vocab and tokenizer_size and tokenizer_size > base_vocab:
        raise StageError(
            f"adapter {adapter_dir} comes with a tokenizer of {tokenizer_size} tokens but the base model has"
            f" {base_vocab} embedding rows: the vocabulary was resized, which vLLM cannot serve consistently;"
            " train without adding tokens"
        )
    return config


def _tokenizer_size(directory: Path) -> int | None:
    """Number of tokens of the tokenizer saved in `directory` (None when it has none)."""
    if not (directory / "tokenizer.json").is_file():
        return None
    tok = json.loads((directory / "tokenizer.json").read_text())
    vocab = tok.get("model", {}).get("vocab")
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab or [])))
    ids += [t["id"] for t in tok.get("added_tokens", [])]
    return max(ids) + 1 if ids else None


def load_adapter(base: Any, adapter_dir: str | os.PathLike) -> Any:
    """base + LoRA adapter, unmerged (a PeftModel), in eval mode."""
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    except Exception as err:  # peft raises many types (ValueError, KeyError, SafetensorError, ...)
        raise StageError(f"cannot load the adapter from {adapter_dir} onto the base model: {err}") from None
    model.eval()
    return model


def load_tokenizer(preferred: str | os.PathLike, base_dir: str | os.PathLike) -> Any:
    """The tokenizer saved with the adapter/merged model (what training used), else the base model's; the chat
    template is taken from the base when the preferred one lacks it."""
    from transformers import AutoTokenizer

    source = Path(preferred) if (Path(preferred) / "tokenizer_config.json").is_file() else Path(base_dir)
    try:
        tok = AutoTokenizer.from_pretrained(source)
        if not getattr(tok, "chat_template", None) and source != Path(base_dir):
            tok.chat_template = getattr(AutoTokenizer.from_pretrained(base_dir), "chat_template", None)
    except (OSError, ValueError) as err:
        raise StageError(f"cannot load the tokenizer from {source}: {err}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def input_device(model: Any) -> Any:
    return model.get_input_embeddings().weight.device


def check_inputs(tokenizer: Any, rows: list[dict], n: int, source: str) -> list[list[int]]:
    """Token ids of the first `n` rows rendered as training saw them; a fixed text when there are no rows."""
    fmt = detect_format(rows, source)
    if not rows:
        return [tokenizer(FALLBACK_TEXT)["input_ids"]]
    out = []
    for row in rows[:n]:
        ids, _ = encode(tokenizer, render(row, tokenizer, fmt), fmt, max_length=CHECK_MAX_TOKENS)
        out.append(ids)
    return out


def logits_of(model: Any, inputs: list[list[int]]) -> list[Any]:
    """Logits of each input, one sequence at a time (no padding), kept on the CPU in the model's dtype."""
    import torch

    device = input_device(model)
    with torch.inference_mode():
        return [model(input_ids=torch.tensor([ids], device=device)).logits[0].cpu() for ids in inputs]


def max_abs_diff(a: list[Any], b: list[Any]) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b, strict=True))


def mean_abs_diff(a: list[Any], b: list[Any]) -> float:
    total = sum(float((x.float() - y.float()).abs().sum()) for x, y in zip(a, b, strict=True))
    return total / sum(x.numel() for x in a)


def free() -> None:
    """Give memory back after the caller dropped its references (`del model`)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- merging and saving ------------------------------------------------------------------------------------------


def save_weights(model: Any, directory: Path, fmt: str, max_shard_size: str) -> None:
    """Config, generation config and weights (sharded with an index above max_shard_size) in `fmt`."""
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    if fmt == "bin":
        safetensors_to_bin(directory)


def safetensors_to_bin(directory: Path) -> None:
    """Rewrite the safetensors weights that save_pretrained wrote (it writes nothing else in transformers 5) as
    PyTorch pickles with the names and index transformers and vLLM load: pytorch_model.bin, or
    pytorch_model-0000i-of-0000N.bin with pytorch_model.bin.index.json. One shard in memory at a time; tied and
    renamed weights stay exactly as save_pretrained resolved them."""
    import torch
    from safetensors.torch import load_file

    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        renamed = {}
        for shard in sorted(set(index["weight_map"].values())):
            target = "pytorch_model" + shard.removeprefix("model").removesuffix(".safetensors") + ".bin"
            torch.save(load_file(directory / shard), directory / target)
            (directory / shard).unlink()
            renamed[shard] = target
        index["weight_map"] = {k: renamed[v] for k, v in index["weight_map"].items()}
        (directory / "pytorch_model.bin.index.json").write_text(
            json.dumps(index, indent=2, sort_keys=True) + "\n"
        )
        index_path.unlink()
    else:
        torch.save(load_file(directory / "model.safetensors"), directory / "pytorch_model.bin")
        (directory / "model.safetensors").unlink()


def merge_in_memory(
    base_dir: str, adapter_dir: str, dtype: Any, inputs: list[list[int]], save: Callable[[Any], None]
) -> dict:
    """Merge with the whole model in memory: load the base unquantised, attach the adapter, record the logits of
    base and base+adapter, merge_and_unload, record the merged logits, and hand the merged model to `save`.
    For a 16-bit dtype, base+adapter is first run in float32 too (one model in memory at a time): the exact
    function, against which the 16-bit rounding error is measured (see `judge`).

    merge_streamed is the bounded-memory alternative (see merge_streaming.py)."""
    exact = exact_logits(base_dir, adapter_dir, dtype, inputs)
    base = load_model(base_dir, dtype, "base model")
    model = load_adapter(base, adapter_dir)
    reference, adapter_effect = reference_logits(model, inputs)
    merged = model.merge_and_unload(safe_merge=True)
    merged_logits = logits_of(merged, inputs)
    num_parameters = sum(p.numel() for p in merged.parameters())
    save(merged)
    del merged, model, base
    free()
    return {
        "reference_logits": reference,
        "exact_logits": exact,
        "merged_logits": merged_logits,
        "adapter_effect": adapter_effect,
        "num_parameters": num_parameters,
    }


def exact_logits(base_dir: str, adapter_dir: str, dtype: Any, inputs: list[list[int]]) -> list[Any] | None:
    """For a 16-bit dtype: the logits of base+adapter in float32 (the exact function); None for float32."""
    import torch

    if dtype == torch.float32:
        return None
    model = load_adapter(load_model(base_dir, torch.float32, "base model"), adapter_dir)
    exact = logits_of(model, inputs)
    del model
    free()
    return exact


def reference_logits(model: Any, inputs: list[list[int]]) -> tuple[list[Any], float]:
    """Logits of base+adapter (unmerged PeftModel) and the adapter's largest effect on them."""
    with model.disable_adapter():
        base_logits = logits_of(model, inputs)
    reference = logits_of(model, inputs)
    return reference, max_abs_diff(base_logits, reference)


def merge_streamed(
    base_dir: str, adapter_dir: str, dtype: Any, inputs: list[list[int]], directory: Path, fmt: str,
    max_shard_size: str,
) -> dict:
    """The bounded-memory merge: the reference logits come from base+adapter loaded once (one model in memory at a
    time, on the GPUs when there are any), then merge_streaming writes the merged weights tensor by tensor, never
    holding the model. Same keys as merge_in_memory; no in-memory merged logits (merged_logits None): the stage's
    check of the reloaded model is the check."""
    import merge_streaming

    exact = exact_logits(base_dir, adapter_dir, dtype, inputs)
    model = load_adapter(load_model(base_dir, dtype, "base model"), adapter_dir)
    reference, adapter_effect = reference_logits(model, inputs)
    del model
    free()
    stats = merge_streaming.merge(base_dir, adapter_dir, directory, dtype, max_shard_size)
    if fmt == "bin":
        safetensors_to_bin(directory)
    return {
        "reference_logits": reference,
        "exact_logits": exact,
        "merged_logits": None,
        "adapter_effect": adapter_effect,
        "num_parameters": stats["num_parameters"],
    }


def judge(result: dict, reloaded: list[Any], tolerance: float) -> dict:
    """Does the reloaded merged model compute base+adapter?

    float32: the largest logit difference to base+adapter must be within the tolerance. 16-bit: either that, or the
    merged model may be at most twice as far (plus the tolerance) from the exact, float32 base+adapter as the
    unmerged 16-bit model is: 16-bit rounding alone can move logits by more than 0.1 (by ~0.4 for the demo model,
    before any merge), and merging rounds W + BA once more. Measured on the demo model, the ratio is 0.8-1.3; a
    merge that drops, doubles or re-quantises the adapter lands far outside unless the adapter's whole effect is
    below the rounding error (then a warning says that the check cannot see it)."""
    reference, exact = result["reference_logits"], result["exact_logits"]
    check = {
        "max_abs_logit_diff": max_abs_diff(reference, reloaded),
        "mean_abs_logit_diff": mean_abs_diff(reference, reloaded),
    }
    if result["merged_logits"] is not None:  # the streaming merge never has the merged model in memory
        check["roundtrip_max_abs_logit_diff"] = max_abs_diff(result["merged_logits"], reloaded)
    passed = check["max_abs_logit_diff"] <= tolerance  # False for NaN
    if exact is not None:
        check["dtype_error"] = max_abs_diff(reference, exact)
        check["merged_vs_float32"] = max_abs_diff(reloaded, exact)
        allowed = 2 * check["dtype_error"] + tolerance
        passed = passed or check["merged_vs_float32"] <= allowed
        if result["adapter_effect"] <= allowed:
            log.warning(
                "the adapter changes the logits by at most %.3g, within the %.3g that %s rounding allows: the logit"
                " check cannot tell a merged adapter from a missing one (float32 can: --dtype float32)",
                result["adapter_effect"],
                allowed,
                "16-bit",
            )
    check["passed"] = passed
    return check


def describe(check: dict, tolerance: float, dtype: Any) -> str:
    text = f"largest logit difference {check['max_abs_logit_diff']:.3g}, tolerance {tolerance:g} ({dtype_name(dtype)})"
    if "dtype_error" in check:
        text += (
            f"; vs float32 base+adapter: merged {check['merged_vs_float32']:.3g},"
            f" unmerged {check['dtype_error']:.3g}"
        )
    if "roundtrip_max_abs_logit_diff" in check:
        text += f"; save/reload difference {check['roundtrip_max_abs_logit_diff']:.3g}"
    return text


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


def save_tokenizer(tokenizer: Any, directory: Path, adapter_dir: str, base_dir: str) -> None:
    """The tokenizer files training used, copied verbatim (no re-serialisation by this transformers version: what a
    server with another version loads is what the model stage fetched or the train stage wrote), the chat template
    (from the base when the adapter's tokenizer lacks it), and a generation config if the model had none. Then
    check that the copy loads as the same tokenizer."""
    from transformers import AutoTokenizer

    source = Path(adapter_dir) if (Path(adapter_dir) / "tokenizer_config.json").is_file() else Path(base_dir)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, directory / name)
    if getattr(tokenizer, "chat_template", None) and not has_chat_template(directory):
        (directory / "chat_template.jinja").write_text(tokenizer.chat_template)
    if (
        not (directory / "generation_config.json").is_file()
        and (Path(base_dir) / "generation_config.json").is_file()
    ):
        shutil.copy2(Path(base_dir) / "generation_config.json", directory / "generation_config.json")
    saved = AutoTokenizer.from_pretrained(directory)
    if saved.get_vocab() != tokenizer.get_vocab() or saved.chat_template != tokenizer.chat_template:
        raise StageError(
            f"the tokenizer copied from {source} does not load as the tokenizer used for the check"
        )


def has_chat_template(directory: Path) -> bool:
    if (directory / "chat_template.jinja").is_file():
        return True
    config = directory / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))


def install(tmp: Path, output: Path) -> None:
    """Put the finished `tmp` directory at `output`, replacing an earlier one only now that the new one is whole."""
    # Some writers create 0600 files; a model is read by servers running under other accounts.
    for path in tmp.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~current_umask())
    old = output.parent / f".{output.name}.old-{os.getpid()}"
    if output.exists():
        output.rename(old)
    tmp.rename(output)
    shutil.rmtree(old, ignore_errors=True)


# --- the stage ---------------------------------------------------------------------------------------------------


def main(cfg: Config) -> dict:
    start = time.time()
    if cfg.merged_save_format not in FORMATS:
        raise StageError(f"merged_save_format {cfg.merged_save_format!r}: use one of {', '.join(FORMATS)}")
    if cfg.check_samples < 1:
        raise StageError("check_samples must be at least 1")
    dtype = resolve_dtype(cfg.dtype)
    tolerance = cfg.tolerance if cfg.tolerance is not None else default_tolerance(dtype)
    base_dir = model_dir(cfg.model_json)
    check_adapter(cfg.adapter_dir, base_dir)
    tokenizer = load_tokenizer(cfg.adapter_dir, base_dir)
    eval_rows = read_jsonl(cfg.eval_data) if Path(cfg.eval_data).is_file() else []
    inputs = check_inputs(tokenizer, eval_rows, cfg.check_samples, cfg.eval_data)
    if not eval_rows:
        log.warning("%s has no rows: checking the merge on a fixed text instead", cfg.eval_data)

    output = Path(cfg.output_dir)
    output.parent.mkdir(parents=True, exist_ok=True)
    for stale in output.parent.glob(f".{output.name}.partial-*"):
        log.info("removing %s left by an interrupted merge", stale)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = output.parent / f".{output.name}.partial-{os.getpid()}"
    import merge_streaming

    streaming, why = merge_streaming.choose(cfg.streaming, base_dir)
    method = "streaming" if streaming else "in-memory"
    try:
        tmp.mkdir()
        log.info(
            "merging %s into %s (%s, %s, %s merge: %s)",
            cfg.adapter_dir,
            base_dir,
            cfg.merged_save_format,
            dtype_name(dtype),
            method,
            why,
        )
        if streaming:
            result = merge_streamed(
                base_dir, cfg.adapter_dir, dtype, inputs, tmp, cfg.merged_save_format, cfg.max_shard_size
            )
        else:
            result = merge_in_memory(
                base_dir,
                cfg.adapter_dir,
                dtype,
                inputs,
                save=lambda model: save_weights(model, tmp, cfg.merged_save_format, cfg.max_shard_size),
            )
        save_tokenizer(tokenizer, tmp, cfg.adapter_dir, base_dir)
        portable = make_portable(tmp)  # before the reload check: what is checked is what is shipped
        if result["adapter_effect"] == 0:
            log.warning(
                "the adapter does not change the base model's logits at all (untrained LoRA weights?)"
            )

        log.info("reloading the merged model from disk to check it")
        reloaded = load_model(tmp, dtype, "merged model")
        logits = logits_of(reloaded, inputs)
        del reloaded
        free()
        check = judge(result, logits, tolerance)
        if not check["passed"]:
            raise StageError(
                f"the merged model does not reproduce base+adapter: {describe(check, tolerance, dtype)};"
                f" nothing was written to {output}"
            )
        files = [{"name": p.name, "bytes": p.stat().st_size} for p in sorted(tmp.iterdir()) if p.is_file()]
        shards = [f for f in files if f["name"].endswith((".safetensors", ".bin"))]
        install(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    report = {
        "output_dir": str(output),
        "base_model": base_dir,
        "adapter_dir": cfg.adapter_dir,
        "method": method,
        "method_reason": why,
        "check": "logits of the merged model reloaded from disk vs base+adapter"
        + (" (base+adapter and the reloaded model loaded one at a time; no merged model in memory)" if streaming
           else " and vs the in-memory merged model"),
        **{k: v for k, v in check.items() if k != "passed"},
        "tolerance": tolerance,
        "adapter_effect_max_abs_logit": result["adapter_effect"],
        "dtype": dtype_name(dtype),
        "format": cfg.merged_save_format,
        "max_shard_size": cfg.max_shard_size,
        "files": files,
        "num_shards": len(shards),
        "weights_bytes": sum(f["bytes"] for f in shards),
        "total_bytes": sum(f["bytes"] for f in files),
        "num_parameters": result["num_parameters"],
        "transformers4_keys": portable,
        "check_samples": len(inputs),
        "check_source": cfg.eval_data if eval_rows else "fixed text (eval data is empty)",
        "wall_time_s": round(time.time() - start, 2),
        "peak_memory": peak_memory(),
    }
    write_json(cfg.report_out, report)
    log.info(
        "\n%s",
        table(
            [
                ("merged model", report["output_dir"]),
                ("format / dtype", f"{report['format']} / {report['dtype']}"),
                ("method", f"{method} ({why})"),
                ("parameters", f"{report['num_parameters']:,}"),
                ("weight files", f"{report['num_shards']} ({report['weights_bytes'] / 2**20:.1f} MiB)"),
                ("logit check", f"{describe(check, tolerance, dtype)}, {len(inputs)} samples"),
                ("adapter effect", f"{result['adapter_effect']:.3g} (max |logit change| vs base)"),
                ("wall time", f"{report['wall_time_s']} s"),
                ("peak memory", report["peak_memory"]),
            ],
            title="merge summary",
        ),
    )
    return report


if __name__ == "__main__":
    cli(main, Config, __doc__)
