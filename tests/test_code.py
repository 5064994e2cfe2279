"""A program's import closure (hpc_finetune.code): the rule inputs and the training fingerprint follow it."""

from __future__ import annotations

from pathlib import Path

from hpc_finetune import code
from support.common import SCRIPTS


def package(root: Path) -> Path:
    """A program and a small hpc_finetune package: a imports b inside a function, c is imported by nobody."""
    pkg = root / "hpc_finetune"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import json\n\ndef f():\n    from hpc_finetune.sub import b\n    return b\n")
    (pkg / "sub" / "b.py").write_text("X = 1\nRUNS = Path(__file__).with_name('tool.py')\n")
    (pkg / "sub" / "tool.py").write_text("print('run in a subprocess, never imported')\n")
    (pkg / "c.py").write_text("Y = 2\n")
    (root / "prog.py").write_text("import os\nfrom hpc_finetune import a\n")
    return root / "prog.py"


def test_the_closure_follows_imports_inside_functions_and_packages(tmp_path):
    program = package(tmp_path)
    names = [str(p.relative_to(tmp_path)) for p in code.closure(program, root=tmp_path)]
    assert names == ["prog.py", "hpc_finetune/__init__.py", "hpc_finetune/a.py", "hpc_finetune/sub/__init__.py",
                     "hpc_finetune/sub/b.py", "hpc_finetune/sub/tool.py"]


def test_the_digest_changes_with_any_file_of_the_closure_only(tmp_path):
    program = package(tmp_path)
    before = code.digest(program, root=tmp_path)
    (tmp_path / "hpc_finetune" / "c.py").write_text("Y = 3\n")  # not imported: no change
    assert code.digest(program, root=tmp_path) == before
    (tmp_path / "hpc_finetune" / "sub" / "b.py").write_text("X = 2\n")
    assert code.digest(program, root=tmp_path) != before


def test_each_stage_depends_on_its_own_library_modules():
    def modules(*programs: str) -> set[str]:
        closure = code.closure(*(SCRIPTS / f"{p}.py" for p in programs))
        return {str(p.relative_to(SCRIPTS)) for p in closure}

    train, merge, evaluate = modules("train"), modules("merge"), modules("evaluate")
    assert "hpc_finetune/train/speed.py" in train and "hpc_finetune/train/quantized.py" in train
    assert not any(m.startswith("hpc_finetune/train/") for m in merge | evaluate)
    assert "hpc_finetune/merge/save.py" in merge and "hpc_finetune/merge/save.py" not in evaluate | train
    every = ("build_demo_model", "prepare_model", "prepare_data", "preflight", "train", "merge", "evaluate",
             "summary", "upload", "container")
    assert all("hpc_finetune/io/cli.py" in modules(p) for p in every)
    # vLLM's engine driver is run, not imported: still code of the stages that start it
    assert "hpc_finetune/serve/engine.py" in modules("evaluate") & modules("serve_check")
