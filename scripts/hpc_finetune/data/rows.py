"""One place that turns a dataset row into what the model sees, the way the train stage (TRL's SFTTrainer) does.

A row has one of three shapes, the same throughout a file:
  messages            {"messages": [{"role", "content"}, ...]}  -> chat template; the answer is the last assistant
                      turn, the prompt is the turns before it rendered with `add_generation_prompt=True`
  prompt_completion   {"prompt": str, "completion": str}         -> prompt + completion + EOS (TRL appends the EOS)
  text                {"text": str}                               -> text + EOS, all of it is the answer

Used by the train stage (the shape of its data), the merge stage (inputs for the logit check) and the evaluate
stage (answer-only loss, greedy answers).
No heavy imports: the tokenizer is passed in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from hpc_finetune.io.cli import StageError

FORMATS = ("messages", "prompt_completion", "text")

# Used by the merge check when the eval data is empty: any text exercises every merged weight.
FALLBACK_TEXT = "Question: what does a fine-tuned model answer? Answer: it answers as it was taught."


@dataclass
class Rendered:
    prompt: str  # what the model is given ("" for text rows)
    answer: str  # what the model is trained to produce after the prompt (template end-of-turn / EOS included)
    reference: str | None  # the bare reference answer to compare a generation with; None for text rows


SHAPES = {"messages": {"messages"}, "prompt_completion": {"prompt", "completion"}, "text": {"text"}}


def detect_format(rows: list[dict], source: str = "data", other_columns: bool = False) -> str | None:
    """The shape shared by every row (the data stage writes exactly these keys; with other_columns, the test set,
    also the row's other columns, none of them a shape's key); None for no rows. An unknown or mixed shape is a
    StageError naming the row."""
    found = None
    for lineno, row in enumerate(rows, start=1):
        fmt = next((name for name, keys in SHAPES.items()
                    if (keys <= set(row) if other_columns else set(row) == keys)), None)
        if fmt is None:
            raise StageError(f"{source} row {lineno}: keys {sorted(row)} are none of the row shapes "
                             f"{', '.join('+'.join(sorted(keys)) for keys in SHAPES.values())} (the data stage's output)")
        if found is None:
            found = fmt
        elif fmt != found:
            raise StageError(f"{source} row {lineno}: shape {fmt} differs from the first row's shape {found}; "
                             "mixed formats")
    return found


def to_prompt_completion(messages: list[dict]) -> dict:
    """A conversation as TRL's conversational prompt/completion: the last assistant reply is the completion."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise StageError(f"a conversation has no assistant turn to train on: {json.dumps(messages)[:200]}")
    return {"prompt": messages[:last], "completion": [messages[last]]}


def _chat(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def render(row: dict, tokenizer: Any, fmt: str) -> Rendered:
    """Split a row into (prompt, answer, reference) as the training saw it."""
    if fmt == "messages":
        messages = row["messages"]
        if not messages or messages[-1].get("role") != "assistant":
            raise StageError("a messages row must end with an assistant turn (the answer)")
        if not getattr(tokenizer, "chat_template", None):
            raise StageError("the data is in chat (messages) form but the tokenizer has no chat template")
        prompt = _chat(tokenizer, messages[:-1], add_generation_prompt=True)
        full = _chat(tokenizer, messages, add_generation_prompt=False)
        reference = str(messages[-1]["content"])
        if full.startswith(prompt):
            answer = full[len(prompt) :]
        else:  # a template that renders the prompt alone differently: the answer is at least the content
            answer = reference
        return Rendered(prompt, answer, reference)
    eos = tokenizer.eos_token or ""
    if fmt == "prompt_completion":
        completion = str(row["completion"])
        answer = completion if completion.endswith(eos) else completion + eos
        return Rendered(str(row["prompt"]), answer, completion)
    if fmt == "text":
        text = str(row["text"])
        return Rendered("", text if text.endswith(eos) else text + eos, None)
    raise StageError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")


def encode(
    tokenizer: Any, rendered: Rendered, fmt: str, max_length: int | None = None
) -> tuple[list[int], int]:
    """Token ids of prompt+answer and the number of leading prompt tokens (not scored).

    Like TRL: the chat template already carries the BOS token (no special tokens added), plain text gets the
    tokenizer's special tokens; the answer starts where the tokenised prompt and prompt+answer diverge, so a token
    merged across the boundary counts as answer. Longer sequences are cut to `max_length` from the right."""
    special = fmt != "messages"
    ids = tokenizer(rendered.prompt + rendered.answer, add_special_tokens=special)["input_ids"]
    head = (
        tokenizer(rendered.prompt, add_special_tokens=special)["input_ids"]
        if rendered.prompt or special
        else []
    )
    prompt_len = 0
    for a, b in zip(head, ids, strict=False):
        if a != b:
            break
        prompt_len += 1
    if max_length is not None and len(ids) > max_length:
        ids = ids[:max_length]
        prompt_len = min(prompt_len, max_length)
    return ids, prompt_len


def prompt_ids(tokenizer: Any, rendered: Rendered, fmt: str) -> list[int]:
    """Token ids to generate an answer from."""
    return tokenizer(rendered.prompt, add_special_tokens=fmt != "messages")["input_ids"]
