"""bitsandbytes quantisation for training: the BitsAndBytesConfig of each `training.quantization`, and the one
place that keeps 4-bit layers trainable on CPUs with AVX512-BF16. No heavy imports at module level.

The trap (bitsandbytes 0.50, nn/modules.py `Linear4bit.forward`, autograd/_functions.py `matmul_4bit`): on a CPU
with AVX512-BF16 a forward pass in eval mode without grad (every evaluation during training, TRL's baseline
evaluation at step 0) repacks each 4-bit weight into an inference layout (`quant_state.packing_format_for_cpu`).
From then on `matmul_4bit` calls `gemv_4bit`, which has no backward: the gradient through every frozen base layer
is dropped (PyTorch warns "an autograd kernel was not registered ... silently incorrect behavior") and the
adapter learns from the LoRA and residual paths alone. The packed kernel also computes in bfloat16, so its logits
are less exact. `keep_trainable` turns the repack off (and undoes one already made) before any forward pass;
`packed_layout_guard` stops training with a clear error should any layer still end up packed.
"""

from __future__ import annotations

from hpc_finetune.io.cli import StageError, log

QUANTIZATION = ("4bit", "8bit", "none")


def quantization_config(quantization: str, compute_dtype, sharded: bool = False):
    """The BitsAndBytesConfig of training.quantization (None for plain LoRA). sharded (FSDP, DeepSpeed ZeRO-3):
    the 4-bit codes stored in the compute dtype, as the model's other weights (`bnb_4bit_quant_storage`, the PEFT
    recipe), so that the engines can flatten and shard them with the rest; the default uint8 storage cannot."""
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            **({"bnb_4bit_quant_storage": compute_dtype} if sharded else {}),
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "none":
        return None
    raise StageError(f"training.quantization must be one of {', '.join(QUANTIZATION)}, got {quantization!r}")


def linear4bit_layers(model) -> list[tuple[str, object]]:
    """(name, module) of every bitsandbytes 4-bit linear layer of the model; empty when bitsandbytes is absent."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return []
    return [(name, module) for name, module in model.named_modules() if isinstance(module, Linear4bit)]


def is_packed(module) -> bool:
    state = getattr(module.weight, "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def packed_layers(model) -> list[str]:
    """Names of the 4-bit layers whose weight is in the CPU inference layout (no backward through them)."""
    return [name for name, module in linear4bit_layers(model) if is_packed(module)]


def keep_trainable(model) -> int:
    """Keep every 4-bit layer in the trainable layout: no repack into the CPU inference layout on eval passes,
    and any layer already repacked converted back (exactly: the repack only reorders the 4-bit codes and
    dequantises the nested absmax). Call it on the model before the first forward pass. Returns the number of
    4-bit layers."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    layers = linear4bit_layers(model)
    packed = [name for name, module in layers if is_packed(module)]
    if packed:
        log.warning("%d 4-bit layers were already in the CPU inference layout (%s ...): converted back; their block "
                    "scales were rounded to bfloat16 by the repack", len(packed), packed[0])
    for _, module in layers:
        module.support_avx512bf16_for_cpu = False
        if is_packed(module):
            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, module.weight.quant_state
            )
            module.quant_state = module.weight.quant_state
    return len(layers)


def check_not_packed(model, when: str) -> None:
    """A StageError naming the layers when any 4-bit layer is in the packed inference layout."""
    packed = packed_layers(model)
    if packed:
        shown = ", ".join(packed[:3]) + (f" and {len(packed) - 3} more" if len(packed) > 3 else "")
        raise StageError(
            f"{when}: {len(packed)} 4-bit layer(s) are in bitsandbytes' CPU inference layout ({shown}), through "
            "which no gradient flows; training would silently learn the wrong thing. This is a bug of the train "
            "stage (hpc_finetune.train.quantized.keep_trainable was bypassed); as a workaround train with training.quantization none "
            "or on a GPU"
        )


def packed_layout_guard():
    """A TrainerCallback that checks, before every optimizer step and after every evaluation, that no 4-bit layer
    is in the packed inference layout."""
    from transformers import TrainerCallback

    class PackedLayoutGuard(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            check_not_packed(model, f"before step {state.global_step + 1}")

        def on_evaluate(self, args, state, control, model=None, **kwargs):
            check_not_packed(model, f"after the evaluation at step {state.global_step}")

    return PackedLayoutGuard()
