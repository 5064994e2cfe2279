"""Container stage: make `finetune.sif` available at one path, verified, whatever its source.

Sources (config `container.source`):
  lfs    sparse-checkout only the image's parts from a git-lfs repository, join them, check the sha256 recorded
         next to them, record the repository's commit;
  path   an existing SIF: check its header (and its sha256 when one is given), link it;
  pull   oras:// docker:// library:// through `<runtime> pull`; https:// http:// s3:// file:// by download
         (S3 with SigV4 against any S3-protocol endpoint); check the sha256;
  build  `<runtime> build` from singularity/finetune.def: --fakeroot, then the other modes allowed, with a
         message that says what the site must allow when none works. Runtime charliecloud: the CPU image of the
         same recipe from Debian packages (hpc_finetune.container.cpu_image; cached by the recipe's hash).

Runtime charliecloud also gets the image's root file system as SquashFS next to it (<output>.sqfs): ch-run
mounts SquashFS, not SIF.

Every image is checked the same way before it is published at --output: the SIF global header (magic, and that
the file holds every byte the header promises: a truncated download is refused) and the sha256. The record
(--record-out) says where the image came from and its digest. hpc_finetune.container holds the checks
and the sources.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hpc_finetune.container.sif import extract_squashfs
from hpc_finetune.container.sources import from_build, from_cpu_build, from_lfs, from_path, from_pull
from hpc_finetune.io.cli import StageError, cli, log, table
from hpc_finetune.io.files import write_json
from hpc_finetune.io.schema import option


@dataclass
class Config:
    source: str = option("container.source")
    output: str = field(default="", metadata={"help": "where to publish the verified image (container.image)"})
    record_out: str = field(default="", metadata={"help": "the record of its origin and sha256 (JSON)"})
    runtime: str = field(default="apptainer",
                         metadata={"help": "apptainer, singularity or charliecloud (container.runtime)"})
    path: str | None = option("container.path")
    sha256: str | None = option("container.sha256")
    url: str | None = option("container.url")
    s3_endpoint: str | None = option("container.s3_endpoint")
    s3_region: str = option("container.s3_region")
    lfs_url: str | None = option("container.lfs.url")
    lfs_revision: str = option("container.lfs.revision")
    lfs_dir: str = option("container.lfs.dir")
    lfs_name: str = option("container.lfs.name")
    definition: str | None = field(default=None, metadata={"help": "the definition file (absolute)"})
    build_modes: list[str] | None = option("container.build_modes")
    build_dir: str | None = field(default=None, metadata={"help": "where to build; default: the repository"})
    project_commit: str = field(default="unknown", metadata={"help": "the workflow's commit, for the labels"})
    pin: str | None = field(default=None, metadata={"help": "what the lfs image is pinned to (recorded)"})


def main(cfg: Config) -> dict:
    if not cfg.output or not cfg.record_out:
        raise StageError("--output and --record-out are required: where to publish the image and its record")
    output = Path(cfg.output)
    sources = {"path": from_path, "lfs": from_lfs, "pull": from_pull, "build": from_build}
    if cfg.source not in sources:
        raise StageError(f"container.source {cfg.source!r}: use one of {', '.join(sources)}")
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".container-", dir=output.parent) as w:
        if cfg.source == "path":
            info = from_path(cfg, output)
        elif cfg.source == "build":
            info = from_cpu_build(cfg, output) if cfg.runtime == "charliecloud" else from_build(cfg, output)
        else:
            info = sources[cfg.source](cfg, output, Path(w))
    if cfg.runtime == "charliecloud":
        info.update(extract_squashfs(output, Path(f"{output}.sqfs")))
    record = {"source": cfg.source, "image": str(output), **info}
    if cfg.source == "lfs":
        record["pin"] = cfg.pin or cfg.lfs_revision
    write_json(cfg.record_out, record)
    log.info("%s", table([(k, v) for k, v in record.items()], "container image"))
    return record


if __name__ == "__main__":
    cli(main, Config, __doc__)
