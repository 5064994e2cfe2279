"""What the serve_check stage asks vLLM and how it judges the answers: the evaluate stage's scored prompts (chat
messages as a user sends them, or the prompt text), the jobs (merged model; base + adapter), the match rate against
evaluate's fine-tuned answers, and the errors with their fix."""

from __future__ import annotations

import json
from pathlib import Path

from hpc_finetune.io.cli import StageError
from hpc_finetune.io.files import iter_jsonl
from hpc_finetune.merge.adapter import VLLM_MAX_LORA_RANKS, vllm_max_lora_rank

ADAPTER_FIX = ("train a plain LoRA adapter vLLM serves (no DoRA, no modules_to_save, training.lora_r <= 512), or "
               "publish the merged model only (hub_upload.publish: [merged]; upload.include without adapters)")
MODEL_FIX = ("the vLLM version must support the model's architecture and config (README, Serving: rope scaling, "
             "chat template); try serve_check.dtype float32 or a larger serve_check.max_model_len, another vLLM "
             "(serve_check.python / serve_check.image), or serve_check.enabled off to skip the check")


def test_prompts(samples_path: str | Path, data_dir: str | Path, limit: int | None) -> tuple[dict, list[str]]:
    """The first `limit` prompts the evaluate stage answered, as a job's prompt keys ({"messages": [...]} or
    {"prompts": [...]}), and its fine-tuned answers to them. The samples are the first rows of the scored split."""
    samples = list(iter_jsonl(samples_path))[:limit]
    if not samples:
        return {}, []
    split = samples[0]["split"]
    rows_path = Path(data_dir) / f"{split}.jsonl"
    if not rows_path.is_file():
        raise StageError(f"{rows_path} is missing: the evaluate stage's samples were scored on it; run the data stage")
    rows = [row for _, row in zip(samples, iter_jsonl(rows_path), strict=False)]
    if len(rows) < len(samples):
        raise StageError(f"{rows_path} has {len(rows)} rows, fewer than the {len(samples)} samples of {samples_path}: "
                         "the data changed after the evaluate stage ran; re-run it")
    expected = [s["finetuned_answer"] for s in samples]
    if "messages" in rows[0]:
        messages = [[m for m in row["messages"][:-1]] for row in rows]
        asked = [next((m["content"] for m in reversed(m_) if m["role"] == "user"), "") for m_ in messages]
        if asked != [s["question"] for s in samples]:
            raise StageError(f"the questions of {samples_path} are not the first rows of {rows_path}: the data changed "
                             "after the evaluate stage ran; re-run it")
        return {"messages": messages}, expected
    return {"prompts": [str(row["prompt"]) for row in rows]}, expected


def match(expected: list[str], answers: list[str]) -> dict:
    """How many of vLLM's answers equal evaluate's (both stripped), and the first differing ones."""
    pairs = list(zip(expected, [a.strip() for a in answers], strict=True))
    same = sum(e == a for e, a in pairs)
    return {"prompts": len(pairs), "matched": same, "match_rate": same / len(pairs) if pairs else None,
            "first_differences": [{"row": n, "evaluate": e, "vllm": a}
                                  for n, (e, a) in enumerate(pairs, start=1) if e != a][:3]}


def adapter_rank(adapter: str | Path) -> int:
    """The --max-lora-rank vLLM needs for the adapter (the largest it takes when the rank is above it: vLLM's own
    check then refuses the adapter, in its words)."""
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    rank = max([int(config.get("r", 8)), *map(int, (config.get("rank_pattern") or {}).values())])
    return vllm_max_lora_rank(rank) or VLLM_MAX_LORA_RANKS[-1]


def failure(name: str, what: str, result: dict, tolerance: float) -> str | None:
    """The error of one job, with the fix; None when it passed."""
    if "error" in result:
        fix = ADAPTER_FIX if name == "adapter" else MODEL_FIX
        return f"vLLM refused {what} ({result['stage']}): {result['error']}\nFix: {fix}"
    rate = result["match"]["match_rate"]
    if rate is not None and rate < tolerance:
        diff = result["match"]["first_differences"][0]
        return (f"vLLM answered {result['match']['matched']} of {result['match']['prompts']} prompts with {what} as "
                f"the evaluate stage did (match rate {rate:.3f} < serve_check.tolerance {tolerance}); first difference, "
                f"row {diff['row']}: evaluate {diff['evaluate']!r}, vLLM {diff['vllm']!r}.\nFix: bfloat16 kernels differ "
                "between engines and change a few greedy answers: use serve_check.dtype float32 or lower "
                "serve_check.tolerance; many differences mean vLLM reads the model differently (rope scaling, chat "
                "template, generation_config: README, Serving)")
    return None


def model_len(model: str | Path, wanted: int) -> int:
    """vLLM's max_model_len: `wanted`, but no longer than the model's positions (vLLM refuses a longer one)."""
    config = json.loads((Path(model) / "config.json").read_text())
    return min(wanted, config.get("max_position_embeddings") or wanted)
