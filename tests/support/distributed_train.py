"""The train stage in several processes on the CPU, as the launcher starts it (torchrun, gloo): this file is the
program each rank runs, and `torchrun_train` starts it. Rank 0 writes the metrics (the stage's own) and the
optimizer steps this session took; SIGUSR1 to every rank after `--stop-at` stands in for Slurm's warning."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from support.common import DEMO_DATA, REPO


def torchrun_train(base: Path, out: Path, processes: int, timeout: int = 300,
                   **overrides) -> subprocess.CompletedProcess:
    """torchrun --nproc-per-node `processes` of this program; settings as make_config's overrides."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
           __file__, str(base), str(out), json.dumps(overrides)]
    env = os.environ | {"PYTHONPATH": f"{REPO / 'scripts'}:{REPO / 'tests'}"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def main() -> int:
    import torch
    import train
    from hpc_finetune.io.cli import StageError, setup_logging
    from hpc_finetune.io.files import read_jsonl
    from transformers import TrainerCallback

    from support.train_stage import make_config

    parser = argparse.ArgumentParser()
    parser.add_argument("base")
    parser.add_argument("out")
    parser.add_argument("overrides")
    args = parser.parse_args()
    overrides = json.loads(args.overrides)
    stop_at = overrides.pop("stop_at", 0)
    torch.set_num_threads(1)
    setup_logging()  # the stage's log lines, as cli() sets them up

    class Steps(TrainerCallback):
        taken = 0

        def on_step_end(self, targs, state, control, **kwargs):
            self.taken += 1
            if state.global_step == stop_at:
                os.kill(os.getpid(), signal.SIGUSR1)

    chats = read_jsonl(DEMO_DATA)[:40]
    cfg = make_config(Path(args.base), Path(args.out), chats[:32], chats[32:], **overrides)
    steps = Steps()
    try:
        train.main(cfg, callbacks=(steps,))
        status = 0
    except StageError as err:
        print(f"StageError: {err}", flush=True)
        status = 2
    if int(os.environ.get("RANK", 0)) == 0:
        Path(args.out, "session_steps.json").write_text(json.dumps({"steps": steps.taken, "status": status}))
    return status


if __name__ == "__main__":
    sys.exit(main())
