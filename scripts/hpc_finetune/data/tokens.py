"""Token lengths of normalised rows as the trainer sees them, for the data stage (hpc_finetune.data.clean), measured
a batch at a time while the next batch is read (Measure).

The lengths are those of `tokenizer.apply_chat_template(messages, tokenize=True)` for chat rows and of
`tokenizer(text + eos)` for text and prompt + completion rows; they come from the fast tokenizer's own batch encoder
(`backend_tokenizer.encode_batch`: the same ids, without the Python objects per row and token that transformers
builds around them; `encode_batch_fast`, which skips the offsets, measured slower here), on every core: it releases the GIL and spreads a batch over the cores while
Python reads, normalises and renders the next one. Chat rows are rendered by the chat template once per
conversation shape where it inserts the contents as they are (hpc_finetune.data.chat), else by jinja per row.
No heavy imports at module level: the tokenizer is passed in.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from hpc_finetune.io.cli import StageError


def encoder(tokenizer) -> Callable[[list[str], bool], list[int]]:
    """lengths(texts, add_special_tokens): the token count of each text, as tokenizer(texts)["input_ids"] gives it.
    The backend's batch encoder when transformers would call it with its own settings (no truncation, padding or
    split special tokens), else the tokenizer itself."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (backend is None or backend.truncation or backend.padding or getattr(tokenizer, "split_special_tokens", False)
            or not hasattr(backend, "encode_batch")):
        return lambda texts, special: [len(ids) for ids in tokenizer(texts, add_special_tokens=special)["input_ids"]]
    return lambda texts, special: [len(e) for e in backend.encode_batch(texts, add_special_tokens=special)]


def texts_of(tokenizer, rows: list[dict], fmt: str, model: str, render=None) -> list[str]:
    """What the tokenizer encodes for each row: the rendered chat template for messages (`render`, else jinja), or
    the text with TRL's appended EOS."""
    if fmt in ("messages", "alpaca"):
        if not tokenizer.chat_template:
            raise StageError(
                f"the tokenizer of {model} has no chat template, so it cannot train on chat rows; "
                "use an instruct model or a text/prompt_completion dataset"
            )
        conversations = [r["messages"] for r in rows]
        try:
            return render(conversations) if render else tokenizer.apply_chat_template(conversations, tokenize=False)
        except Exception as err:  # jinja raises its own errors, e.g. "system role not supported"
            raise StageError(f"the chat template of {model} rejects these conversations: {err}") from None
    eos = tokenizer.eos_token or ""
    texts = [r["text"] if fmt == "text" else r["prompt"] + r["completion"] for r in rows]
    return [t if t.endswith(eos) else t + eos for t in texts]


def token_lengths(tokenizer, rows: list[dict], fmt: str, model: str, lengths=None, render=None) -> list[int]:
    """Lengths as the trainer sees them: the chat template (which carries the BOS) for messages, no special tokens
    added; for text and prompt + completion the tokenizer (which adds BOS) after TRL's appended EOS."""
    if not rows:
        return []
    lengths = lengths or encoder(tokenizer)
    return lengths(texts_of(tokenizer, rows, fmt, model, render), fmt not in ("messages", "alpaca"))


@contextlib.contextmanager
def all_cores() -> Iterator[None]:
    """The fast tokenizer's batches spread over every core for the block (TOKENIZERS_PARALLELISM, read at each call;
    the workflow sets it false for the processes that fork), then the setting as it was, or false where there was
    none: a process forked later then neither uses the thread pool nor prints the tokenizers' fork warning."""
    old = os.environ.get("TOKENIZERS_PARALLELISM", "false")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        os.environ["TOKENIZERS_PARALLELISM"] = old


class Measure:
    """Token lengths of batches measured in a thread beside the caller: submit(batch, rows) starts a batch and
    returns the batch submitted before it with its lengths (None at first); finish() returns the last one. Batches
    come back in the order they went in; at most one is measured while the caller gathers the next."""

    def __init__(self, tokenizer, fmt: str, model: str):
        from hpc_finetune.data.chat import renderer

        self.tokenizer, self.fmt, self.model = tokenizer, fmt, model
        self.lengths = encoder(tokenizer)
        self.render = renderer(tokenizer) if fmt in ("messages", "alpaca") and tokenizer.chat_template else None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="measure")
        self.inflight: tuple[object, Future] | None = None
        self.cores = all_cores()
        self.cores.__enter__()

    def submit(self, batch, rows: list[dict]) -> tuple[object, list[int]] | None:
        done = self.finish()
        self.inflight = (batch, self.pool.submit(
            token_lengths, self.tokenizer, rows, self.fmt, self.model, self.lengths, self.render))
        return done

    def finish(self) -> tuple[object, list[int]] | None:
        if self.inflight is None:
            return None
        (batch, future), self.inflight = self.inflight, None
        return batch, future.result()

    def close(self, error: BaseException | None = None) -> None:
        """Stop; on an `error` of the caller's, a batch still measured that failed raises its own error first (it
        came from rows read earlier)."""
        try:
            if error is not None and self.inflight is not None and self.inflight[1].exception() is not None:
                raise self.inflight[1].exception()
        finally:
            self.inflight = None
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.cores.__exit__(None, None, None)
