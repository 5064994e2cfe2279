"""The train stage's data: the rows the data stage wrote, their shape, the loss they train (assistant turns,
completion, or everything) and the datasets.Dataset TRL takes.

Loss masking: chat data trains on the assistant turns when the chat template marks them with {% generation %};
otherwise each conversation becomes prompt (all turns before the last assistant reply) and completion (that
reply), so that only the reply is trained with any template. prompt/completion data trains on the completion,
text data on everything.

The rows are read memory-mapped: datasets' JSON loader turns each file into Arrow once, and the training reads it
from there, so the stage's memory does not grow with the number of rows. The Arrow files (and TRL's tokenized
copies beside them) go to ARROW_CACHE beside the data, not to datasets' cache in HF_HOME, where every run's data
would stay: they go with the run's results, and the data stage removes them when it writes new data.
"""

from __future__ import annotations

from hpc_finetune.data.rows import detect_format, to_prompt_completion
from hpc_finetune.io.cli import StageError, log
from hpc_finetune.io.files import iter_jsonl

ARROW_CACHE = ".arrow-cache"  # beside train.jsonl: the Arrow form of the data (mapped)


def read_data(train_data: str, eval_data: str) -> tuple:
    """Train and eval rows (datasets.Dataset, memory-mapped; the eval rows [] when there are none) and their
    format (the same for both). Every row is checked first, one at a time, so a bad one is named by its line."""
    fmt = detect_format(iter_jsonl(train_data), train_data)
    if fmt is None:
        raise StageError(f"{train_data} has no rows; check the data stage's report")
    if (eval_fmt := detect_format(iter_jsonl(eval_data), eval_data)) not in (None, fmt):
        raise StageError(f"{eval_data} is {eval_fmt} but the training data is {fmt}")
    return mapped(train_data), mapped(eval_data) if eval_fmt else [], fmt


def mapped(path: str):
    """A JSON Lines file as a memory-mapped datasets.Dataset (converted to Arrow once, in ARROW_CACHE beside it)."""
    from pathlib import Path

    import datasets

    return datasets.load_dataset("json", data_files=str(path), split="train",
                                 cache_dir=str(Path(path).parent / ARROW_CACHE))




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


def to_dataset(rows, fmt: str, mode: str):
    """The rows (a list, or a datasets.Dataset) as a datasets.Dataset in the form the loss mode needs; None when
    there are none."""
    from datasets import Dataset

    if not len(rows):
        return None
    ds = rows if isinstance(rows, Dataset) else Dataset.from_list(rows)
    if fmt == "messages" and mode == "completion_only":
        ds = ds.map(lambda batch: pc_columns(batch["messages"]), batched=True,
                    remove_columns=ds.column_names)
    return ds


def pc_columns(conversations: list[list[dict]]) -> dict:
    pairs = [to_prompt_completion(messages) for messages in conversations]
    return {"prompt": [p["prompt"] for p in pairs], "completion": [p["completion"] for p in pairs]}
