"""Merge stage: real transformers/peft on the tiny demo model with a LoRA adapter made without training (seeded random
lora_B weights, so the merge visibly changes the logits). main() runs in-process: no 8 s interpreter start."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
from hpc_finetune.merge.check import check_rows, default_tolerance, judge
from hpc_finetune.model.load import resolve_dtype
from support.common import adapter_inputs, demo_rows, make_adapter, write_rows

# --- helpers ----------------------------------------------------------------------------------------------------


def logits(model, tokenizer, texts: list[str]):
    import torch

    with torch.inference_mode():
        return [model(**tokenizer(t, return_tensors="pt")).logits[0] for t in texts]


def max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


# --- fixtures --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model) -> dict:
    """Base model record, an adapter, eval data (demo chat rows) and one default (safetensors) merge."""
    import merge

    work = adapter_inputs(tmp_path_factory.mktemp("merge"), tiny_model, eval_rows=(0, 3))
    work["report"] = merge.main(config(work, "merged"))
    work["merged"] = work["root"] / "merged"
    return work


def config(work: dict, name: str, **overrides):
    import merge

    values = dict(
        model_json=work["model_json"],
        adapter_dir=str(work["adapter"]),
        eval_data=str(work["eval"]),
        output_dir=str(work["root"] / name),
        report_out=str(work["root"] / f"{name}.json"),
        dtype="float32",  # what `auto` gives on CPU; explicit so that the figures hold on a GPU machine too
    )
    values.update(overrides)
    return merge.Config(**values)


def check_texts() -> list[str]:
    """Texts not seen by the merge check: the merge must hold on any input, not only on the checked ones."""
    return [
        "What helps a sore throat?",
        demo_rows(5, 6)[0]["messages"][-1]["content"],
    ]


# --- tests -----------------------------------------------------------------------------------------------------


def test_merged_safetensors_reproduce_base_plus_adapter(work):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = work["report"]
    assert report["max_abs_logit_diff"] < 1e-3
    assert report["tolerance"] == 1e-3 and report["dtype"] == "float32" and report["format"] == "safetensors"
    assert report["adapter_effect_max_abs_logit"] > 0.1  # the adapter really changes the model
    assert report["num_shards"] == 1 and report["check_samples"] == 3
    names = {f["name"] for f in report["files"]}
    assert "model.safetensors" in names and report["total_bytes"] == sum(f["bytes"] for f in report["files"])
    assert report["num_parameters"] == sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(work["base"]).parameters()
    )
    for key in ("wall_time_s", "peak_memory", "weights_bytes", "roundtrip_max_abs_logit_diff"):
        assert key in report
    assert json.loads(Path(work["root"] / "merged.json").read_text()) == json.loads(json.dumps(report))

    # Independently of the stage's own check: merged (from disk) == base+adapter != base, on unseen inputs.
    tok = AutoTokenizer.from_pretrained(work["base"])
    texts = check_texts()
    base = AutoModelForCausalLM.from_pretrained(work["base"], dtype=torch.float32).eval()
    base_logits = logits(base, tok, texts)
    with_adapter = logits(PeftModel.from_pretrained(base, work["adapter"]).eval(), tok, texts)
    merged = AutoModelForCausalLM.from_pretrained(work["merged"]).eval()
    merged_logits = logits(merged, tok, texts)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert max_diff(merged_logits, with_adapter) < 1e-3
    assert max_diff(merged_logits, base_logits) > 0.1


def test_output_carries_tokenizer_chat_template_generation_config(work):
    from transformers import AutoTokenizer, GenerationConfig

    merged, base = work["merged"], work["base"]
    files = {p.name for p in merged.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert "chat_template.jinja" in files or json.loads((merged / "tokenizer_config.json").read_text()).get(
        "chat_template"
    )
    messages = demo_rows(0, 1)[0]["messages"]
    tok, base_tok = AutoTokenizer.from_pretrained(merged), AutoTokenizer.from_pretrained(base)
    assert tok.apply_chat_template(messages, tokenize=False) == base_tok.apply_chat_template(
        messages, tokenize=False
    )
    assert (
        GenerationConfig.from_pretrained(merged).eos_token_id
        == GenerationConfig.from_pretrained(base).eos_token_id
    )
    config = json.loads((merged / "config.json").read_text())
    assert config["dtype"] == "float32" and config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    # No temporary or backup directory is left next to the output.
    assert not [p for p in work["root"].iterdir() if p.name.startswith(".merged")]


def test_adapter_without_tokenizer_gets_the_base_tokenizer(work):
    import merge

    adapter = work["root"] / "adapter-no-tok"
    adapter.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(work["adapter"] / name, adapter / name)
    merge.main(config(work, "no-tok", adapter_dir=str(adapter)))
    out, base = work["root"] / "no-tok", work["base"]
    for name in ("tokenizer.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (base / name).read_bytes()  # copied verbatim
    copied, original = (json.loads((d / "tokenizer_config.json").read_text()) for d in (out, base))
    assert copied.pop("tokenizer_class") == "PreTrainedTokenizerFast"  # for transformers-4 servers (portable.py)
    original.pop("tokenizer_class")
    assert copied == original


def test_sharded_safetensors_have_an_index_and_reload(work):
    import merge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = merge.main(config(work, "sharded", max_shard_size="100KB"))
    out = work["root"] / "sharded"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and report["num_shards"] == len(shards)
    assert set(index["weight_map"].values()) == set(shards)
    assert report["max_abs_logit_diff"] < 1e-3
    tok = AutoTokenizer.from_pretrained(out)
    texts = check_texts()
    sharded = logits(AutoModelForCausalLM.from_pretrained(out), tok, texts)
    single = logits(AutoModelForCausalLM.from_pretrained(work["merged"]), tok, texts)
    assert max_diff(sharded, single) == 0


@pytest.mark.parametrize("shard_size", ["5GB", "100KB"])
def test_bin_format_writes_pytorch_files_that_reload_equal(work, shard_size):
    import merge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = f"bin-{shard_size}"
    empty = write_rows(work["root"] / "empty.jsonl", [])  # also: no eval rows -> a fixed check text
    report = merge.main(
        config(work, name, merged_save_format="bin", max_shard_size=shard_size, eval_data=str(empty))
    )
    out = work["root"] / name
    assert not list(out.glob("*.safetensors"))
    if shard_size == "5GB":
        assert (out / "pytorch_model.bin").is_file() and report["num_shards"] == 1
    else:
        index = json.loads((out / "pytorch_model.bin.index.json").read_text())
        shards = sorted(p.name for p in out.glob("pytorch_model-*-of-*.bin"))
        assert len(shards) >= 3 and set(index["weight_map"].values()) == set(shards)
    assert report["format"] == "bin" and report["max_abs_logit_diff"] < 1e-3
    assert report["check_samples"] == 1 and "fixed text" in report["check_source"]
    tok = AutoTokenizer.from_pretrained(out)
    texts = check_texts()
    reloaded = logits(AutoModelForCausalLM.from_pretrained(out), tok, texts)
    assert max_diff(reloaded, logits(AutoModelForCausalLM.from_pretrained(work["merged"]), tok, texts)) == 0


def test_modules_to_save_is_refused_and_earlier_output_is_kept(work):
    import merge
    from hpc_finetune.io.cli import StageError

    out = work["root"] / "kept"
    shutil.copytree(work["merged"], out)
    before = digest(out)
    adapter = make_adapter(work["base"], work["root"] / "adapter-mts", modules_to_save=["lm_head"])
    cfg = config(work, "kept", adapter_dir=str(adapter))
    with pytest.raises(StageError, match="modules_to_save") as err:
        merge.main(cfg)
    assert str(adapter) in str(err.value) and "vLLM" in str(err.value)
    assert digest(out) == before
    assert not Path(cfg.report_out).exists()
    assert not [p for p in work["root"].iterdir() if p.name.startswith(".kept")]


def test_resized_vocabulary_is_refused(work):
    import merge
    from hpc_finetune.io.cli import StageError
    from transformers import AutoTokenizer

    adapter = work["root"] / "adapter-vocab"
    shutil.copytree(work["adapter"], adapter)
    tok = AutoTokenizer.from_pretrained(adapter)
    tok.add_tokens(["<new_token_a>", "<new_token_b>"])
    tok.save_pretrained(adapter)
    with pytest.raises(StageError, match="resized"):
        merge.main(config(work, "vocab", adapter_dir=str(adapter)))
    assert not (work["root"] / "vocab").exists()


@pytest.mark.parametrize("damage", ["missing-dir", "no-config", "no-weights", "truncated-weights"])
def test_missing_or_corrupt_adapter_names_the_directory(work, damage):
    import merge
    from hpc_finetune.io.cli import StageError

    adapter = work["root"] / f"adapter-{damage}"
    if damage != "missing-dir":
        shutil.copytree(work["adapter"], adapter)
    if damage == "no-config":
        (adapter / "adapter_config.json").unlink()
    elif damage == "no-weights":
        (adapter / "adapter_model.safetensors").unlink()
    elif damage == "truncated-weights":
        weights = adapter / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(StageError) as err:
        merge.main(config(work, f"out-{damage}", adapter_dir=str(adapter)))
    assert str(adapter) in str(err.value)
    assert not (work["root"] / f"out-{damage}").exists()


def test_logit_difference_above_tolerance_fails_and_writes_nothing(work):
    import merge
    from hpc_finetune.io.cli import StageError

    cfg = config(work, "strict", tolerance=1e-9)
    with pytest.raises(StageError, match=r"largest logit difference .*, tolerance 1e-09 \(float32\)"):
        merge.main(cfg)
    assert not Path(cfg.output_dir).exists() and not Path(cfg.report_out).exists()
    assert not [p for p in work["root"].iterdir() if p.name.startswith(".strict")]


def test_dtype_auto_is_bfloat16_on_gpu_float32_on_cpu():
    import torch

    assert resolve_dtype("auto") == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    assert default_tolerance(torch.float32) == 1e-3 and default_tolerance(torch.float16) == 0.1


def test_rule_arguments_parse():
    import merge
    from hpc_finetune.io.cli import parse_args

    argv = "--merged-save-format safetensors --dtype auto --max-shard-size 5GB --check-samples 4 --tolerance null"
    argv += " --model-json M --adapter-dir A --eval-data E --output-dir O --report-out R"
    cfg = parse_args(merge.Config, argv.split())
    assert cfg.tolerance is None and cfg.check_samples == 4 and cfg.output_dir == "O"
    assert parse_args(merge.Config, argv.replace("null", "0.05").split()).tolerance == 0.05


def test_bfloat16_merge_is_judged_against_float32(work):
    """16-bit rounding alone moves the demo model's logits by more than the 0.1 default tolerance; the check admits
    that rounding (measured against float32 base+adapter) and nothing more."""
    import merge
    from safetensors import safe_open

    report = merge.main(config(work, "bf16", dtype="bfloat16"))
    assert report["dtype"] == "bfloat16" and report["tolerance"] == 0.1
    assert report["merged_vs_float32"] <= 2 * report["dtype_error"] + 0.1
    assert report["dtype_error"] > 0 and report["roundtrip_max_abs_logit_diff"] == 0
    with safe_open(work["root"] / "bf16" / "model.safetensors", framework="pt") as fh:
        assert {str(fh.get_tensor(k).dtype) for k in fh.keys()} == {"torch.bfloat16"}
    assert json.loads((work["root"] / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory) -> dict:
    """An adapter the train stage trained (4-bit QLoRA on demo chats, 8 steps: loss 9.8 -> 3.5), and the merge
    inputs around it."""
    import train
    from support.train_stage import make_config

    root = tmp_path_factory.mktemp("trained")
    chats = demo_rows(0, 40)
    cfg = make_config(tiny_model, root / "train", chats[:32], chats[32:])
    train.main(cfg)
    (root / "model.json").write_text(json.dumps({"path": str(tiny_model)}))
    return {"root": root, "model_json": str(root / "model.json"), "adapter": Path(cfg.output_dir),
            "eval": write_rows(root / "eval.jsonl", chats[32:])}


def wrong_merge(kind: str, base_dir: Path):
    """save_weights of the merge stage, with the adapter dropped (the base's weights saved) or doubled
    (W + 2BA saved, from the merged W + BA): what a merge bug would write."""
    import torch
    from hpc_finetune.merge.save import save_weights
    from transformers import AutoModelForCausalLM

    def save(model, directory, fmt, max_shard_size):
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).state_dict()
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                exact = base[name] if kind == "dropped" else 2 * tensor.float() - base[name]
                tensor.copy_(exact.to(tensor.dtype))
        save_weights(model, directory, fmt, max_shard_size)

    return save


def test_bf16_check_rejects_a_dropped_or_doubled_trained_adapter(trained, tiny_model, monkeypatch):
    """The bf16 check (GPU default) on a trained adapter, through the stage: the right merge passes; a merge that
    drops or doubles the adapter, put in at the stage's save, stops the stage with nothing written. The adapter's
    effect is far above what bf16 rounding is allowed (else the check could not see it and would say so)."""
    import merge
    from hpc_finetune.io.cli import StageError
    from hpc_finetune.merge import methods

    right = merge.main(config(trained, "bf16", dtype="bfloat16"))
    allowed = 2 * right["dtype_error"] + right["tolerance"]
    assert right["merged_vs_float32"] <= allowed < right["adapter_effect_max_abs_logit"] / 3, right
    for kind in ("dropped", "doubled"):
        monkeypatch.setattr(methods, "save_weights", wrong_merge(kind, tiny_model))
        cfg = config(trained, kind, dtype="bfloat16")
        with pytest.raises(StageError, match=r"does not reproduce base\+adapter: .*vs float32 base\+adapter") as err:
            merge.main(cfg)
        far = float(re.search(r"merged ([\d.e+-]+)", str(err.value)).group(1))
        assert far > 2 * allowed, (kind, far, allowed)
        assert not Path(cfg.output_dir).exists() and not Path(cfg.report_out).exists()


def test_16bit_rule_admits_rounding_not_a_wrong_merge():
    import torch

    gen = torch.Generator().manual_seed(0)
    exact = [torch.randn(5, 11, generator=gen) * 5]
    noise = [torch.randn(5, 11, generator=gen) * 0.1 for _ in range(2)]
    unmerged16 = [exact[0] + noise[0]]  # what the dtype costs base+adapter
    result = {
        "reference_logits": unmerged16,
        "exact_logits": exact,
        "merged_logits": None,
        "adapter_effect": 5.0,
    }

    def judged(reloaded):
        return judge({**result, "merged_logits": reloaded}, reloaded, tolerance=0.1)

    rounded = judged([exact[0] + noise[1]])  # rounding of the same size: more than 0.1 from unmerged, but fine
    assert rounded["max_abs_logit_diff"] > 0.1 and rounded["passed"]
    assert not judged([exact[0] + 1.0])["passed"]  # off by far more than rounding explains
    assert not judged([exact[0] * float("nan")])["passed"]
    fp32 = judge({**result, "exact_logits": None, "merged_logits": exact}, exact, tolerance=1e-3)
    assert not fp32["passed"] and "dtype_error" not in fp32  # float32: the plain rule only


def test_the_check_reads_only_the_eval_rows_it_renders(tmp_path):
    """eval.jsonl may hold a million rows: the check reads its first check_samples and stops there (a broken line
    after them is never read), and a missing file gives no rows."""
    path = write_rows(tmp_path / "eval.jsonl", demo_rows(0, 5))
    with path.open("a") as fh:
        fh.write("not JSON\n")
    assert check_rows(str(path), 4) == demo_rows(0, 4) and check_rows(str(path), 5) == demo_rows(0, 5)
    assert check_rows(str(tmp_path / "missing.jsonl"), 4) == []
