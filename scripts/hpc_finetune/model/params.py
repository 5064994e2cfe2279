"""Counting the parameters of a loaded model (or one built on the meta device), the one way every stage counts
them: 4-bit weights unpacked (bitsandbytes stores two per byte of its storage type), as PEFT counts them."""

from __future__ import annotations

from typing import Any


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters of `model`."""
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        if param.__class__.__name__ == "Params4bit":
            storage = getattr(param, "quant_storage", None)
            count *= 2 * (param.element_size() if hasattr(param, "element_size") else getattr(storage, "itemsize", 1))
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total
