"""Metrics per group of the scored rows (evaluate.group_field: a category, a source, a demographic group): every
side-by-side metric of the evaluate stage for each group's rows, and for label-style answers each label's
false-positive and false-negative rate per group and model (bias checks: does the model miss urgent cases of one
group more than of another?). A group with fewer scored rows than evaluate.group_min_rows is listed with its row
count and the reason, without metrics. No heavy imports.

One-vs-rest per label L over the rows whose reference is a label: false-positive rate = rows answered L whose
reference is not L / rows whose reference is not L; false-negative rate = rows with reference L answered otherwise
(another label or none) / rows with reference L. None where the denominator is 0.
"""

from __future__ import annotations

from collections import defaultdict

from hpc_finetune.evaluate.metrics import classification, classification_metrics, side, text_metrics
from hpc_finetune.io.cli import StageError

# the metric a group is ranked by to name the worst one, in order of preference, and whether higher is better
RANKING = (("accuracy", True), ("macro_f1", True), ("token_f1", True), ("answer_loss", False))


def group_values(rows: list[dict], field: str, path: str | None) -> list[str]:
    """Each row's group as text; a row without the field (or with an empty one) is an error naming file and row."""
    out = []
    for number, row in enumerate(rows, start=1):
        value = row.get(field)
        if value is None or value == "" or isinstance(value, dict | list):
            have = ", ".join(sorted(row)) or "no fields"
            raise StageError(f"{path} row {number}: evaluate.group_field {field!r} is missing or empty (the row has "
                             f"{have}); give every test row a group, or set evaluate.group_field to null (the data "
                             "stage keeps the test rows' other columns in test.jsonl, not the held-out rows')")
        out.append(str(value))
    return out


def members(groups: list[str]) -> dict[str, list[int]]:
    """{group: indices of its rows}, groups in sorted order."""
    found = defaultdict(list)
    for index, group in enumerate(groups):
        found[group].append(index)
    return dict(sorted(found.items()))


def error_rates(samples: list[dict], labels: list[str], models: tuple[str, ...]) -> dict:
    """{model: {label: {positives, negatives, false_negatives, false_positives, false_negative_rate,
    false_positive_rate}}} over the samples whose reference is a label."""
    scored = [s for s in samples if s.get("reference_label") is not None]
    out = {}
    for model in models:
        out[model] = {}
        for label in labels:
            positives = [s for s in scored if s["reference_label"] == label]
            negatives = [s for s in scored if s["reference_label"] != label]
            fn = sum(s[f"{model}_label"] != label for s in positives)
            fp = sum(s[f"{model}_label"] == label for s in negatives)
            out[model][label] = {
                "positives": len(positives), "negatives": len(negatives), "false_negatives": fn, "false_positives": fp,
                "false_negative_rate": round(fn / len(positives), 4) if positives else None,
                "false_positive_rate": round(fp / len(negatives), 4) if negatives else None,
            }
    return out


def group_metrics(field: str, min_rows: int, groups: list[str], samples: list[dict], losses: dict[str, dict],
                  labels: list[str] | None, models: tuple[str, ...]) -> dict:
    """The `groups` section of evaluate.json. losses: {model: {group: answer_loss() result}} for the groups with
    at least min_rows rows."""
    out = {"field": field, "min_rows": min_rows, "groups": {}, "worst": {}}
    by_index = {s["index"]: s for s in samples}
    for group, indices in members(groups).items():
        entry = {"rows": len(indices), "scored": len(indices) >= min_rows}
        if not entry["scored"]:
            entry["reason"] = f"{len(indices)} rows, fewer than evaluate.group_min_rows={min_rows}: not scored"
            out["groups"][group] = entry
            continue
        first = losses[models[0]][group]
        values = {name: side(lambda m, key=key, group=group: losses[m][group][key], first["rows"], models)
                  for name, key in (("answer_loss", "loss"), ("perplexity", "perplexity"))}
        chosen = [by_index[i] for i in indices if i in by_index]
        values |= text_metrics(chosen, models)
        if labels and chosen:
            values |= classification_metrics(classification(chosen, labels, models), models)
            entry["error_rates"] = error_rates(chosen, labels, models)
        entry["metrics"] = values
        out["groups"][group] = entry
    out["worst"] = {model: worst(out["groups"], model) for model in models}
    return out


def worst(groups: dict, model: str) -> dict | None:
    """{metric, group, value} of the scored group that does worst for `model` by the first RANKING metric they
    all have; None without a scored group."""
    scored = {name: g["metrics"] for name, g in groups.items() if g["scored"]}
    for metric, higher in RANKING:
        values = {name: m[metric][model] for name, m in scored.items() if m.get(metric, {}).get(model) is not None}
        if values and len(values) == len(scored):
            group = (min if higher else max)(values, key=lambda name: (values[name], name))
            return {"metric": metric, "group": group, "value": values[group]}
    return None
