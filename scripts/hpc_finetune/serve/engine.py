"""Runs in vLLM's environment (its interpreter, or an image), not ours: one process, the offline engine
(`vllm.LLM`) loaded once per job, greedy answers (temperature 0) written as JSON. runner.py starts it.

    python engine.py SPEC.json OUT.json

SPEC: {"engine": {LLM keyword arguments: dtype, max_model_len, enforce_eager, ...},
       "jobs": [{"name": N, "model": DIR, "adapter": DIR, "max_lora_rank": R, "max_tokens": K, "ignore_eos": false,
                 "messages": [[chat messages], ...] | "prompts": [text, ...] | "prompt_ids": [[ids], ...]}, ...],
       "verdicts": {"NAME": ADAPTER_DIR}}; every key but jobs optional.
OUT: {"version": V, "verdicts": {NAME: "served" | error}, "jobs": {N: {"load_s", "generate_s", "texts",
"token_ids", "output_tokens"} | {"error": "Type: message", "stage": "load" | "generate"}}}, rewritten after each job.
Standard library and vLLM only: nothing of ours is installed there. An adapter is checked with vLLM's own verdict
(what loading it runs first) before the base is loaded: a refusal costs no engine start."""

import gc
import json
import os
import sys
import time


def verdict(directory: str, max_lora_rank: int = 512) -> str:
    """vLLM's own check of an adapter (PEFTHelper.validate_legal): "served" or its error."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    try:
        PEFTHelper.from_local_dir(directory, max_position_embeddings=None).validate_legal(
            LoRAConfig(max_lora_rank=max_lora_rank))
        return "served"
    except Exception as err:  # noqa: BLE001 - whatever vLLM raises is its verdict, recorded as text
        return f"{type(err).__name__}: {err}"


def verdicts(adapters: dict) -> dict:
    """Each adapter's verdict at the largest --max-lora-rank vLLM takes, and whether it takes 1024."""
    from vllm.config.lora import LoRAConfig

    found = {name: verdict(directory) for name, directory in adapters.items()}
    try:
        LoRAConfig(max_lora_rank=1024)
        found["max_lora_rank_1024"] = "accepted"
    except Exception as err:  # noqa: BLE001
        found["max_lora_rank_1024"] = f"{type(err).__name__}: {err}"
    return found


def generate(llm, job: dict):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=job.get("ignore_eos", False))
    lora = {"lora_request": LoRARequest("adapter", 1, job["adapter"])} if job.get("adapter") else {}
    if "messages" in job:
        return llm.chat(job["messages"], params, use_tqdm=False, **lora)
    prompts = job.get("prompts") or [{"prompt_token_ids": ids} for ids in job["prompt_ids"]]
    return llm.generate(prompts, params, use_tqdm=False, **lora)


def run_job(engine: dict, job: dict) -> dict:
    from vllm import LLM

    if job.get("adapter"):
        refused = verdict(job["adapter"], job.get("max_lora_rank", 512))
        if refused != "served":
            return {"error": refused, "stage": "load"}
    lora = {"enable_lora": True, "max_lora_rank": job.get("max_lora_rank", 16)} if job.get("adapter") else {}
    started = time.time()
    try:
        llm = LLM(model=job["model"], **engine, **lora)
    except Exception as err:  # noqa: BLE001 - vLLM's own error is the result
        return {"error": f"{type(err).__name__}: {err}", "stage": "load"}
    result = {"load_s": round(time.time() - started, 2)}
    started = time.time()
    try:
        outputs = generate(llm, job)
        result |= {"generate_s": round(time.time() - started, 3),
                   "texts": [out.outputs[0].text for out in outputs],
                   "token_ids": [list(out.outputs[0].token_ids) for out in outputs]}
        result["output_tokens"] = sum(len(ids) for ids in result["token_ids"])
    except Exception as err:  # noqa: BLE001
        result |= {"error": f"{type(err).__name__}: {err}", "stage": "generate"}
    if hasattr(llm.llm_engine, "engine_core"):
        llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return result


def main(spec_path: str, out_path: str) -> None:
    import vllm

    with open(spec_path) as fh:
        spec = json.load(fh)
    engine = {"seed": 0, **spec.get("engine", {})}
    out = {"version": vllm.__version__, "verdicts": verdicts(spec.get("verdicts", {})), "jobs": {}}

    def save():
        with open(out_path + ".part", "w") as fh:
            json.dump(out, fh)
        os.replace(out_path + ".part", out_path)

    save()
    for job in spec.get("jobs", []):
        print(f"[engine] {job['name']}: {job['model']}" + (f" + adapter {job['adapter']}" if job.get("adapter") else ""),
              flush=True)
        out["jobs"][job["name"]] = run_job(engine, job)
        save()


if __name__ == "__main__":  # vLLM's workers start as fresh processes that import this file
    main(*sys.argv[1:3])
