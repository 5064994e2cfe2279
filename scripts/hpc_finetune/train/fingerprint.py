"""The train stage's fingerprint: a short hash of everything that decides what training computes (the settings,
the data, the base model, the device, and the training code itself: the train program's import closure), which
names the checkpoint directory. A re-run with the same fingerprint resumes, or takes a finished run's adapter; any
change starts fresh, and the log says what changed. Each checkpoint directory keeps its parts in
fingerprint.json.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from hpc_finetune import code
from hpc_finetune.io.files import sha256_file, write_json

RECORD = "fingerprint.json"


def parts(settings: dict, train_data: str, eval_data: str, model_record: dict, device: str, bf16: bool,
          world_size: int, program: str | Path) -> dict[str, Any]:
    """What the fingerprint covers, each part short enough to compare and show."""
    return {
        "settings": settings,
        "train_data_sha256": sha256_file(train_data),
        "eval_data_sha256": sha256_file(eval_data),
        "model": model_record,
        "device": device,
        "bf16": bf16,
        "world_size": world_size,
        "code_sha256": code.digest(program),
        "code_files": {str(p.relative_to(code.SOURCE_ROOT)): hashlib.sha256(p.read_bytes()).hexdigest()[:16]
                       for p in code.closure(program)},
    }


def fingerprint(covered: dict) -> str:
    payload = {k: v for k, v in covered.items() if k != "code_files"}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def remember(run_dir: Path, covered: dict) -> None:
    write_json(run_dir / RECORD, covered)


def why_fresh(checkpoint_root: Path, covered: dict, current: str) -> str | None:
    """What differs from the most recent other run under checkpoint_root, for the log of a run that starts fresh;
    None when there is no other run to compare with."""
    records = sorted((p for p in checkpoint_root.glob(f"*/{RECORD}") if p.parent.name != current),
                     key=lambda p: p.stat().st_mtime)
    if not records:
        return None
    try:
        before = json.loads(records[-1].read_text())
    except (OSError, ValueError):
        return None
    changed = []
    for key, value in covered.items():
        if key == "code_files" or before.get(key) == value:
            continue
        if key == "settings":
            old = before.get(key) or {}
            changed += [f"training.{k} {old.get(k)!r} -> {v!r}" for k, v in value.items() if old.get(k) != v]
        elif key == "code_sha256":
            old, new = before.get("code_files") or {}, covered["code_files"]
            files = sorted(f for f in old.keys() | new.keys() if old.get(f) != new.get(f))
            changed.append(f"the training code ({', '.join(files[:4]) or 'its files'}"
                           f"{f' and {len(files) - 4} more' if len(files) > 4 else ''})")
        else:
            changed.append(key.removesuffix("_sha256").replace("_", " "))
    where = records[-1].parent
    return f"{', '.join(changed) or 'something'} changed since the checkpoints in {where}"
