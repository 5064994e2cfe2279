"""vLLM as the evaluate stage's generator (evaluate.engine vllm): both models' greedy answers from one vLLM process
(the base, then the merged model or the base with the adapter), from the same prompt token ids the transformers
path uses, decoded by our tokenizer as it decodes them: the scores are the transformers engine's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpc_finetune.io.cli import StageError, log
from hpc_finetune.serve.check import ADAPTER_FIX, MODEL_FIX, adapter_rank, model_len
from hpc_finetune.serve.runner import run_engine


def vllm_answers(command: str, base_dir: str, finetuned: str, merged: bool, prompts: list[list[int]],
                 tokenizer: Any, max_new_tokens: int, max_length: int, engine: dict, workdir: Path,
                 wanted: tuple[str, ...] = ("base", "finetuned")) -> dict:
    """{"base": [...], "finetuned": [...], "timing": {...}}: greedy answers to `prompts` (each cut to its last
    max_length - max_new_tokens tokens as transformers' path cuts them; max_length no longer than the model's
    positions), of the models named in `wanted` (the evaluate stage's --part)."""
    length = model_len(base_dir, max_length)
    keep = max(length - max_new_tokens, 1)
    ask = {"prompt_ids": [p[-keep:] for p in prompts], "max_tokens": max_new_tokens}
    tuned = ({"model": finetuned} if merged or not finetuned else
             {"model": base_dir, "adapter": finetuned, "max_lora_rank": adapter_rank(finetuned)})
    jobs = [{"name": "base", "model": base_dir, **ask}, *([{"name": "finetuned", **tuned, **ask}] if finetuned else [])]
    jobs = [job for job in jobs if job["name"] in wanted]
    result = run_engine(command, {"engine": {"max_model_len": length, **engine}, "jobs": jobs}, workdir)
    answers: dict = {"version": result["version"], "timing": {}}
    for name, job in result["jobs"].items():
        if "error" in job:
            fix = ADAPTER_FIX if name == "finetuned" and not merged else MODEL_FIX
            raise StageError(f"vLLM refused the {name} model ({job['stage']}): {job['error']}\nFix: {fix}, or "
                             "evaluate.engine transformers")
        answers[name] = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in job["token_ids"]]
        answers["timing"][name] = {k: job[k] for k in ("load_s", "generate_s", "output_tokens")}
        log.info("vLLM %s: %s model, %d answers in %.1f s (loaded in %.1f s)", result["version"], name,
                 len(prompts), job["generate_s"], job["load_s"])
    return answers


def engine(cfg: Any) -> str:
    """The evaluate stage's generator: vllm (--engine vllm, or auto with a vLLM command) or transformers."""
    if cfg.engine == "vllm" and not cfg.vllm:
        raise StageError("--engine vllm needs --vllm (vLLM's interpreter: serve_check.python or serve_check.image)")
    return "vllm" if cfg.engine in ("vllm", "auto") and cfg.vllm else "transformers"


def generation_record(name: str | None, fast: dict, generation_s: dict) -> dict:
    """metrics['generation']: the engine, and per model the answers' time (vLLM: its load and answer times)."""
    if name == "vllm":
        return {"engine": "vllm", "vllm_version": fast["version"], "models": fast["timing"]}
    return {"engine": name, "models": {n.replace("-", ""): {"generate_s": s} for n, s in generation_s.items()}}
