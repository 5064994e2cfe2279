"""Constants and data helpers shared by the tests: where things are, LoRA adapters as the train stage saves them,
rows and datasets written in every form the data stage reads."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
DEMO_DATA = REPO / "data" / "demo" / "medical_qa.jsonl"
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile")]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEMO_SECRET = "hf_e2eTestTokenNeverWrittenAnywhere0123"  # in the environment of the demo run; no file may hold it


def make_adapter(base_dir: Path, out: Path, seed: int = 0, scale: float = 0.05, **lora: object) -> Path:
    """A LoRA adapter as the train stage saves it (adapter files + tokenizer), with seeded non-zero lora_B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM", **lora
    )
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    peft_model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return out


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_input(kind: str, path: Path, rows: list[dict]) -> Path:
    """The rows as a dataset of one kind the data stage reads, in directory `path`; returns dataset.path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if kind == "json_array":
        (path := path / "data.json").write_text(json.dumps(rows, indent=2))
    elif kind == "json_lines":
        path = write_rows(path / "data.json", rows)
    elif kind == "jsonl":
        path = write_rows(path / "data.jsonl", rows)
    elif kind == "csv":
        with open(path := path / "data.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path := path / "data.parquet")
    elif kind in ("arrow_file", "arrow_stream"):
        table = pa.Table.from_pylist(rows)
        new = pa.ipc.new_file if kind == "arrow_file" else pa.ipc.new_stream
        with pa.OSFile(str(path := path / "data.arrow"), "wb") as sink, new(sink, table.schema) as writer:
            writer.write_table(table)
    else:
        import datasets

        ds = datasets.Dataset.from_list(rows)
        if kind == "dataset_dict":
            ds = datasets.DatasetDict(train=ds.select(range(2)), test=ds)
        ds.save_to_disk(str(path := path / "saved"))
    return path


def demo_rows(start: int, stop: int) -> list[dict]:
    lines = DEMO_DATA.read_text().splitlines()[start:stop]
    return [json.loads(line) for line in lines]


def adapter_inputs(root: Path, base: Path, eval_rows: tuple[int, int], train_rows: tuple[int, int] | None = None) -> dict:
    """What the merge and evaluate stages take, written under `root`: the base's model record, an adapter with
    non-zero LoRA weights, and demo chat rows (eval, and train when asked)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.json").write_text(json.dumps({"path": str(base)}))
    work = {"root": root, "base": base, "model_json": str(root / "model.json"),
            "adapter": make_adapter(base, root / "adapter"), "eval": write_rows(root / "eval.jsonl", demo_rows(*eval_rows))}
    if train_rows:
        work["train"] = write_rows(root / "train.jsonl", demo_rows(*train_rows))
    return work
