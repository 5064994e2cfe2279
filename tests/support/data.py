"""What the data stage's tests share: rows in every format, and one in-process run of the stage whose failures
must write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import prepare_data
import pytest
from hpc_finetune.io.cli import StageError
from hpc_finetune.io.files import read_jsonl

QA = [(f"What helps with symptom {i}?", f"Rest and fluids help with symptom {i}.") for i in range(12)]
PC_ROWS = [{"prompt": q, "completion": a} for q, a in QA]
BOS = "<|begin_of_text|>"


def chat(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


class Run:
    """One in-process run of the stage; outputs in `out`."""

    FILES = {"train": "train.jsonl", "eval": "eval.jsonl", "report": "report.json", "test": "test.jsonl"}

    def __init__(self, model_json: Path, out: Path):
        self.model_json, self.out = model_json, out

    def config(self, data, **options) -> prepare_data.Config:
        out = {f"{name}_out": str(self.out / file) for name, file in self.FILES.items()}
        options = {"max_seq_length": 256, **options}
        return prepare_data.Config(path=str(data), model_json=str(self.model_json), **out, **options)

    def __call__(self, data, **options) -> dict:
        report = prepare_data.main(self.config(data, **options))
        assert report == json.loads((self.out / "report.json").read_text())
        self.train, self.eval = read_jsonl(self.out / "train.jsonl"), read_jsonl(self.out / "eval.jsonl")
        self.test = read_jsonl(self.out / "test.jsonl")
        return report

    def rows(self) -> list[dict]:
        return self.train + self.eval

    def fails(self, data, *fragments: str, **options) -> str:
        """The run raises a StageError containing every fragment, and writes nothing."""
        with pytest.raises(StageError) as info:
            prepare_data.main(self.config(data, **options))
        message = str(info.value)
        for fragment in fragments:
            assert fragment in message, message
        assert not any(self.out.glob("*")), "a failing run must not write outputs"
        return message


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
