"""Build (or find in the cache) the CPU test image: finetune.def's recipe on Debian bookworm, packed as SquashFS in
a SIF, for Charliecloud (hpc_finetune.container.cpu_image; README, "Container").

    python scripts/tools/build_cpu_image.py            # prints the image's record (path, sha256, size, timings)

Needs debootstrap, ch-run (charliecloud-runtime), mksquashfs (squashfs-tools) and siftool, and $USER set. The
workflow builds it itself with `--config container__runtime=charliecloud container__source=build`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpc_finetune.container.cpu_image import build  # noqa: E402
from hpc_finetune.io.cli import setup_logging  # noqa: E402

if __name__ == "__main__":
    setup_logging()
    record = build()
    print(json.dumps({k: v for k, v in record.items() if k != "installed"}, indent=1))
