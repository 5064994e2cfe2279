"""One place that turns a dataset row into what the model sees, the way the train stage (TRL's SFTTrainer) does.

A row has one of three shapes, the same throughout a file:
  messages            {"messages": [{"role", "content"}, ...]}  -> chat template; the answer is the last assistant
                      turn, the prompt is the turns before it rendered with `add_generation_prompt=True`
  prompt_completion   {"prompt": str, "completion": str}         -> prompt + completion + EOS (TRL appends the EOS)
  text                {"text": str}                               -> text + EOS, all of it is the answer

Used by the merge stage (inputs for the logit check) and the evaluate stage (answer-only loss, greedy answers).
No heavy imports: the tokenizer is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common import StageError

FORMATS = ("messages", "prompt_completion", "text")

# Used by the merge check when the eval data is empty: any text exercises every merged weight.
FALLBACK_TEXT = "Question: what does a fine-tuned model answer? Answer: it answers as it was taught."


@dataclass
class Rendered:
    prompt: str  # what the model is given ("" for text rows)
    answer: str  # what the model is trained to produce after the prompt (template end-of-turn / EOS included)
    reference: str | None  # the bare reference answer to compare a generation with; None for text rows


def detect_format(rows: list[dict], source: str = "data") -> str | None:
    """The shape shared by every row; None for no rows. A mixed or unknown shape is a StageError."""
    if not rows:
        return None
    found = None
    for lineno, row in enumerate(rows, start=1):
        if "messages" in row:
            fmt = "messages"
        elif "prompt" in row and "completion" in row:
            fmt = "prompt_completion"
        elif "text" in row:
            fmt = "text"
        else:
            raise StageError(
                f"{source} row {lineno}: expected a 'messages', 'prompt'+'completion' or 'text' field,"
                f" got {sorted(row)}"
            )
        if found is None:
            found = fmt
        elif fmt != found:
            raise StageError(f"{source} row {lineno}: shape {fmt} differs from the first row's shape {found}")
    return found


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
