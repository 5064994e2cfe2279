"""Scoring for the evaluate stage: the answer-only loss (token-weighted mean NLL, batched by padded size), greedy
generation (left padding, stopping at every end-of-answer token: the EOS tokens and the chat template's end of
turn), exact match, SQuAD-style token F1 and ROUGE-L.

ROUGE-L is the F-measure (beta 1) of the longest common subsequence of the generated and the reference words,
on the same word tokens as token F1 (lower case, punctuation removed; no stemming): precision LCS/len(generated),
recall LCS/len(reference). Written here rather than taken from `rouge-score` so that the two word metrics
tokenise alike (rouge-score drops non-ASCII letters with its default tokenizer).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Any

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


def rouge_l(generated: str, reference: str) -> float:
    """ROUGE-L F-measure on word tokens (module docstring)."""
    pred, ref = words(generated), words(reference)
    if not pred or not ref:
        return float(pred == ref)
    previous = [0] * (len(ref) + 1)
    for token in pred:  # LCS by dynamic programming, one row at a time
        current = [0]
        for j, other in enumerate(ref, start=1):
            current.append(previous[j - 1] + 1 if token == other else max(previous[j], current[j - 1]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact(generated: str, reference: str) -> float:
    """1.0 when the answer is the reference, ignoring surrounding white space only."""
    return float(generated.strip() == reference.strip())


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


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The special token the chat template closes an assistant turn with (e.g. Llama 3's <|eot_id|>), or None."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "Zq7"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template with rules of its own (e.g. a required system turn)
        return None
    after = text[text.rfind(marker) + len(marker):] if marker in text else ""
    special = set(tokenizer.all_special_ids)
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    return next((i for i in ids if i in special), None)


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token that ends an answer: the generation config's EOS tokens, the tokenizer's, and the chat
    template's end of turn."""
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured] if configured is not None else []
    ids += [i for i in (tokenizer.eos_token_id, end_of_turn_id(tokenizer)) if i is not None]
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
