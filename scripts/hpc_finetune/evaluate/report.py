"""The evaluate stage's summary table."""

from __future__ import annotations

from typing import Any


def summary_rows(m: dict) -> list[tuple[str, Any]]:
    def fmt(value: Any, digits: int = 4) -> str:
        return "n/a" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)

    rows = [
        ("eval loss base -> tuned", f"{fmt(m['base_eval_loss'])} -> {fmt(m['finetuned_eval_loss'])}"),
        ("perplexity base -> tuned", f"{fmt(m['base_perplexity'])} -> {fmt(m['finetuned_perplexity'])}"),
        ("loss ratio (base/tuned)", fmt(m["eval_loss_ratio"])),
        ("train loss base -> tuned", f"{fmt(m['base_train_loss'])} -> {fmt(m['finetuned_train_loss'])}"),
        ("exact match train / eval", f"{fmt(m['train_exact_match'])} / {fmt(m['eval_exact_match'])}"),
        ("token F1 train / eval", f"{fmt(m['train_token_f1'])} / {fmt(m['eval_token_f1'])}"),
        ("samples train / eval", f"{m['samples_generated']['train']} / {m['samples_generated']['eval']}"),
        ("wall time", f"{m['wall_time_s']} s"),
        ("peak memory", m["peak_memory"]),
    ]
    rows += [("note", note) for note in m["notes"]]
    return rows
