"""Runs in the vLLM environment (.venv-vllm, `make vllm-env`), not ours: one process, the offline engine
(`vllm.LLM`) loaded once per model, greedy answers written as JSON for tests/test_vllm.py to compare.

    python vllm_engine.py SPEC.json OUT.json

SPEC: {"messages": [[chat messages], ...], "max_tokens": N, "merged": DIR, "base": DIR, "adapter": DIR,
"max_lora_rank": R, "verdicts": {"NAME": ADAPTER_DIR},
"token_prompts": {"NAME": {"model": DIR, "prompt_ids": [...], "max_tokens": K}}}; every
key but messages/max_tokens optional. Standard library and vLLM only: nothing of ours is installed there."""

import gc
import json
import sys
import time

ENGINE = {"dtype": "float32", "max_model_len": 512, "enforce_eager": True, "seed": 0}


def answers(llm, messages, max_tokens, **kwargs) -> list[str]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outputs = llm.chat(messages, params, use_tqdm=False, **kwargs)
    return [out.outputs[0].text.strip() for out in outputs]


def verdicts(adapters: dict) -> dict:
    """vLLM's own check of each adapter (what loading it runs first; a refusal in a running engine kills it), at
    the largest --max-lora-rank it takes: "served" or its error."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    found = {}
    for name, directory in adapters.items():
        try:
            PEFTHelper.from_local_dir(directory, max_position_embeddings=None).validate_legal(
                LoRAConfig(max_lora_rank=512))
            found[name] = "served"
        except Exception as err:  # noqa: BLE001 - whatever vLLM raises is its verdict, recorded as text
            found[name] = f"{type(err).__name__}: {err}"
    try:
        LoRAConfig(max_lora_rank=1024)
        found["max_lora_rank_1024"] = "accepted"
    except Exception as err:  # noqa: BLE001
        found["max_lora_rank_1024"] = f"{type(err).__name__}: {err}"
    return found


def main(spec_path: str, out_path: str) -> None:
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    spec = json.loads(open(spec_path).read())
    out = {"version": vllm.__version__, "load_s": {}}

    def load(name, **kwargs):
        started = time.time()
        llm = LLM(**ENGINE, **kwargs)
        out["load_s"][name] = round(time.time() - started, 1)
        return llm

    def close(llm):
        llm.llm_engine.engine_core.shutdown() if hasattr(llm.llm_engine, "engine_core") else None
        del llm
        gc.collect()

    out["verdicts"] = verdicts(spec.get("verdicts", {}))
    if spec.get("merged"):
        llm = load("merged", model=spec["merged"])
        out["merged"] = answers(llm, spec["messages"], spec["max_tokens"])
        close(llm)
    if spec.get("adapter"):
        llm = load("lora", model=spec["base"], enable_lora=True, max_lora_rank=spec["max_lora_rank"])
        out["lora"] = answers(llm, spec["messages"], spec["max_tokens"],
                              lora_request=LoRARequest("adapter", 1, spec["adapter"]))
        close(llm)
    for name, item in spec.get("token_prompts", {}).items():
        llm = load(name, model=item["model"])
        result = llm.generate([{"prompt_token_ids": item["prompt_ids"]}],
                              SamplingParams(temperature=0.0, max_tokens=item["max_tokens"], ignore_eos=True),
                              use_tqdm=False)
        out[name] = list(result[0].outputs[0].token_ids)
        close(llm)
    with open(out_path, "w") as fh:
        json.dump(out, fh)


if __name__ == "__main__":  # vLLM's workers start as fresh processes that import this file
    main(*sys.argv[1:3])
