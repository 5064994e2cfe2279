"""The model card (README.md) published with an adapter or a merged model: the Hub's metadata block (base_model and
its relation, library_name, license inherited from the base, datasets from the hub, tags, pipeline_tag) and a body
with the training settings, the data report's counts, the evaluate stage's base-vs-fine-tuned table and how to
serve the model with vLLM. Everything in it comes from the run's records, whose configuration is already redacted
(summary stage), and local paths are left out: nothing in it is secret.
"""

from __future__ import annotations

from pathlib import Path

from hpc_finetune.io.cli import plural
from hpc_finetune.merge.adapter import VLLM_DEFAULT_MAX_LORA_RANK, VLLM_MAX_LORA_RANKS, vllm_max_lora_rank


def base_license(model_dir: Path) -> str | None:
    """The license in the base model's own card, when it has one."""
    from huggingface_hub import ModelCard

    card = model_dir / "README.md"
    if not card.is_file():
        return None
    try:
        return ModelCard.load(card).data.to_dict().get("license")
    except Exception:  # a card without a metadata block, or one that does not parse: no license known
        return None


def hub_base(model: dict) -> str | None:
    """The base model's hub id (the model stage checked it), or None for a local or demo base."""
    return model.get("model_id") if model.get("source") == "hub" else None


def metadata(kind: str, model: dict, report: dict, license_: str | None):
    from huggingface_hub import ModelCardData

    base = hub_base(model)
    hub_data = (report.get("origin") or {}).get("repo_id")
    tags = ["hpc-finetune", "trl", "sft", "lora" if kind == "adapter" else "merged-lora"]
    if kind == "adapter":
        tags.insert(0, "peft")
        if base:
            tags.append(f"base_model:adapter:{base}")
    return ModelCardData(
        base_model=base,
        base_model_relation=("adapter" if kind == "adapter" else "finetune") if base else None,
        library_name="peft" if kind == "adapter" else "transformers",
        license=license_,
        datasets=[hub_data] if hub_data else None,
        tags=tags,
        pipeline_tag="text-generation",
    )


def settings_table(config: dict) -> list[tuple[str, object]]:
    keys = [("quantization", "training_quantization"), ("LoRA rank", "training_lora_r"),
            ("LoRA alpha", "training_lora_alpha"), ("LoRA dropout", "training_lora_dropout"),
            ("target modules", "training_target_modules"), ("learning rate", "training_learning_rate"),
            ("scheduler", "training_lr_scheduler"), ("optimizer", "training_optim"),
            ("epochs", "training_epochs"), ("max steps", "training_max_steps"),
            ("micro batch size", "training_micro_batch_size"),
            ("gradient accumulation", "training_gradient_accumulation"),
            ("max sequence length", "training_max_seq_length"),
            ("loss on the assistant's tokens only", "training_assistant_only_loss"), ("seed", "training_seed")]
    return [(name, config[key]) for name, key in keys if config.get(key) not in (None, "")]


def rows(pairs) -> str:
    return "\n".join(f"| {name} | {value} |" for name, value in pairs)


def evaluation(evaluate: dict | None) -> str:
    if not evaluate:
        return "The evaluate stage was off for this run."
    lines = ["| | base | fine-tuned |", "|---|---:|---:|"]
    for name, base, tuned in [("held-out loss", "base_eval_loss", "finetuned_eval_loss"),
                              ("held-out perplexity", "base_perplexity", "finetuned_perplexity"),
                              ("train loss", "base_train_loss", "finetuned_train_loss"),
                              ("greedy exact match, held-out", "base_eval_exact_match", "eval_exact_match"),
                              ("token F1, held-out", "base_eval_token_f1", "eval_token_f1")]:
        if evaluate.get(tuned) is not None:
            base_value = "" if evaluate.get(base) is None else f"{evaluate[base]:.4g}"
            lines.append(f"| {name} | {base_value} | {evaluate[tuned]:.4g} |")
    rows_used = evaluate.get("eval_loss_rows")
    return "\n".join(lines) + (f"\n\nHeld-out loss over {plural(rows_used, 'row')} the model was not trained on." if rows_used
                               else "")


