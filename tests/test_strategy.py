"""training.strategy: the choice `auto` makes from the preflight estimate (a table of model sizes x GPU counts x GPU
memories), the refusals with the GPUs a job would need or the offload key, the CPU guard for sharded quantised
models, the configs handed to FSDP (transformers' fsdp_config) and DeepSpeed, and the preflight report."""

from __future__ import annotations

import json

import preflight
import pytest
from hpc_finetune.io.cli import StageError
from hpc_finetune.train import strategy as strategies
from hpc_finetune.train.preflight import estimate_memory, model_parameters

MODELS = {  # Llama-architecture configs without weights (preflight reads the config only)
    "8B": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256),
    "32B": dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                intermediate_size=27648, vocab_size=152064),
    "70B": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                intermediate_size=28672, vocab_size=128256),
}
GIB24, GIB48, GIB80 = 24_576, 49_152, 81_559  # an RTX 4090 / L40S / A100-80GB, as torch reports them (MiB)
FRACTION = 0.92


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[dict, int]]:
    """{name: (4-bit QLoRA estimate at 2048 tokens, micro batch 1, r 16 on all linear layers; decoder layers)}."""
    from transformers import LlamaConfig

    cfg = preflight.Config(model_json="-", output="-", max_seq_length=2048, micro_batch_size=1)
    out = {}
    for name, config in MODELS.items():
        directory = tmp_path_factory.mktemp(name)
        LlamaConfig(**config, tie_word_embeddings=False).save_pretrained(directory)
        params = model_parameters(str(directory), "all-linear")
        assert params["decoder_layer_classes"] == ["LlamaDecoderLayer"]
        out[name] = (estimate_memory(params, cfg, bf16=True), params["num_layers"])
    return out


def auto(models, name: str, gpus: int, memory_mb: int, offload: bool = False) -> str:
    estimate, layers = models[name]
    try:
        return strategies.choose("auto", world=gpus, device="cuda", quantization="4bit", estimate=estimate,
                                 layers=layers, budget_mb=round(memory_mb * FRACTION), offload=offload)[0]
    except StageError as err:
        return f"refused: {err}"


# model, GPUs, memory per GPU -> what auto picks ("refused N": refused, naming N GPUs of that size)
TABLE = [
    ("8B", 1, GIB24, "single"), ("8B", 2, GIB24, "ddp"), ("8B", 8, GIB24, "ddp"),
    ("32B", 1, GIB24, "refused 2"), ("32B", 2, GIB24, "fsdp"), ("32B", 4, GIB24, "fsdp"),
    ("32B", 1, GIB48, "single"), ("32B", 2, GIB48, "ddp"),
    ("70B", 1, GIB24, "refused 4"), ("70B", 2, GIB24, "refused 4"), ("70B", 4, GIB24, "fsdp"),
    ("70B", 1, GIB48, "refused 2"), ("70B", 2, GIB48, "fsdp"), ("70B", 8, GIB48, "fsdp"),
    ("70B", 1, GIB80, "single"), ("70B", 4, GIB80, "ddp"),
]


@pytest.mark.parametrize(("model", "gpus", "memory_mb", "expected"), TABLE)
def test_auto_picks_from_the_estimate(models, model, gpus, memory_mb, expected):
    chosen = auto(models, model, gpus, memory_mb)
    if expected.startswith("refused"):
        needed = expected.split()[1]
        assert chosen.startswith("refused") and f"it needs {needed} GPUs of this size" in chosen, chosen
        assert f"resources.gpus x resources.nodes >= {needed}" in chosen
    else:
        assert chosen == expected


