"""Build the demo's tiny Llama-architecture model and its tokenizer from a dataset, offline and deterministically.

    python scripts/build_demo_model.py --data data/demo/medical_qa.jsonl --output results/demo/model/demo \
        [--format auto --text-field text --split train --eval-split auto --config-name null --seed 0]

The dataset is any the data stage reads (hpc_finetune.data.source: files, save_to_disk and repository
directories, hub names), read the same way; the tokenizer is trained on its text (hpc_finetune.model.demo says
how the model is made to learn in a minute of CPU QLoRA). The output is built in a temporary sibling and renamed
into place: a crash never leaves a half-written model behind. Two builds from the same data and seed are
byte-identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hpc_finetune.data.source import dataset_texts
from hpc_finetune.io.cli import cli, log, table
from hpc_finetune.io.schema import option
from hpc_finetune.model.demo import build


@dataclass
class Config:
    data: str = option("dataset.path")
    output: str = field(default="results/demo/model/demo", metadata={"help": "directory to write the model to"})
    format: str = option("dataset.format")
    text_field: str = option("dataset.text_field")
    split: str = option("dataset.split")
    eval_split: str = option("dataset.eval_split")
    config_name: str | None = option("dataset.config_name")
    seed: int = field(default=0, metadata={"help": "seed of the random weight initialisation"})


def main(cfg: Config) -> dict:
    corpus = dataset_texts(cfg.data, cfg.format, cfg.text_field, cfg.split, cfg.eval_split, cfg.config_name)
    record = build(corpus, cfg.output, cfg.seed, Path(cfg.data).name)
    out = Path(cfg.output)
    log.info("\n%s", table([
        ("output", str(out)),
        ("texts", len(corpus)),
        ("vocab", record["vocab_size"]),
        ("parameters", f"{record['parameters']:,}"),
        ("files", ", ".join(sorted(p.name for p in out.iterdir()))),
    ], title="demo model"))
    return record


if __name__ == "__main__":
    cli(main, Config, __doc__)
