"""Merged checkpoints load with the same meaning in transformers 5 and in transformers 4 (what vLLM <= 0.25 servers
run). transformers 4.57 is installed apart (`make` puts it in .venv/transformers4, TRANSFORMERS4_PATH) and runs
in a subprocess over this environment's torch. Without it these tests skip; REQUIRE_TRANSFORMERS4=1 (CI) makes
that a failure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hpc_finetune.io.cli import StageError
from hpc_finetune.model.portable import legacy_config, legacy_tokenizer_config, make_portable
from support.common import demo_rows, make_adapter, write_rows

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


# --- the keys -------------------------------------------------------------------------------------------------


def test_llama3_rope_gets_theta_and_scaling_beside_rope_parameters():
    config = {"model_type": "llama", "dtype": "bfloat16", "rope_parameters": dict(LLAMA3_ROPE)}
    added = legacy_config(config)
    assert config["rope_theta"] == 500000.0 and config["torch_dtype"] == "bfloat16"
    assert config["rope_scaling"] == {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    assert config["rope_parameters"] == LLAMA3_ROPE  # what transformers 5 reads is untouched
    assert set(added) == {"config.json: rope_theta", "config.json: rope_scaling", "config.json: torch_dtype"}


def test_default_rope_gets_only_theta_and_nested_configs_are_converted():
    config = {"text_config": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                                  "partial_rotary_factor": 0.5}}}
    legacy_config(config)
    text = config["text_config"]
    assert text["rope_theta"] == 1e6 and text["partial_rotary_factor"] == 0.5 and "rope_scaling" not in text


def test_keys_already_present_and_per_attention_type_rope_are_left_alone(caplog):
    config = {"rope_theta": 1.0, "torch_dtype": "float16", "dtype": "bfloat16",
              "rope_parameters": {"rope_type": "default", "rope_theta": 2.0}}
    assert legacy_config(config) == [] and config["rope_theta"] == 1.0 and config["torch_dtype"] == "float16"
    per_type = {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    assert legacy_config(per_type) == [] and "rope_theta" not in per_type
    assert "per attention type" in caplog.text


def test_tokenizers_backend_becomes_pretrained_tokenizer_fast():
    config = {"tokenizer_class": "TokenizersBackend"}
    assert legacy_tokenizer_config(config) and config["tokenizer_class"] == "PreTrainedTokenizerFast"
    llama = {"tokenizer_class": "LlamaTokenizer"}  # transformers 4 loads its Fast sibling from tokenizer.json
    assert legacy_tokenizer_config(llama) == [] and llama["tokenizer_class"] == "LlamaTokenizer"


def test_a_second_pass_changes_nothing(tiny_model, tmp_path):
    model = shutil.copytree(tiny_model, tmp_path / "model")
    assert make_portable(model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    assert make_portable(model) == []
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before


def test_a_broken_config_is_named_and_left_as_it_was(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(StageError, match=r"config\.json is not valid JSON"):
        make_portable(tmp_path)
    assert (tmp_path / "config.json").read_text() == '{"model_type": "llama",'


def test_transformers_5_reads_the_same_config_and_tokenizer(tiny_model, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    model = shutil.copytree(tiny_model, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config["rope_parameters"] = dict(LLAMA3_ROPE)
    (model / "config.json").write_text(json.dumps(config))
    before_config, before_tok = AutoConfig.from_pretrained(model).to_dict(), AutoTokenizer.from_pretrained(model)
    make_portable(model)
    after_config, after_tok = AutoConfig.from_pretrained(model).to_dict(), AutoTokenizer.from_pretrained(model)
    assert {k: v for k, v in after_config.items() if k != "_name_or_path"} == {
        k: v for k, v in before_config.items() if k != "_name_or_path"}
    text = [{"role": "user", "content": "What is hypertension?"}]
    assert after_tok.apply_chat_template(text) == before_tok.apply_chat_template(text)
    assert after_tok.get_vocab() == before_tok.get_vocab()


# --- a real merge, loaded by transformers 4 --------------------------------------------------------------------

PROBE = """
import json, sys, torch, transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
out = {"version": transformers.__version__}
for name in sys.argv[1:]:
    config = AutoConfig.from_pretrained(name)
    out[name] = {"rope_theta": config.rope_theta, "rope_scaling": config.rope_scaling}
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as err:
        out[name]["tokenizer_error"] = str(err)
        continue
    ids = tok.apply_chat_template(json.loads(sys.stdin.readline()), add_generation_prompt=True, tokenize=True)
    model = AutoModelForCausalLM.from_pretrained(name, torch_dtype=torch.float32)
    with torch.no_grad():
        out[name].update(ids=list(ids), logits=model(torch.tensor([ids])).logits[0].tolist())