def test_the_estimate_per_gpu_shrinks_with_sharding_and_offload(models):
    estimate, layers = models["70B"]
    full = strategies.per_gpu_mb(estimate, layers, "ddp", 2)
    assert full == pytest.approx(estimate["total_mb"], abs=2)  # ddp: the preflight estimate of one process
    sharded = [strategies.per_gpu_mb(estimate, layers, "fsdp", n) for n in (1, 2, 4, 8)]
    assert sharded == sorted(sharded, reverse=True) and sharded[1] < full
    # the weights' share halves with each doubling; the activations and gathered layers stay
    assert sharded[1] - sharded[2] == pytest.approx((estimate["base_weights"] + estimate[
        "lora_weights_grads_optimizer"]) / 4 * 1.1, rel=0.01)
    assert strategies.per_gpu_mb(estimate, layers, "fsdp", 2, offload=True) < sharded[3]
    zero2 = strategies.per_gpu_mb(estimate, layers, "deepspeed", 2, zero_stage=2)
    assert sharded[1] < zero2 < full  # ZeRO-2 keeps the weights whole: for QLoRA it saves little
    assert strategies.per_gpu_mb(estimate, layers, "deepspeed", 2, zero_stage=3) == sharded[1]


def test_a_job_that_fits_only_with_offload_names_the_key(models):
    message = auto(models, "70B", 2, GIB24)
    assert "CPU offload would fit on these 2 GPU(s)" in message and "training.cpu_offload true" in message
    assert auto(models, "70B", 2, GIB24, offload=True) == "fsdp"
    assert auto(models, "70B", 1, GIB48, offload=True) == "fsdp"  # one GPU, offloaded


def test_activations_too_big_for_any_number_of_gpus_say_so():
    estimate = {"base_weights": 1000, "lora_weights_grads_optimizer": 10, "activations": 30_000,
                "logits_fp32": 100, "cuda_context": 900}
    assert strategies.gpus_needed(estimate, 10, "fsdp", 20_000) is None
    with pytest.raises(StageError, match="Sharding cannot help: the activations alone are too big"):
        strategies.choose("auto", world=4, device="cuda", quantization="4bit", estimate=estimate, layers=10,
                          budget_mb=20_000)


def test_an_explicit_strategy_is_checked_too(models):
    estimate, layers = models["70B"]
    budget = round(GIB48 * FRACTION)
    assert strategies.choose("fsdp", world=2, device="cuda", quantization="4bit", estimate=estimate,
                             layers=layers, budget_mb=budget) == ("fsdp", "as configured")
    with pytest.raises(StageError, match="training.strategy ddp: the job does not fit its 2 GPU"):
        strategies.choose("ddp", world=2, device="cuda", quantization="4bit", estimate=estimate, layers=layers,
                          budget_mb=budget)
    with pytest.raises(StageError, match="strategy single trains one process, but the job starts 2"):
        strategies.choose("single", world=2, device="cuda", quantization="4bit", estimate=estimate,
                          layers=layers, budget_mb=budget)


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
@pytest.mark.parametrize("requested", ["fsdp", "deepspeed"])
def test_sharded_quantised_training_is_refused_on_the_cpu(requested, quantization):
    with pytest.raises(StageError) as err:
        strategies.choose(requested, world=2, device="cpu", quantization=quantization)
    assert f"training.quantization {quantization} needs GPUs" in str(err.value)
    assert "bitsandbytes' CPU kernels" in str(err.value) and "training.quantization none" in str(err.value)


def test_on_the_cpu_auto_is_single_or_ddp_and_plain_lora_may_shard():
    assert strategies.choose("auto", world=1, device="cpu", quantization="4bit")[0] == "single"
    assert strategies.choose("auto", world=2, device="cpu", quantization="4bit")[0] == "ddp"
    assert strategies.choose("fsdp", world=2, device="cpu", quantization="none")[0] == "fsdp"
    with pytest.raises(StageError, match="deepspeed needs GPUs"):
        strategies.choose("deepspeed", world=2, device="cpu", quantization="none")


