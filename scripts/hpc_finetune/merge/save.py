"""Saving a merged model as servers load it: weights sharded at max_shard_size (safetensors, or PyTorch pickles
with the names transformers and vLLM read), the tokenizer files training used copied verbatim with the chat
template and generation config, and the finished directory put in place only once it is whole.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from hpc_finetune.io.cli import StageError
from hpc_finetune.io.files import current_umask


def save_weights(model: Any, directory: Path, fmt: str, max_shard_size: str) -> None:
    """Config, generation config and weights (sharded with an index above max_shard_size) in `fmt`."""
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    if fmt == "bin":
        safetensors_to_bin(directory)


def safetensors_to_bin(directory: Path) -> None:
    """Rewrite the safetensors weights that save_pretrained wrote (it writes nothing else in transformers 5) as
    PyTorch pickles with the names and index transformers and vLLM load: pytorch_model.bin, or
    pytorch_model-0000i-of-0000N.bin with pytorch_model.bin.index.json. One shard in memory at a time; tied and
    renamed weights stay exactly as save_pretrained resolved them."""
    import torch
    from safetensors.torch import load_file

    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        renamed = {}
        for shard in sorted(set(index["weight_map"].values())):
            target = "pytorch_model" + shard.removeprefix("model").removesuffix(".safetensors") + ".bin"
            torch.save(load_file(directory / shard), directory / target)
            (directory / shard).unlink()
            renamed[shard] = target
        index["weight_map"] = {k: renamed[v] for k, v in index["weight_map"].items()}
        (directory / "pytorch_model.bin.index.json").write_text(
            json.dumps(index, indent=2, sort_keys=True) + "\n"
        )
        index_path.unlink()
    else:
        torch.save(load_file(directory / "model.safetensors"), directory / "pytorch_model.bin")
        (directory / "model.safetensors").unlink()


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


def save_tokenizer(tokenizer: Any, directory: Path, adapter_dir: str, base_dir: str) -> None:
    """The tokenizer files training used, copied verbatim (no re-serialisation by this transformers version: what a
    server with another version loads is what the model stage fetched or the train stage wrote), the chat template
    (from the base when the adapter's tokenizer lacks it), and a generation config if the model had none. Then
    check that the copy loads as the same tokenizer."""
    from transformers import AutoTokenizer

    source = Path(adapter_dir) if (Path(adapter_dir) / "tokenizer_config.json").is_file() else Path(base_dir)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, directory / name)
    if getattr(tokenizer, "chat_template", None) and not has_chat_template(directory):
        (directory / "chat_template.jinja").write_text(tokenizer.chat_template)
    if (
        not (directory / "generation_config.json").is_file()
        and (Path(base_dir) / "generation_config.json").is_file()
    ):
        shutil.copy2(Path(base_dir) / "generation_config.json", directory / "generation_config.json")
    saved = AutoTokenizer.from_pretrained(directory)
    if saved.get_vocab() != tokenizer.get_vocab() or saved.chat_template != tokenizer.chat_template:
        raise StageError(
            f"the tokenizer copied from {source} does not load as the tokenizer used for the check"
        )


def has_chat_template(directory: Path) -> bool:
    if (directory / "chat_template.jinja").is_file():
        return True
    config = directory / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))


def install(tmp: Path, output: Path) -> None:
    """Put the finished `tmp` directory at `output`, replacing an earlier one only now that the new one is whole."""
    # Some writers create 0600 files; a model is read by servers running under other accounts.
    for path in tmp.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~current_umask())
    old = output.parent / f".{output.name}.old-{os.getpid()}"
    if output.exists():
        output.rename(old)
    tmp.rename(output)
    shutil.rmtree(old, ignore_errors=True)
