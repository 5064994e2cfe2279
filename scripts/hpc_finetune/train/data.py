"""The train stage's data: the rows the data stage wrote, their shape, the loss they train (assistant turns,
completion, or everything) and the datasets.Dataset TRL takes.

Loss masking: chat data trains on the assistant turns when the chat template marks them with {% generation %};
otherwise each conversation becomes prompt (all turns before the last assistant reply) and completion (that
reply), so that only the reply is trained with any template. prompt/completion data trains on the completion,
text data on everything.
"""

from __future__ import annotations

from hpc_finetune.data.rows import detect_format, to_prompt_completion
from hpc_finetune.io.cli import StageError, log
from hpc_finetune.io.files import read_jsonl


def read_data(train_data: str, eval_data: str) -> tuple[list[dict], list[dict], str]:
    """Train and eval rows and their format (the same for both)."""
    train_rows, eval_rows = read_jsonl(train_data), read_jsonl(eval_data)
    if not train_rows:
        raise StageError(f"{train_data} has no rows; check the data stage's report")
    fmt = detect_format(train_rows, train_data)
    if eval_rows and (eval_fmt := detect_format(eval_rows, eval_data)) != fmt:
        raise StageError(f"{eval_data} is {eval_fmt} but the training data is {fmt}")
    return train_rows, eval_rows, fmt




def loss_mode(fmt: str, tokenizer, assistant_only: bool) -> str:
    from trl.chat_template_utils import has_generation_markers

    if fmt == "text":
        return "full"
    if fmt == "prompt_completion":
        return "completion_only"
    if not tokenizer.chat_template:
        raise StageError("the data is chat messages but the tokenizer has no chat template; add one to the model")
    if not assistant_only:
        return "full"
    if has_generation_markers(tokenizer.chat_template):
        log.info("loss: assistant turns only (the chat template marks them with {% generation %})")
        return "assistant_only"
    log.info(
        "loss: the chat template has no {% generation %} markers, so each conversation trains as prompt/completion:"
        " loss on the last assistant reply only, earlier turns are context"
    )
    return "completion_only"


def to_dataset(rows: list[dict], fmt: str, mode: str):
    """The rows as a datasets.Dataset in the form the loss mode needs; None when there are none."""
    from datasets import Dataset

    if not rows:
        return None
    if fmt == "messages" and mode == "completion_only":
        rows = [to_prompt_completion(row["messages"]) for row in rows]
    return Dataset.from_list(rows)
