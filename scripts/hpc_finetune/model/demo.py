"""The demo's tiny Llama-architecture model and its tokenizer, built from a dataset's text, offline and
deterministically (scripts/build_demo_model.py is the stage program).

A byte-level BPE tokenizer is trained on the text, with Llama-3-style special tokens and a Llama-3-style chat
template whose assistant turns sit in `{% generation %}...{% endgeneration %}` (for assistant-only loss). A
randomly initialised LlamaForCausalLM (seeded) is saved next to it as safetensors, with a generation config that
stops on `<|eot_id|>` and `<|end_of_text|>`. The weights are random: the model only knows what fine-tuning teaches
it. Three choices make a minute of CPU QLoRA enough to really learn the demo set (see the constants below): wide
random weights, gentle random attention, and decoder weights stored at values 4-bit quantisation reproduces, so
that the quantised base the adapter is trained on and the full-precision base it is merged into agree.

The output directory is built in a temporary sibling and renamed into place at the end: a crash never leaves a
half-written model behind. Two builds from the same text and seed are byte-identical.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from hpc_finetune.model.params import count_parameters

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"
PAD = "<|finetune_right_pad_id|>"
SPECIAL_TOKENS = [BOS, EOS, HEADER_START, HEADER_END, EOT, PAD]

# Llama-3 layout: <|begin_of_text|><|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|> per message. The
# assistant's content and its <|eot_id|> are inside the generation markers, so the model is trained to stop.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{%- else %}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

# Model size: ~0.56 M parameters, ~2.2 MB of float32 safetensors. Tuned so that QLoRA (r 16 on all linear layers)
# memorises the demo set's answers in a few hundred CPU steps; see the demo preset in workflow/presets/models.yaml.
VOCAB_SIZE = 1024
ARCH = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    # Wide random weights (0.02 is usual): a frozen random head with small weights caps the logits, and LoRA
    # cannot push the loss down.
    "initializer_range": 0.2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
# ... but the query and key projections are scaled down: at 0.2 the random attention is nearly one-hot on
# arbitrary positions, and LoRA spends its steps undoing it (train loss 0.13 instead of 0.04 after 400 steps).
QK_SCALE = 0.3
# bitsandbytes 4-bit settings of the train stage (nf4, double quant, blocksize 64). The decoder's linear weights
# are stored at values this quantisation reproduces (to ~5e-5), so the 4-bit base that QLoRA trains against and
# the full-precision base that the merge stage reloads are the same model. With plain random weights they differ
# by ~7 % per weight, enough to change greedy answers of the merged model.
NF4_BLOCKSIZE = 64


def build_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    bos_id = core.token_to_id(BOS)
    # Like Llama 3: plain tokenisation adds <|begin_of_text|>; the chat template adds it itself and is tokenised
    # without special tokens.
    core.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        model_max_length=ARCH["max_position_embeddings"],
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer, seed: int):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOT],
        pad_token_id=ids[PAD],
        **ARCH,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, module in model.model.layers.named_modules():
            if name.endswith(("q_proj", "k_proj")):
                module.weight.mul_(QK_SCALE)
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(nf4_round_trip(module.weight))
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=[ids[EOT], ids[EOS]], pad_token_id=ids[PAD], do_sample=False
    )
    return model


def nf4_round_trip(weight):
    """The weight as the train stage's 4-bit quantisation (nf4, double quant) stores and restores it."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(
        weight.contiguous(), blocksize=NF4_BLOCKSIZE, quant_type="nf4", compress_statistics=True
    )
    return bnbf.dequantize_4bit(packed, state).to(weight.dtype).reshape(weight.shape)


def build(texts: list[str], output: str | os.PathLike, seed: int, data_name: str) -> dict:
    """Train the tokenizer on `texts`, build the seeded model, and put both at `output` atomically. Returns the
    record written next to them (demo_model.json)."""
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        tokenizer = build_tokenizer(texts)
        model = build_model(tokenizer, seed)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        record = {"data": data_name, "seed": seed, "vocab_size": len(tokenizer),
                  "parameters": count_parameters(model)[1], **ARCH, "qk_scale": QK_SCALE,
                  "nf4_blocksize": NF4_BLOCKSIZE}
        (tmp / "demo_model.json").write_text(json.dumps(record, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        for path in tmp.iterdir():
            os.chmod(path, 0o644)
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / "model")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record
