"""Loading models as the merge and evaluate stages need them: unquantised in a chosen dtype, on the GPUs when there
are any, with the adapter attached unmerged, and the tokenizer training used; plus giving memory back between two
models. Errors name the directory and the fix.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any

from hpc_finetune.io.cli import StageError
from hpc_finetune.io.files import read_json

DTYPES = ("auto", "bfloat16", "float16", "float32")


def resolve_dtype(name: str) -> Any:
    """torch dtype for a config name; auto: bfloat16 when CUDA is available, else float32."""
    import torch

    if name not in DTYPES:
        raise StageError(f"dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def load_model(path: str | os.PathLike, dtype: Any, what: str = "model") -> Any:
    """A causal LM in `dtype`, unquantised, on the GPUs when there are any (device_map auto), else on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise StageError(f"{what} directory {path} has no config.json; run the stage that produces it first")
    config = read_json(path / "config.json", f"{what} config")
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise StageError(
            f"{what} {path} is a pre-quantised checkpoint ({method}); merging and evaluation need the unquantised"
            " weights: point the model stage at the full-precision model"
        )
    device_map = "auto" if torch.cuda.is_available() else "cpu"
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map)
    except (OSError, ValueError, RuntimeError) as err:
        raise StageError(f"cannot load the {what} from {path}: {err}") from None
    model.eval()
    return model


def load_adapter(base: Any, adapter_dir: str | os.PathLike) -> Any:
    """base + LoRA adapter, unmerged (a PeftModel), in eval mode."""
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    except Exception as err:  # peft raises many types (ValueError, KeyError, SafetensorError, ...)
        raise StageError(f"cannot load the adapter from {adapter_dir} onto the base model: {err}") from None
    model.eval()
    return model


def load_tokenizer(preferred: str | os.PathLike, base_dir: str | os.PathLike) -> Any:
    """The tokenizer saved with the adapter/merged model (what training used), else the base model's; the chat
    template is taken from the base when the preferred one lacks it."""
    from transformers import AutoTokenizer

    source = Path(preferred) if (Path(preferred) / "tokenizer_config.json").is_file() else Path(base_dir)
    try:
        tok = AutoTokenizer.from_pretrained(source)
        if not getattr(tok, "chat_template", None) and source != Path(base_dir):
            tok.chat_template = getattr(AutoTokenizer.from_pretrained(base_dir), "chat_template", None)
    except (OSError, ValueError) as err:
        raise StageError(f"cannot load the tokenizer from {source}: {err}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def input_device(model: Any) -> Any:
    return model.get_input_embeddings().weight.device


def free() -> None:
    """Give memory back after the caller dropped its references (`del model`)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
