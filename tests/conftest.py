"""Shared fixtures. Heavy artifacts (the tiny model, a trained adapter, the demo run) are built once per session
and shared by the tests that inspect them: every process that imports trl/peft pays ~8 s."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
DEMO_DATA = REPO / "data" / "demo" / "medical_qa.jsonl"
sys.path.insert(0, str(SCRIPTS))
sys.path.insert(0, str(REPO / "workflow"))

# No test may reach the network: every hub client stays offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The demo's tiny Llama model and tokenizer, built from the shipped dataset (as the model stage does)."""
    import build_demo_model

    out = tmp_path_factory.mktemp("tiny-model") / "model"
    build_demo_model.main(build_demo_model.Config(data=str(DEMO_DATA), output=str(out)))
    return out


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The tiny model's matrices are far too small to gain from threads; on 2 shared cores a second thread
    made training many times slower."""
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)
