"""The adapter as the merge stage takes it: refused, with the fix, when it cannot be merged into weights that vLLM
serves consistently (missing or corrupt, full copies of modules, a resized vocabulary)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from hpc_finetune.io.cli import StageError
from hpc_finetune.io.files import read_json

# vLLM's --max-lora-rank takes these values only (vllm/config/lora.py, 0.32); an adapter of rank r is served with
# the smallest of them >= r (its weights are padded), so a rank above the last is refused.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16


def vllm_max_lora_rank(rank: int) -> int | None:
    """The --max-lora-rank vLLM needs for an adapter of this rank; None when vLLM cannot serve it."""
    return next((allowed for allowed in VLLM_MAX_LORA_RANKS if allowed >= rank), None)


def vllm_refusals(config: dict) -> list[str]:
    """What vLLM (0.32, vllm/lora/peft_helper.py) refuses in an adapter_config.json, each with the fix; empty when
    it serves the adapter."""
    found = []
    ranks = [config.get("r") or 0, *(config.get("rank_pattern") or {}).values()]
    if vllm_max_lora_rank(max(ranks)) is None:
        found.append(f"LoRA rank {max(ranks)} is above the largest vLLM serves ({VLLM_MAX_LORA_RANKS[-1]}): train"
                     f" with training.lora_r <= {VLLM_MAX_LORA_RANKS[-1]}")
    if config.get("modules_to_save"):
        found.append(f"modules_to_save={config['modules_to_save']} (full copies of modules): vLLM refuses such"
                     " adapters; train without modules_to_save (LoRA only)")
    if config.get("use_dora"):
        found.append("DoRA (use_dora: true): vLLM does not serve DoRA adapters; train a plain LoRA adapter, or"
                     " publish the merged model only")
    if config.get("lora_bias") or config.get("bias", "none") != "none":
        found.append("LoRA biases (lora_bias/bias): vLLM does not serve them; train with bias 'none'")
    return found


def check_servable_adapter(adapter_dir: str | os.PathLike, merged_only: str = "hub_upload.publish: [merged]") -> None:
    """Refuse, before it is published (Hub or bucket), an adapter that vLLM would refuse to load (the merged model
    of a DoRA or high-rank adapter is still servable: only the adapter itself is refused). `merged_only`: the
    setting that publishes the merged model only."""
    config = read_json(Path(adapter_dir) / "adapter_config.json", "adapter config")
    refused = vllm_refusals(config)
    if refused:
        raise StageError(f"adapter {adapter_dir} would be published but vLLM cannot serve it: {'; '.join(refused)}."
                         f" Or publish the merged model only ({merged_only})")


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
