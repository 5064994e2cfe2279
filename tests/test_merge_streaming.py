"""Streaming merge: tensor-for-tensor equal to peft's merge_and_unload on the tiny model (float32, bfloat16, sharded
input and output, rsLoRA, Conv1D fan_in_fan_out weights), refusals, and the stage picking it by merge.streaming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hpc_finetune.io.cli import StageError
from hpc_finetune.merge import streaming
from support.common import make_adapter


def peft_merged_state(base_dir: Path, adapter_dir: Path, dtype) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload(safe_merge=True)
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def streamed_state(out_dir: Path) -> dict:
    from safetensors.torch import load_file

    state = {}
    for path in sorted(out_dir.glob("*.safetensors")):
        state.update(load_file(path))
    return state


def assert_equal_states(ours: dict, theirs: dict) -> None:
    import torch

    theirs = {k: v for k, v in theirs.items() if k in ours or k != "lm_head.weight"}  # tied head: saved once
    assert set(ours) == set(theirs)
    for key, value in ours.items():
        assert value.dtype == theirs[key].dtype, key
        assert torch.equal(value, theirs[key]), f"{key}: max diff {(value.float() - theirs[key].float()).abs().max()}"


@pytest.fixture(scope="module")
def sharded_bf16_base(tiny_model, tmp_path_factory) -> Path:
    """The tiny model saved in bfloat16 in several shards (with an index), as large hub models are."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("sharded") / "base"
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).save_pretrained(out, max_shard_size="60KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tiny_model / name).is_file():
            (out / name).write_bytes((tiny_model / name).read_bytes())
    assert len(list(out.glob("model-*.safetensors"))) > 2
    return out


@pytest.mark.parametrize("lora", [{}, {"use_rslora": True}], ids=["lora", "rslora"])
def test_float32_merge_equals_peft(tiny_model, tmp_path, lora):
    import torch

    adapter = make_adapter(tiny_model, tmp_path / "adapter", **lora)
    report = streaming.merge(tiny_model, adapter, tmp_path / "out", torch.float32)
    assert report["merged_weights"] == 14 and report["num_shards"] == 1
    assert_equal_states(streamed_state(tmp_path / "out"), peft_merged_state(tiny_model, adapter, torch.float32))


def test_sharded_bfloat16_merge_equals_peft_and_reloads(sharded_bf16_base, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(sharded_bf16_base, tmp_path / "adapter", seed=3)
    report = streaming.merge(sharded_bf16_base, adapter, tmp_path / "out", torch.bfloat16, "50KB")
    assert report["num_shards"] > 2 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    theirs = peft_merged_state(sharded_bf16_base, adapter, torch.bfloat16)
    assert_equal_states(streamed_state(tmp_path / "out"), theirs)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.dtype == torch.bfloat16
    ids = torch.tensor([[1, 5, 9, 30]])
    with torch.inference_mode():
        base_like = AutoModelForCausalLM.from_pretrained(sharded_bf16_base, dtype=torch.bfloat16)
        base_like.load_state_dict(theirs, strict=False)
        assert torch.equal(reloaded(input_ids=ids).logits, base_like(input_ids=ids).logits)


def test_conv1d_fan_in_fan_out_equals_peft(tmp_path):
    """GPT-2 keeps its projections as Conv1D (in, out) weights: the delta is transposed (fan_in_fan_out)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64)).save_pretrained(base)
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, lora_dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape) * 0.05)
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    streaming.merge(base, tmp_path / "adapter", tmp_path / "out", torch.float32)
    assert_equal_states(streamed_state(tmp_path / "out"), peft_merged_state(base, tmp_path / "adapter", torch.float32))


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, "DoRA"),
    ({"lora_bias": True}, "lora_bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
])
def test_unsupported_adapters_are_refused(tiny_model, tmp_path, change, message):
    import torch

    adapter = make_adapter(tiny_model, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(StageError, match=message):
        streaming.merge(tiny_model, adapter, tmp_path / "out", torch.float32)


def test_auto_streams_sharded_or_large_bases(tiny_model, sharded_bf16_base):

    assert streaming.choose("auto", tiny_model)[0] is False
    assert streaming.choose("auto", sharded_bf16_base)[0] is True
    assert streaming.choose("auto", tiny_model, threshold=1000)[0] is True
    assert streaming.choose(True, tiny_model)[0] is True
    assert streaming.choose("false", sharded_bf16_base)[0] is False
    assert streaming.parse_size("5GB") == 5 * 10**9 and streaming.parse_size("2.5MB") == 2_500_000


def test_merge_stage_streams_and_checks(tiny_model, tmp_path):
    """The stage with merge.streaming true: the merged model passes the logit check and the report says how."""
    import merge
    from support.common import demo_rows, write_rows

    (tmp_path / "model.json").write_text(json.dumps({"path": str(tiny_model)}))
    adapter = make_adapter(tiny_model, tmp_path / "adapter")
    report = merge.main(merge.Config(
        model_json=str(tmp_path / "model.json"), adapter_dir=str(adapter),
        eval_data=str(write_rows(tmp_path / "eval.jsonl", demo_rows(0, 2))), output_dir=str(tmp_path / "merged"),
        report_out=str(tmp_path / "merge.json"), dtype="float32", streaming="true", max_shard_size="100KB",
    ))
    assert report["method"] == "streaming" and report["num_shards"] > 1
    assert report["max_abs_logit_diff"] < 1e-4
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
