"""GPU preflight on a machine without GPUs: the demo goes to the CPU, a real-sized model is refused with the
numbers, and the memory estimate behaves as the settings say it should."""

from __future__ import annotations

import json
from pathlib import Path

import preflight
import pytest
from hpc_finetune.io.cli import StageError
from hpc_finetune.train.preflight import check_fit, estimate_memory, model_parameters

LLAMA_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def llama8b_record(tmp_path_factory) -> Path:
    """A Llama-3.1-8B config with no weights: preflight only reads the config."""
    from transformers import LlamaConfig

    directory = tmp_path_factory.mktemp("llama8b")
    LlamaConfig(**LLAMA_8B).save_pretrained(directory)
    record = directory / "model.json"
    record.write_text(json.dumps({"path": str(directory)}))
    return record


@pytest.fixture(scope="module")
def llama8b_params(llama8b_record):
    return model_parameters(str(llama8b_record.parent), "all-linear")


def run(record: Path, tmp_path: Path, **options) -> dict:
    cfg = preflight.Config(model_json=str(record), output=str(tmp_path / "preflight.json"), **options)
    return preflight.main(cfg)


def test_demo_model_trains_on_cpu(tiny_model, tmp_path):
    record = tmp_path / "model.json"
    record.write_text(json.dumps({"path": str(tiny_model)}))
    report = run(record, tmp_path, max_seq_length=256)
    assert report["device"] == "cpu" and report["bf16"] is False
    assert report["gpus"] == [] and report["cuda_available"] is False
    assert report["estimate_mb"]["total_mb"] > 0
    assert json.loads((tmp_path / "preflight.json").read_text()) == json.loads(json.dumps(report))


def test_big_model_without_gpu_is_refused_with_the_numbers(llama8b_record, tmp_path):
    with pytest.raises(StageError) as err:
        run(llama8b_record, tmp_path)
    message = str(err.value)
    assert "no GPU is visible" in message and "8.03B parameters" in message
    assert "preflight.cpu_max_params" in message
    assert not (tmp_path / "preflight.json").exists()


def test_gpu_required_but_absent(tiny_model, tmp_path):
    record = tmp_path / "model.json"
    record.write_text(json.dumps({"path": str(tiny_model)}))
    with pytest.raises(StageError, match="preflight.device is gpu but no GPU is visible"):
        run(record, tmp_path, device="gpu")


def test_llama8b_parameter_count_is_exact(llama8b_params):
    assert llama8b_params["total"] == 8_030_261_248
    assert llama8b_params["lora_units"] * 16 == 41_943_040  # r=16 on all linear layers: the known 41.9M


def estimate(params, **options) -> int:
    cfg = preflight.Config(model_json="-", output="-", **({"max_seq_length": 2048, "micro_batch_size": 1} | options))
    return estimate_memory(params, cfg, bf16=True)["total_mb"]


def test_estimate_follows_the_settings(llama8b_params):
    qlora = estimate(llama8b_params, quantization="4bit")
    assert 8_000 < qlora < 14_000  # 8B QLoRA at 2048 tokens: between torchtune's 7.4 GiB and plain HF
    assert qlora < estimate(llama8b_params, quantization="8bit") < estimate(llama8b_params, quantization="none")
    assert estimate(llama8b_params, micro_batch_size=4) > qlora
    assert estimate(llama8b_params, gradient_checkpointing=False) > qlora
    assert estimate(llama8b_params, lora_r=64) > qlora


def gpu(memory_mb: int) -> dict:
    return {"index": 0, "name": "Test GPU", "memory_mb": memory_mb, "capability": "9.0", "bf16": True}


def test_fit_check_passes_and_refuses(llama8b_params):
    cfg = preflight.Config(model_json="-", output="-", max_seq_length=2048, micro_batch_size=1)
    need = estimate_memory(llama8b_params, cfg, bf16=True)
    assert check_fit(need, [gpu(81_559)], 0.92, cfg) == round(81_559 * 0.92)
    with pytest.raises(StageError) as err:
        check_fit(need, [gpu(81_559), gpu(8_192) | {"index": 1}], 0.92, cfg)
    message = str(err.value)
    assert f"needs about {need['total_mb']} MiB" in message and "GPU 1 (Test GPU) has 8192 MiB" in message
    assert "micro_batch_size (now 1)" in message and "logits_fp32" in message


@pytest.mark.parametrize("targets", [["no_such_proj"], ["q_proj", "v_prj"]])
def test_target_modules_that_match_nothing_are_refused_with_the_names_that_would(targets, tiny_model, tmp_path):
    """PEFT fails only when no name matches and silently skips a misspelt one: preflight refuses both, before the
    train job, and lists the model's linear layers."""
    record = tmp_path / "model.json"
    record.write_text(json.dumps({"path": str(tiny_model)}))
    with pytest.raises(StageError) as err:
        run(record, tmp_path, max_seq_length=256, target_modules=targets)
    bad = targets[-1]
    assert f"training.target_modules: {bad!r} matches no module of the model" in str(err.value)
    assert "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in str(err.value)
    assert "lm_head" not in str(err.value)
    assert not (tmp_path / "preflight.json").exists()
    report = run(record, tmp_path, max_seq_length=256, target_modules=["q_proj", "self_attn.v_proj"])
    assert report["device"] == "cpu"
