"""The LoRA weights of a training run, which FSDP may shard across ranks: each gathered whole, a snapshot of them,
how far they moved since, and the adapter saved by PEFT from the gathered weights. No heavy imports at module level.
"""

from __future__ import annotations

from pathlib import Path


def whole(param):
    """A parameter's full value: FSDP2 keeps each rank's shard in a DTensor (gathering is a collective: every
    rank calls it)."""
    tensor = param.detach()
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def adapter_snapshot(model) -> dict:
    return {name: whole(p).float().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def max_abs_change(model, before: dict) -> float:
    after = dict(model.named_parameters())
    return max((whole(after[name]).float().cpu() - value).abs().max().item() for name, value in before.items())


def save_gathered_adapter(model, directory: Path, is_main: bool) -> None:
    """The LoRA weights of a (possibly FSDP-sharded) PeftModel, gathered whole (a collective: every rank calls
    it; only the trainable weights travel, not the frozen base) and saved by PEFT on the main process."""
    weights = {name: whole(p).cpu() for name, p in model.named_parameters() if p.requires_grad}
    if is_main:
        model.save_pretrained(str(directory), state_dict=weights)
