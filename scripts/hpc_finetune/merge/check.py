"""The merge stage's proof: the logits of the merged model reloaded from disk against those of base+adapter, on
rows rendered as training saw them, judged with a tolerance that knows what 16-bit rounding alone does.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

from hpc_finetune.data.rows import FALLBACK_TEXT, detect_format, encode, render
from hpc_finetune.io.files import iter_jsonl
from hpc_finetune.model.load import dtype_name, free, input_device, load_adapter, load_model

log = logging.getLogger("finetune.merge")

# Longest sequence used by the logit check: the logits of a 128k vocabulary cost 0.25 MB per token in bfloat16.
CHECK_MAX_TOKENS = 256


def default_tolerance(dtype: Any) -> float:
    import torch

    return 1e-3 if dtype == torch.float32 else 0.1


def check_rows(path: str, n: int) -> list[dict]:
    """The first `n` rows of eval.jsonl (none when there is no file), read up to there: the file may hold a million
    rows, and the data stage checked every row's shape."""
    if not Path(path).is_file():
        return []
    return list(itertools.islice(iter_jsonl(path), n))


def check_inputs(tokenizer: Any, rows: list[dict], n: int, source: str) -> list[list[int]]:
    """Token ids of the first `n` rows rendered as training saw them; a fixed text when there are no rows."""
    fmt = detect_format(rows, source)
    if not rows:
        return [tokenizer(FALLBACK_TEXT)["input_ids"]]
    out = []
    for row in rows[:n]:
        ids, _ = encode(tokenizer, render(row, tokenizer, fmt), fmt, max_length=CHECK_MAX_TOKENS)
        out.append(ids)
    return out


def logits_of(model: Any, inputs: list[list[int]]) -> list[Any]:
    """Logits of each input, one sequence at a time (no padding), kept on the CPU in the model's dtype."""
    import torch

    device = input_device(model)
    with torch.inference_mode():
        return [model(input_ids=torch.tensor([ids], device=device)).logits[0].cpu() for ids in inputs]


def max_abs_diff(a: list[Any], b: list[Any]) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b, strict=True))


def mean_abs_diff(a: list[Any], b: list[Any]) -> float:
    total = sum(float((x.float() - y.float()).abs().sum()) for x, y in zip(a, b, strict=True))
    return total / sum(x.numel() for x in a)


def exact_logits(base_dir: str, adapter_dir: str, dtype: Any, inputs: list[list[int]]) -> list[Any] | None:
    """For a 16-bit dtype: the logits of base+adapter in float32 (the exact function); None for float32."""
    import torch

    if dtype == torch.float32:
        return None
    model = load_adapter(load_model(base_dir, torch.float32, "base model"), adapter_dir)
    exact = logits_of(model, inputs)
    del model
    free()
    return exact


def reference_logits(model: Any, inputs: list[list[int]]) -> tuple[list[Any], float]:
    """Logits of base+adapter (unmerged PeftModel) and the adapter's largest effect on them."""
    with model.disable_adapter():
        base_logits = logits_of(model, inputs)
    reference = logits_of(model, inputs)
    return reference, max_abs_diff(base_logits, reference)


def judge(result: dict, reloaded: list[Any], tolerance: float) -> dict:
    """Does the reloaded merged model compute base+adapter?

    float32: the largest logit difference to base+adapter must be within the tolerance. 16-bit: either that, or the
    merged model may be at most twice as far (plus the tolerance) from the exact, float32 base+adapter as the
    unmerged 16-bit model is: 16-bit rounding alone can move logits by more than 0.1 (by ~0.4 for the demo model,
    before any merge), and merging rounds W + BA once more. Measured on the demo model, the ratio is 0.8-1.3; a
    merge that drops, doubles or re-quantises the adapter lands far outside unless the adapter's whole effect is
    below the rounding error (then a warning says that the check cannot see it)."""
    reference, exact = result["reference_logits"], result["exact_logits"]
    check = {
        "max_abs_logit_diff": max_abs_diff(reference, reloaded),
        "mean_abs_logit_diff": mean_abs_diff(reference, reloaded),
    }
    if result["merged_logits"] is not None:  # the streaming merge never has the merged model in memory
        check["roundtrip_max_abs_logit_diff"] = max_abs_diff(result["merged_logits"], reloaded)
    passed = check["max_abs_logit_diff"] <= tolerance  # False for NaN
    if exact is not None:
        check["dtype_error"] = max_abs_diff(reference, exact)
        check["merged_vs_float32"] = max_abs_diff(reloaded, exact)
        allowed = 2 * check["dtype_error"] + tolerance
        passed = passed or check["merged_vs_float32"] <= allowed
        if result["adapter_effect"] <= allowed:
            log.warning(
                "the adapter changes the logits by at most %.3g, within the %.3g that %s rounding allows: the logit"
                " check cannot tell a merged adapter from a missing one (float32 can: --dtype float32)",
                result["adapter_effect"],
                allowed,
                "16-bit",
            )
    check["passed"] = passed
    return check


def describe(check: dict, tolerance: float, dtype: Any) -> str:
    text = f"largest logit difference {check['max_abs_logit_diff']:.3g}, tolerance {tolerance:g} ({dtype_name(dtype)})"
    if "dtype_error" in check:
        text += (
            f"; vs float32 base+adapter: merged {check['merged_vs_float32']:.3g},"
            f" unmerged {check['dtype_error']:.3g}"
        )
    if "roundtrip_max_abs_logit_diff" in check:
        text += f"; save/reload difference {check['roundtrip_max_abs_logit_diff']:.3g}"
    return text