print(json.dumps(out))
"""


def transformers4() -> Path:
    path = os.environ.get("TRANSFORMERS4_PATH", "")
    if path and (Path(path) / "transformers").is_dir():
        return Path(path)
    if os.environ.get("REQUIRE_TRANSFORMERS4") == "1":
        pytest.fail(f"REQUIRE_TRANSFORMERS4=1 but TRANSFORMERS4_PATH ({path!r}) holds no transformers: run `make env`")
    pytest.skip("transformers 4 is not installed beside the environment (TRANSFORMERS4_PATH); `make env` does it")


@pytest.fixture(scope="module")
def llama31_style(tmp_path_factory, tiny_model) -> dict:
    """The tiny model with Llama-3.1's RoPE (theta 500,000, llama3 scaling), an adapter, and its merge."""
    import merge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("llama31")
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.config.rope_parameters = dict(LLAMA3_ROPE)
    model.config.max_position_embeddings = 131072
    model.save_pretrained(root / "base")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(root / "base")
    (root / "model.json").write_text(json.dumps({"path": str(root / "base")}))
    adapter = make_adapter(root / "base", root / "adapter")
    report = merge.main(merge.Config(
        model_json=str(root / "model.json"), adapter_dir=str(adapter), output_dir=str(root / "merged"),
        eval_data=str(write_rows(root / "eval.jsonl", demo_rows(0, 2))), report_out=str(root / "merge.json"),
        dtype="float32"))
    return {"root": root, "base": root / "base", "merged": root / "merged", "report": report}


def test_the_merge_reports_the_transformers4_keys_it_wrote(llama31_style):
    assert "config.json: rope_scaling" in llama31_style["report"]["transformers4_keys"]
    saved = json.loads((llama31_style["merged"] / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_transformers4_loads_the_merged_model_with_the_same_rope_tokens_and_logits(llama31_style):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = transformers4()
    merged, raw = llama31_style["merged"], llama31_style["base"]  # the base: as transformers 5 saved it
    chat = [m for row in demo_rows(0, 3) for m in row["messages"] if m["role"] != "system"]
    result = subprocess.run([sys.executable, "-c", PROBE, str(merged), str(raw)], capture_output=True, text=True,
                            input=json.dumps(chat) + "\n", env=os.environ | {"PYTHONPATH": str(path)})
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["version"].startswith("4."), seen["version"]

    # Without the keys, transformers 4 misreads the RoPE silently and cannot load the tokenizer: the control.
    assert seen[str(raw)]["rope_theta"] == 10000.0 and seen[str(raw)]["rope_scaling"] is None
    assert "TokenizersBackend" in seen[str(raw)]["tokenizer_error"]

    old = seen[str(merged)]
    assert old["rope_theta"] == 500000.0 and old["rope_scaling"]["rope_type"] == "llama3"
    tok = AutoTokenizer.from_pretrained(merged)
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert old["ids"] == ids and len(ids) > 64  # long enough for the RoPE to matter
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    with torch.no_grad():
        new = model(torch.tensor([ids])).logits[0]
    assert float((torch.tensor(old["logits"]) - new).abs().max()) < 1e-4
