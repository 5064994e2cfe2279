"""The data stage's token lengths (hpc_finetune.data.tokens, hpc_finetune.data.chat): the chat template rendered once
per conversation shape gives byte for byte what tokenizer.apply_chat_template gives (the demo's template and
Llama-3-style ones), templates that look at a content go to jinja per row, and the lengths from the fast tokenizer's
batch encoder are those of apply_chat_template(tokenize=True) and tokenizer(text)."""

from __future__ import annotations

import os

import pytest
from hpc_finetune.data.chat import renderer
from hpc_finetune.data.tokens import Measure, encoder, token_lengths
from hpc_finetune.io.cli import StageError
from support.common import demo_rows

LLAMA3 = (  # Meta-Llama-3-8B-Instruct: the content is trimmed into a variable that gets the BOS on the first turn
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA31 = (  # Llama-3.1's shape without tools: the system message is taken out of the list, a date is added
    "{{- bos_token }}{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}{{- 'Cutting Knowledge Date: December 2023\n' }}"
    "{{- 'Today Date: ' + date_string + '\n\n' }}{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
)
LOOKS = {  # templates whose output depends on a content beyond inserting it: rendered by jinja per row
    "in": "{% for m in messages %}{% if '</think>' in m['content'] %}{{ m['content'].split('</think>')[-1] }}"
          "{% else %}{{ m['content'] }}{% endif %}{{ '<|eot_id|>' }}{% endfor %}",
    "truthiness": "{% for m in messages %}{% if m['content'] %}{{ m['role'] + ': ' + m['content'] }}{% endif %}"
                  "{% endfor %}",
    "tojson": "{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}",
    "twice": "{% for m in messages %}{{ m['content'] + m['content'] }}{% endfor %}",
    "length": "{% for m in messages %}{{ m['content'] | length }}{{ m['content'] }}{% endfor %}",
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def conversations() -> list[list[dict]]:
    """Demo conversations; with contents that trimming changes, special tokens, an empty answer, and other shapes."""
    rows = [row["messages"] for row in demo_rows(0, 20)]
    padded = [[dict(m, content=f"  {m['content']}\n\t") for m in messages] for messages in rows[:5]]
    odd = [[{"role": "user", "content": "<|eot_id|> a {{ b }} {% c %}"}, {"role": "assistant", "content": ""}],
           [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two \ue000"},
            {"role": "user", "content": " three"}, {"role": "assistant", "content": "four "}]]
    return rows + padded + odd


@pytest.mark.parametrize("template", ["demo", "llama3", "llama31", *LOOKS])
def test_the_template_renders_what_apply_chat_template_renders(tokenizer, template):
    tokenizer = tokenizer if template == "demo" else _with(tokenizer, {"llama3": LLAMA3, "llama31": LLAMA31,
                                                                          **LOOKS}[template])
    chats = conversations()
    render = renderer(tokenizer)
    assert render(chats) == tokenizer.apply_chat_template(chats, tokenize=False)
    once = template in ("demo", "llama3", "llama31")  # rendered once per shape, or by jinja per row
    assert render.plans and all((plan is not None) == once for plan in render.plans.values()), render.plans


def _with(tokenizer, template: str):
    import copy

    other = copy.deepcopy(tokenizer)
    other.chat_template = template
    return other


def test_token_lengths_are_those_of_apply_chat_template_and_the_tokenizer(tokenizer):
    chats = conversations()
    expected = [len(ids) for ids in tokenizer.apply_chat_template(chats, tokenize=True, return_dict=True)["input_ids"]]
    assert token_lengths(tokenizer, [{"messages": c} for c in chats], "messages", "m", render=renderer(tokenizer)) \
        == expected
    texts = [m["content"] for c in chats for m in c]
    expected = [len(ids) for ids in tokenizer([t + tokenizer.eos_token for t in texts])["input_ids"]]
    assert encoder(tokenizer)([t + tokenizer.eos_token for t in texts], True) == expected
    assert token_lengths(tokenizer, [{"text": t} for t in texts], "text", "m") == expected


def test_batches_come_back_in_order_and_a_template_error_names_the_model(tokenizer, monkeypatch):
    monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    measure = Measure(tokenizer, "messages", "the-model")
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"  # the tokenizer's batches on every core, while measuring
    chats = conversations()
    assert measure.submit("first", [{"messages": c} for c in chats[:3]]) is None
    assert measure.submit("second", [{"messages": c} for c in chats[3:4]])[0] == "first"
    assert measure.finish()[0] == "second" and measure.finish() is None
    measure.close()
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"  # a later fork neither warns nor uses the pool
    refusing = _with(tokenizer, "{% for m in messages %}{% if m['role'] == 'system' %}"
                                "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}"
                                "{% endfor %}")
    measure = Measure(refusing, "messages", "the-model")
    measure.submit("rows", [{"messages": c} for c in chats[:2]])  # demo rows start with a system turn
    with pytest.raises(StageError, match="the chat template of the-model rejects these conversations: System role"):
        measure.finish()
    measure.close()
