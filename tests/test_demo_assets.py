"""The demo's own assets: the shipped medical Q&A set and the tiny model built from it."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import build_demo_model
import pytest
from hpc_finetune.io.cli import StageError
from hpc_finetune.train import quantized
from support.common import write_input
from tools import make_demo_data

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "data" / "demo" / "medical_qa.jsonl"


def digests(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def rows() -> list[dict]:
    return [json.loads(line) for line in DEMO_DATA.read_text(encoding="utf-8").splitlines()]


# --- the dataset ---------------------------------------------------------------------------------------------


def test_shipped_dataset_is_what_the_generator_writes(tmp_path):
    out = tmp_path / "qa.jsonl"
    make_demo_data.main(make_demo_data.Config(output=str(out)))
    assert out.read_bytes() == DEMO_DATA.read_bytes(), "run scripts/make_demo_data.py and commit the result"


def test_every_row_is_a_three_message_conversation():
    data = rows()
    assert 200 <= len(data) <= 400
    for n, row in enumerate(data, start=1):
        assert list(row) == ["messages"], f"line {n}"
        messages = row["messages"]
        assert [m["role"] for m in messages] == ["system", "user", "assistant"], f"line {n}"
        for m in messages:
            assert set(m) == {"role", "content"}, f"line {n}"
            assert isinstance(m["content"], str) and m["content"].strip() == m["content"] != "", f"line {n}"
    # Questions are unique; every answer is asked in more than one way (so held-out phrasings can be learned).
    questions = [r["messages"][1]["content"] for r in data]
    assert len(set(questions)) == len(questions)
    answers = [r["messages"][2]["content"] for r in data]
    assert all(answers.count(a) >= 2 for a in set(answers))


# --- the tiny model ------------------------------------------------------------------------------------------


def test_tiny_model_loads_and_generates(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert model.config.model_type == "llama"
    assert (tiny_model / "model.safetensors").is_file()
    assert len(tokenizer) == model.config.vocab_size
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.eos_token == "<|eot_id|>"
    assert set(model.generation_config.eos_token_id) == set(
        tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])
    )
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    # Plain tokenisation adds <|begin_of_text|> (as Llama 3 does) and round-trips the text.
    ids = tokenizer("Acid reflux: a burning feeling.").input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Acid reflux: a burning feeling."
    prompt = tokenizer.apply_chat_template(
        rows()[0]["messages"][:2], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def test_chat_template_marks_the_assistant_turn(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    messages = rows()[0]["messages"]
    enc = tokenizer.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert sum(mask) > 0
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    # Exactly the answer and its end-of-turn token are trained on.
    trained = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained == messages[2]["content"] + "<|eot_id|>"
    # The generation prompt is the rendering of the conversation up to where the answer starts.
    prompt = tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert full == prompt + messages[2]["content"] + "<|eot_id|>"


def test_conversations_fit_the_demo_sequence_length(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    lengths = [
        len(tokenizer.apply_chat_template(r["messages"], return_dict=True)["input_ids"]) for r in rows()
    ]
    assert max(lengths) < 200, max(lengths)


def test_base_survives_4bit_quantisation(tiny_model):
    """QLoRA trains against the 4-bit base and the merge reloads the full-precision one: they must agree."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    full = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    quant = AutoModelForCausalLM.from_pretrained(
        tiny_model,
        dtype=torch.float32,
        device_map="cpu",
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        ),
    )
    assert type(quant.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    quantized.keep_trainable(quant)  # the layout QLoRA trains in, on every CPU (not the AVX512-BF16 inference one)
    enc = tokenizer.apply_chat_template(rows()[0]["messages"], return_tensors="pt", return_dict=True)
    with torch.no_grad():
        a, b = full(**enc).logits, quant(**enc).logits
    assert (a - b).abs().max().item() < 0.05  # ~0.004 measured; plain random weights: ~6
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_two_builds_are_byte_identical_and_replace_the_output(tiny_model, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("from an older build")
    build_demo_model.main(build_demo_model.Config(data=str(DEMO_DATA), output=str(out)))
    first, second = digests(tiny_model), digests(out)
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= set(first)
    assert first == second
    assert [p.name for p in tmp_path.iterdir()] == ["model"], "temporary build directories were left behind"


# --- bad input -----------------------------------------------------------------------------------------------


GOOD = json.dumps(
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
)


@pytest.mark.parametrize(
    ("bad_line", "where", "message"),
    [
        ('{"messages": [{"role": "user", "content": "Hi"}', "line 3", "not valid JSON"),
        ('["a list"]', "line 3", "expected a JSON object"),
        ('{"messages": "Hi"}', "row 2", "messages is str, expected a list of messages"),
        ('{"messages": [{"role": "robot", "content": "Hi"}]}', "row 2", "messages[0].role 'robot' is not one of"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad_line, where, message):
    """The data stage's own reader and messages (blank lines count as lines, not as rows)."""
    data = tmp_path / "bad.jsonl"
    data.write_text(f"{GOOD}\n\n{bad_line}\n{GOOD}\n")
    out = tmp_path / "model"
    with pytest.raises(StageError) as err:
        build_demo_model.main(build_demo_model.Config(data=str(data), output=str(out)))
    assert f"{data} {where}" in str(err.value)
    assert message in str(err.value)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


@pytest.mark.parametrize("kind", ["json_array", "csv", "parquet", "dataset", "dataset_dict"])
def test_the_demo_model_builds_from_every_kind_of_dataset(tmp_path, kind):
    """With preset demo and a user's own dataset (alpaca JSON array, csv, parquet, save_to_disk): the tokenizer
    is trained on its text as the data stage reads it."""
    from transformers import AutoTokenizer

    alpaca = [{"instruction": f"Name symptom {i} of a cold.", "input": "", "output": f"Sneezing, case {i}."}
              for i in range(8)]
    data = write_input(kind, tmp_path, alpaca)
    out = tmp_path / "model"
    build_demo_model.main(build_demo_model.Config(data=str(data), output=str(out)))
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = "Name symptom 3 of a cold."
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
    assert len(tokenizer(text).input_ids) < len(text) / 2  # merges learnt from the dataset's own words


def test_a_hub_dataset_offline_fails_as_the_data_stage_does(tmp_path):
    with pytest.raises(StageError, match="cannot load the hub dataset 'nosuchorg/nosuchdataset'.*save_to_disk"):
        build_demo_model.main(build_demo_model.Config(data="nosuchorg/nosuchdataset", output=str(tmp_path / "m")))


def test_missing_data_is_a_clear_cli_error(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "build_demo_model.py"),
            "--data",
            str(tmp_path / "nope.jsonl"),
            "--output",
            str(tmp_path / "model"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "nope.jsonl not found; set dataset.path" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "model").exists()


def test_failed_build_leaves_no_half_written_output(tiny_model, tmp_path, monkeypatch):
    """A failure after the weights are written (here: the disk fills while saving the tokenizer) leaves the
    previous build untouched and no partial directory behind."""
    import transformers

    out = tmp_path / "model"
    out.mkdir()
    (out / "previous.txt").write_text("previous build")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        build_demo_model.main(build_demo_model.Config(data=str(DEMO_DATA), output=str(out)))
    assert [p.name for p in out.iterdir()] == ["previous.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