def serving(kind: str, repo_id: str, base: str | None, rank) -> str:
    if kind == "merged":
        return (f"```bash\nvllm serve {repo_id}\n```\n\nor with transformers: "
                f"`AutoModelForCausalLM.from_pretrained(\"{repo_id}\")`.")
    base_ref = base or "<the base model>"
    needed = vllm_max_lora_rank(rank) if isinstance(rank, int) else None
    flag = f" --max-lora-rank {needed}" if needed and needed > VLLM_DEFAULT_MAX_LORA_RANK else ""
    note = "" if needed or not isinstance(rank, int) else \
        f"\n\nvLLM serves LoRA ranks up to {VLLM_MAX_LORA_RANKS[-1]}; this one is {rank}."
    name = repo_id.split("/")[-1]
    return (f"```bash\nvllm serve {base_ref} --enable-lora --lora-modules {name}={repo_id}{flag}\n```\n\n"
            f"then ask for `\"model\": \"{name}\"`; or with PEFT: "
            f"`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(\"{base_ref}\"), \"{repo_id}\")`.{note}")


def served_by(kind: str, check: dict | None) -> str:
    """What the run's serve_check stage proved for this artifact (the manifest's metrics.serve_check)."""
    item = ((check or {}).get("match_rate") or {}).get(kind)
    if not check or check.get("skipped") or item is None:
        return f"Not checked in vLLM by this run ({(check or {}).get('skipped') or 'no serve check'})."
    return (f"Served by vLLM {check['vllm_version']} in this run's check ({check['dtype']}): its greedy answers "
            f"matched the evaluate stage's for {item:.0%} of the test prompts.")


def model_card(kind: str, repo_id: str, manifest: dict, model: dict, report: dict, evaluate: dict | None,
               license_: str | None, pair: str | None = None) -> str:
    """README.md for `kind` (adapter or merged) published to `repo_id`; `pair` is the other repository of the
    run, when both are published."""
    from huggingface_hub import ModelCard

    config = manifest.get("config", {})
    base = hub_base(model)
    base_text = f"[{base}](https://huggingface.co/{base})" if base else f"a local model ({model.get('model_id')})"
    what = "A LoRA adapter" if kind == "adapter" else "A model merged from a LoRA adapter"
    also = f" The {'merged model' if kind == 'adapter' else 'adapter'} of the same run is `{pair}`." if pair else ""
    dropped = report.get("dropped", {})
    data = [("dataset", report.get("source")), ("format", report.get("format")),
            ("rows read", report.get("input_rows")), ("kept", report.get("kept")),
            ("dropped (empty, duplicate, too long)",
             f"{dropped.get('empty', 0)}, {dropped.get('duplicate', 0)}, {dropped.get('too_long', 0)}"),
            ("train rows", report.get("train_rows")), ("held-out rows", report.get("eval_rows"))]
    origin = report.get("origin") or {}
    if origin.get("kind") == "hub":
        data[0] = ("dataset", f"{origin['repo_id']} (revision {origin['revision']})")
        data.insert(1, ("dataset commit", origin["commit"]))
    elif origin:
        data[0] = ("dataset", origin.get("source"))
    commit = manifest.get("workflow_commit")
    body = f"""
# {repo_id.split('/')[-1]}

{what}, fine-tuned from {base_text} with supervised fine-tuning (TRL `SFTTrainer`, PEFT) by the
hpc-finetune workflow (Snakemake), run `{manifest.get('run_name')}`{f' at commit `{commit}`' if commit else ''}.{also}

## Training

| setting | value |
|---|---|
{rows(settings_table(config))}

## Data

| | |
|---|---|
{rows((k, v) for k, v in data if v is not None)}

## Evaluation

{evaluation(evaluate)}

## Serving

{serving(kind, repo_id, base, config.get('training_lora_r'))}

{served_by(kind, manifest.get('metrics', {}).get('serve_check'))}
"""
    return str(ModelCard(f"---\n{metadata(kind, model, report, license_).to_yaml()}\n---\n{body}"))