def test_the_fsdp_config_is_the_qlora_recipe():
    """What transformers' TrainingArguments turns into Accelerate's FSDP plugin."""
    from transformers import TrainingArguments

    config = strategies.fsdp_config(["LlamaDecoderLayer"], offload=False)
    assert config == {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                      "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                      "state_dict_type": "SHARDED_STATE_DICT", "cpu_ram_efficient_loading": True,
                      "reshard_after_forward": True, "cpu_offload": False}
    args = TrainingArguments(output_dir="/tmp/unused", fsdp=True, fsdp_config=config, use_cpu=True,
                             report_to=[])
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2 and plugin["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer"
    assert plugin["state_dict_type"] == "SHARDED_STATE_DICT" and plugin["cpu_ram_efficient_loading"] is True
    assert "cpu_offload" not in plugin
    offloaded = TrainingArguments(output_dir="/tmp/unused", fsdp=True, use_cpu=True, report_to=[],
                                  fsdp_config=strategies.fsdp_config(None, offload=True)).fsdp_plugin_args
    assert offloaded["cpu_offload"] is True and "transformer_cls_names_to_wrap" not in offloaded


@pytest.mark.parametrize(("stage", "offload"), [(3, False), (3, True), (2, True), (2, False)])
def test_the_deepspeed_config(stage, offload):
    config = strategies.deepspeed_config(stage, offload)
    json.dumps(config)  # written to the run directory as deepspeed.json
    zero = config["zero_optimization"]
    assert zero["stage"] == stage
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
                "train_batch_size"):
        assert config[key] == "auto"  # transformers fills them from the training arguments: they cannot disagree
    assert config["bf16"] == {"enabled": "auto"}
    assert ("offload_optimizer" in zero) is offload
    assert zero.get("offload_optimizer", {"device": "cpu"})["device"] == "cpu"
    assert ("offload_param" in zero) is (offload and stage == 3)
    assert zero.get("stage3_gather_16bit_weights_on_model_save", False) is (stage == 3)  # the adapter saved whole
    with pytest.raises(StageError, match="zero_stage must be 2 or 3"):
        strategies.deepspeed_config(1, False)


def test_the_preflight_report_lists_every_strategy(tiny_model, tmp_path):
    record = tmp_path / "model.json"
    record.write_text(json.dumps({"path": str(tiny_model)}))
    report = preflight.main(preflight.Config(model_json=str(record), output=str(tmp_path / "preflight.json"),
                                             max_seq_length=256, gpus=1, processes_per_node=2,
                                             strategy="fsdp", quantization="none"))
    strategy = report["strategy"]
    assert strategy["chosen"] == "fsdp" and strategy["requested"] == "fsdp" and strategy["world_size"] == 2
    assert strategy["decoder_layer_classes"] == ["LlamaDecoderLayer"]
    assert set(strategy["per_gpu_mb"]) == {"single", "ddp", "fsdp", "deepspeed"}
    assert strategy["per_gpu_mb"]["fsdp"]["gpus"] == 2 and "mb_per_gpu_cpu_offload" in strategy["per_gpu_mb"]["fsdp"]
    with pytest.raises(StageError, match="training.quantization 4bit needs GPUs"):
        preflight.main(preflight.Config(model_json=str(record), output=str(tmp_path / "p2.json"),
                                        max_seq_length=256, processes_per_node=2, strategy="fsdp"))
    assert preflight.world_size(preflight.Config(model_json="-", output="-", gpus=4, nodes=2)) == 8
    assert preflight.world_size(preflight.Config(model_json="-", output="-", gpus=0)) == 1


def test_the_train_stage_hands_the_strategy_to_the_trainer_arguments(tmp_path):
    import importlib.util
    from types import SimpleNamespace

    from hpc_finetune.train.setup import strategy_settings

    cfg = SimpleNamespace(cpu_offload=True, zero_stage=2)
    fsdp = strategy_settings(cfg, tmp_path, {"name": "fsdp", "decoder_layer_classes": ["LlamaDecoderLayer"]})
    assert fsdp == {"fsdp": True, "fsdp_config": strategies.fsdp_config(["LlamaDecoderLayer"], offload=True)}
    assert strategy_settings(cfg, tmp_path, {"name": "ddp"}) == {} == strategy_settings(cfg, tmp_path, None)
    if importlib.util.find_spec("deepspeed"):
        assert strategy_settings(cfg, tmp_path, {"name": "deepspeed"}) == {
            "deepspeed": strategies.deepspeed_config(2, True)}
        assert json.loads((tmp_path / "deepspeed.json").read_text()) == strategies.deepspeed_config(2, True)
    else:  # the pinned stack (and this environment) leaves DeepSpeed out: a clear error, not an ImportError
        with pytest.raises(StageError, match="needs the deepspeed package"):
            strategy_settings(cfg, tmp_path, {"name": "deepspeed"})
