"""Classification-style answers: the label set (evaluate.labels, or detected from the references), the rule that
turns a generated answer into a label, and the check that every reference is a label and every label occurs.

Normalising (the same word tokens as token F1: lower case, punctuation removed, words joined by one space), an
answer becomes the label that
  1. equals it, else
  2. it starts with (whole words; the longest such label), else
  3. is the only label it contains (whole words),
else no label ("unmatched": wrong for accuracy, a column of its own in the confusion matrix).
No heavy imports: used by the configuration check when Snakemake starts.
"""

from __future__ import annotations

from hpc_finetune.evaluate.scoring import words
from hpc_finetune.io.cli import StageError

UNMATCHED = "(unmatched)"
MAX_LABEL_WORDS = 3


def norm(text: str) -> str:
    return " ".join(words(text))


def detect(references: list[str], max_labels: int) -> list[str] | None:
    """The references as a label set when they look like one: 2..max_labels distinct normalised values, each at
    most MAX_LABEL_WORDS words, and at least twice as many references as values; else None."""
    values = sorted({norm(r) for r in references})
    if not max_labels or not 2 <= len(values) <= max_labels or len(references) < 2 * len(values):
        return None
    return values if all(0 < len(v.split()) <= MAX_LABEL_WORDS for v in values) else None


def to_label(answer: str, labels: list[str]) -> str | None:
    """The label an answer names (module docstring), or None."""
    text, normed = norm(answer), {norm(label): label for label in labels}
    if text in normed:
        return normed[text]
    padded = f" {text} "
    starts = [n for n in normed if padded.startswith(f" {n} ")]
    if starts:
        return normed[max(starts, key=len)]
    inside = [n for n in normed if f" {n} " in padded]
    return normed[inside[0]] if len(inside) == 1 else None


def check_references(references: list[tuple[int, str]], labels: list[str], where: str) -> None:
    """Every reference (row number, text) is one of the labels, and every label is some row's reference; a
    StageError naming `where` and the row (or the label) otherwise."""
    normed = {norm(label): label for label in labels}
    if len(normed) < len(labels):
        raise StageError(f"evaluate.labels {labels}: two labels are the same after normalising (lower case, no "
                         "punctuation)")
    if not references:
        raise StageError(f"{where}: no rows with a reference answer to check evaluate.labels against")
    for number, ref in references:
        if norm(ref) not in normed:
            raise StageError(f"{where} row {number}: the reference answer {ref[:80]!r} is not one of evaluate.labels "
                             f"({', '.join(labels)}); fix the row or the labels")
    found = {norm(ref) for _, ref in references}
    missing = [label for n, label in normed.items() if n not in found]
    if missing:
        raise StageError(f"{where}: evaluate.labels {', '.join(map(repr, missing))} never occur(s) among the "
                         f"{len(references)} reference answers (they use {', '.join(sorted(found))}); remove it "
                         "or fix its spelling")
