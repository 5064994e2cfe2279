"""Per-sample scores of both models and the side-by-side metrics over them: exact match, token F1, ROUGE-L, and
for label-style answers accuracy, macro precision/recall/F1, the confusion matrix and per-label counts. Every
metric records how many rows it used. No heavy imports.

Macro averages are over the labels that are some scored row's reference (a label absent from the scored rows has
no recall); a label never predicted has precision 0.
"""

from __future__ import annotations

from hpc_finetune.evaluate.labels import UNMATCHED, detect, to_label
from hpc_finetune.evaluate.scoring import exact, rouge_l, token_f1

MODELS = ("base", "finetuned")
TEXT_SCORES = (("exact_match", "exact"), ("token_f1", "f1"), ("rouge_l", "rouge_l"))
SCORERS = {"exact": exact, "f1": token_f1, "rouge_l": rouge_l}


def sample_rows(split: str, rendered: list, questions: list[str], answers: dict[str, list[str]],
                labels: list[str] | None, groups: list | None = None) -> list[dict]:
    """One record per scored prompt: the prompt (as the model saw it, and the user's text), the reference, the
    models' answers (answers: {model: answers}, both models or the base alone) and their scores, with labels the
    label each names, with groups (evaluate.group_field) the row's group."""
    models = tuple(answers)
    rows = []
    for index, (item, question) in enumerate(zip(rendered, questions, strict=True)):
        reference = item.reference or ""
        row = {"index": index, "split": split, "question": question, "prompt": item.prompt, "reference": reference}
        row |= {"group": groups[index]} if groups is not None else {}
        row |= {f"{model}_answer": answers[model][index] for model in models}
        for key, score in SCORERS.items():
            row |= {f"{model}_{key}": round(score(answers[model][index], reference), 4) for model in models}
        if labels:
            row["reference_label"] = to_label(reference, labels)
            for model in models:
                row[f"{model}_label"] = to_label(answers[model][index], labels) or UNMATCHED
                row[f"{model}_correct"] = float(row[f"{model}_label"] == row["reference_label"])
        rows.append(row)
    return rows


def side(value_of, rows: int, models: tuple[str, ...] = MODELS) -> dict:
    return {model: value_of(model) for model in models} | {"rows": rows}


def text_metrics(samples: list[dict], models: tuple[str, ...] = MODELS) -> dict:
    """exact_match, token_f1, rouge_l: the mean over the samples, per model."""
    if not samples:
        return {}
    return {name: side(lambda m, key=key: round(sum(s[f"{m}_{key}"] for s in samples) / len(samples), 4), len(samples),
                       models)
            for name, key in TEXT_SCORES}


def classification(samples: list[dict], labels: list[str], models: tuple[str, ...] = MODELS) -> dict:
    """Accuracy, macro precision/recall/F1, the confusion matrix {reference: {predicted: count}} and per-label
    counts, per model, over the samples whose reference is a label."""
    scored = [s for s in samples if s["reference_label"] is not None]
    present = [label for label in labels if any(s["reference_label"] == label for s in scored)]
    out = {"labels": labels, "rows": len(scored), "unlabelled_references": len(samples) - len(scored)}
    for model in models:
        predicted = [s[f"{model}_label"] for s in scored]
        truth = [s["reference_label"] for s in scored]
        per_label = {}
        for label in labels:
            tp = sum(p == label and t == label for p, t in zip(predicted, truth, strict=True))
            n_pred, n_true = predicted.count(label), truth.count(label)
            precision = tp / n_pred if n_pred else 0.0
            recall = tp / n_true if n_true else None
            f1 = None if recall is None else 2 * precision * recall / (precision + recall) if tp else 0.0
            per_label[label] = {"support": n_true, "predicted": n_pred, "correct": tp,
                                "precision": round(precision, 4), "recall": None if recall is None else round(recall, 4),
                                "f1": None if f1 is None else round(f1, 4)}
        macro = {key: round(sum(per_label[label][key] for label in present) / len(present), 4) if present else None
                 for key in ("precision", "recall", "f1")}
        columns = [*labels, UNMATCHED]
        out[model] = {
            "accuracy": round(sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(scored), 4)
            if scored else None,
            "macro_precision": macro["precision"], "macro_recall": macro["recall"], "macro_f1": macro["f1"],
            "unmatched": predicted.count(UNMATCHED),
            "confusion": {t: {p: sum(1 for a, b in zip(truth, predicted, strict=True) if a == t and b == p)
                              for p in columns} for t in labels},
            "per_label": per_label,
        }
    return out


def classification_metrics(result: dict, models: tuple[str, ...] = MODELS) -> dict:
    """The side-by-side rows of a classification result."""
    return {name: side(lambda m, name=name: result[m][name], result["rows"], models)
            for name in ("accuracy", "macro_precision", "macro_recall", "macro_f1")}


def label_set(references: list[str], configured: list[str] | None, max_detected: int) -> tuple[list[str] | None, str]:
    """(labels, how): the configured labels, the detected ones (evaluate.labels module), or None."""
    if configured:
        return list(configured), "evaluate.labels"
    found = detect(references, max_detected)
    return found, (f"detected: {len(found)} distinct short references (at most {max_detected}), each used at least "
                   "twice on average" if found else "none: the references are free text")
