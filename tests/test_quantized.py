"""Quantised training keeps its gradients on every CPU (scripts/quantized.py).

On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight into an inference layout on the first forward pass
in eval mode without grad, and from then on no gradient flows through that layer. The tests here make every CPU
behave like such a CPU (bitsandbytes' own `has_avx512bf16` answers yes when the layers are built), so that their
verdict does not depend on the machine: the LoRA gradients of one batch are compared before and after a real
evaluation pass of the train stage's trainer, and against the same model built from the dequantised weights.
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import (
    _convert_weight_packed_for_cpu,
    dequantize_4bit,
    has_avx512bf16,
    int8_vectorwise_dequant,
)
from hpc_finetune.io.cli import StageError
from hpc_finetune.io.files import read_jsonl
from hpc_finetune.train import data as train_data
from hpc_finetune.train import quantized
from hpc_finetune.train import setup as train_setup
from support.common import DEMO_DATA
from support.train_stage import make_config

CPU_HAS_AVX512_BF16 = has_avx512bf16()


@pytest.fixture
def as_on_avx512_bf16(monkeypatch):
    """Layers built while this is active come up as bitsandbytes builds them on an AVX512-BF16 CPU."""
    print(f"this CPU has AVX512-BF16: {CPU_HAS_AVX512_BF16}; the tests force bitsandbytes' AVX512-BF16 behaviour")
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)


@pytest.fixture(scope="module")
def chats() -> list[dict]:
    return read_jsonl(DEMO_DATA)[:24]


def trainer_for(tiny_model, chats, out, quantization: str = "4bit"):
    """The train stage's own trainer (train_setup.build_trainer), as train.main builds it, and one training batch."""
    from transformers import AutoTokenizer

    cfg = make_config(tiny_model, out, chats[:16], chats[16:24], quantization=quantization, micro_batch_size=4)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows, eval_rows, fmt = train_data.read_data(cfg.train_data, cfg.eval_data)
    mode = train_data.loss_mode(fmt, tokenizer, cfg.assistant_only_loss)
    args = train_setup.sft_config(cfg, out / "run", cpu=True, bf16=False, has_eval=True, resuming=False, mode=mode,
                            trust_remote_code=False)
    trainer = train_setup.build_trainer(cfg, str(tiny_model), args, tokenizer, train_data.to_dataset(rows, fmt, mode),
                                  train_data.to_dataset(eval_rows, fmt, mode), [])
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    return trainer, batch


def lora_grads(model, batch) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    assert grads and all(g is not None for g in grads.values())
    return grads


def worst_relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)).item() for k in a)


def dequantised_twin(trainer, tiny_model):
    """The same model and adapter with every quantised base weight replaced by its dequantised full-precision
    value: what QLoRA's gradients must equal."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    for name, module in trainer.model.base_model.model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = dequantize_4bit(module.weight.data, module.weight.quant_state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            scales = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
            weight = int8_vectorwise_dequant(module.weight.data, scales)
        else:
            continue
        base.get_submodule(name.removesuffix(".base_layer")).weight.data = weight.float().reshape(
            base.get_submodule(name.removesuffix(".base_layer")).weight.shape)
    twin = get_peft_model(base, trainer.model.peft_config["default"])
    set_peft_model_state_dict(twin, get_peft_model_state_dict(trainer.model))
    dtypes = {name: p.dtype for name, p in trainer.model.named_parameters() if p.requires_grad}
    for name, param in twin.named_parameters():  # TRL keeps a quantised model's adapter in bfloat16
        if param.requires_grad:
            param.data = param.data.to(dtypes[name])
    return twin


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_lora_gradients_survive_an_evaluation_pass(quantization, as_on_avx512_bf16, tiny_model, chats, tmp_path):
    trainer, batch = trainer_for(tiny_model, chats, tmp_path, quantization)
    before = lora_grads(trainer.model, batch)
    trainer.evaluate()  # eval mode, no grad: where bitsandbytes would repack
    after = lora_grads(trainer.model, batch)
    assert worst_relative_difference(before, after) < 1e-5
    assert quantized.packed_layers(trainer.model) == []
    reference = lora_grads(dequantised_twin(trainer, tiny_model), batch)
    assert worst_relative_difference(reference, before) < 1e-3


def test_without_the_fix_an_evaluation_drops_the_gradient(as_on_avx512_bf16, tiny_model, chats, tmp_path):
    """The control: with the layers left as bitsandbytes builds them, one evaluation pass changes the LoRA
    gradients by their whole magnitude. This is what the tests above would see without quantized.keep_trainable;
    the guard stops the evaluation and the training, naming the layers."""
    trainer, batch = trainer_for(tiny_model, chats, tmp_path)
    layers = quantized.linear4bit_layers(trainer.model)
    assert len(layers) == 14  # 7 projections x 2 decoder layers
    before = lora_grads(trainer.model, batch)
    for _, module in layers:
        module.support_avx512bf16_for_cpu = True  # undo keep_trainable
    with pytest.raises(StageError, match=r"after the evaluation at step 0: 14 4-bit layer\(s\) are in bitsandbytes'"):
        trainer.evaluate()  # the guard's check after every evaluation
    assert len(quantized.packed_layers(trainer.model)) == 14
    with pytest.warns(UserWarning, match="gemv_4bit: an autograd kernel was not registered.*silently incorrect"):
        after = lora_grads(trainer.model, batch)  # the defect itself, caught here so that no run ever shows it
    assert worst_relative_difference(before, after) > 0.5
    with pytest.raises(StageError, match=r"14 4-bit layer\(s\) are in bitsandbytes' CPU inference layout"):
        trainer.train()


def test_keep_trainable_converts_a_packed_layer_back(tiny_model, chats, tmp_path):
    """A layer found packed is converted back: the same 4-bit codes, block scales rounded through bfloat16."""
    trainer, batch = trainer_for(tiny_model, chats, tmp_path)
    name, module = quantized.linear4bit_layers(trainer.model)[0]
    codes, weight = module.weight.data.clone(), dequantize_4bit(module.weight.data, module.weight.quant_state)
    module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu(module.weight.data,
                                                                                   module.weight.quant_state)
    assert quantized.packed_layers(trainer.model) == [name]
    with pytest.raises(StageError, match="after the evaluation at step 0"):
        quantized.check_not_packed(trainer.model, "after the evaluation at step 0")
    assert quantized.keep_trainable(trainer.model) == 14
    assert quantized.packed_layers(trainer.model) == []
    assert torch.equal(module.weight.data, codes)
    restored = dequantize_4bit(module.weight.data, module.weight.quant_state)
    assert (restored - weight).abs().max() <= 0.01 * weight.abs().max()


def test_unknown_quantization_is_refused():
    with pytest.raises(StageError, match="training.quantization must be one of 4bit, 8bit, none, got '3bit'"):
        quantized.quantization_config("3bit", torch.float32)
