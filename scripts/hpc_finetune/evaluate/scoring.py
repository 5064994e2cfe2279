"""Scoring for the evaluate stage: the answer-only loss (token-weighted mean NLL, batched by padded size), greedy
generation (left padding, stopping at every end-of-answer token), exact match and SQuAD-style token F1.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Any

from hpc_finetune.data.rows import Rendered
from hpc_finetune.model.load import input_device

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def words(text: str) -> list[str]:
    """Lower-cased words without punctuation: the tokens of the token-level F1 (as in SQuAD)."""
    return _PUNCT.sub(" ", text.lower()).split()


def token_f1(generated: str, reference: str) -> float:
    pred, ref = words(generated), words(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


# --- model passes ----------------------------------------------------------------------------------------------


def answer_loss(model: Any, encoded: list[tuple[list[int], int]], pad_id: int, max_batch_tokens: int) -> dict:
    """Mean negative log-likelihood per answer token over all rows (token-weighted), batched by padded size."""
    import torch
    import torch.nn.functional as F

    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    batches, current = [], []
    for i in order:
        longest = len(encoded[current[0]][0]) if current else len(encoded[i][0])
        if current and longest * (len(current) + 1) > max_batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)

    device = input_device(model)
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in batches:
            width = max(len(encoded[i][0]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for row, i in enumerate(batch):
                tokens, prompt_len = encoded[i]
                ids[row, : len(tokens)] = torch.tensor(tokens)
                mask[row, : len(tokens)] = 1
                start = max(prompt_len, 1)  # the first token is never predicted
                labels[row, start : len(tokens)] = torch.tensor(tokens[start:], dtype=torch.long)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            target = labels[:, 1:].to(logits.device)
            nll = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
            )
            total += float(nll)
            count += int((target != -100).sum())
            del logits
    mean = total / count if count else None
    return {
        "loss": mean,
        "perplexity": math.exp(mean) if mean is not None and mean < 700 else None,
        "tokens": count,
        "rows": len(encoded),
    }


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token that ends an answer: the generation config's EOS tokens and the tokenizer's."""
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured] if configured is not None else []
    if tokenizer.eos_token_id is not None:
        ids = [*ids, tokenizer.eos_token_id]
    return sorted(set(ids))


def generate(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, max_length: int,
             batch_size: int) -> list[str]:
    """Greedy answers (deterministic), batched with left padding."""
    import torch
    from transformers import GenerationConfig

    gen_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    keep = max(max_length - max_new_tokens, 1)
    device = input_device(model)
    answers = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            batch = [p[-keep:] for p in prompts[start : start + batch_size]]
            width = max(len(p) for p in batch)
            ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, tokens in enumerate(batch):
                ids[row, width - len(tokens) :] = torch.tensor(tokens)
                mask[row, width - len(tokens) :] = 1
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_config
            )
            for row in out[:, width:].tolist():
                answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers


def sample_record(split: str, index: int, rendered: Rendered, generated: str) -> dict:
    reference = rendered.reference or ""
    return {
        "split": split,
        "index": index,
        "prompt": rendered.prompt,
        "reference": reference,
        "generated": generated,
        "exact": float(generated.strip() == reference.strip()),
        "f1": round(token_f1(generated, reference), 4),
    }
