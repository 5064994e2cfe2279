"""Dataset fetch stage (when dataset.path is in a bucket): copy the dataset into the cache that the data stage reads.

    python scripts/fetch_dataset.py --source s3://datasets/medical/ --endpoint https://s3.example.org \
        --region us-east-1 --output resources/datasets/s3/datasets/<digest> \
        --record-out resources/datasets/s3/datasets/<digest>.json

The workflow names --output after the objects it listed when it started (hpc_finetune.data.remote: keys, ETags,
sizes); the stage lists again and refuses when they changed since, downloads each object at its listed ETag into a
temporary directory and renames it into place, and writes the record (every object with its key, ETag, bytes and
local path) that the data report carries. A complete cache is reused. Runs where Snakemake runs (compute nodes
often have no route to the store). Sources dispatch on the kind of --source (FETCHERS): s3://, and hf://datasets/
org/name for a hub dataset at the commit the workflow resolved (hpc_finetune.data.hub), into the shared cache.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from hpc_finetune.data import remote
from hpc_finetune.io.cli import StageError, cli, log, table
from hpc_finetune.io.files import write_json
from hpc_finetune.io.schema import option


@dataclass
class Config:
    source: str = field(metadata={"help": "dataset.path: s3://bucket/file or s3://bucket/prefix/"})
    output: str = field(metadata={"help": "the cache directory, named after the listed objects"})
    record_out: str = field(metadata={"help": "record to write: the source, and every object with its local path"})
    endpoint: str | None = option("dataset.s3_endpoint")
    region: str = option("dataset.s3_region")
    revision: str | None = field(default=None, metadata={"help": "hf://: the revision dataset.revision names"})
    commit: str | None = field(default=None, metadata={"help": "hf://: the commit the workflow resolved it to"})
    hub_url: str | None = option("dataset.hub_url")
    cache_dir: str = option("dataset.cache_dir")
    token_file: str | None = option("model.token_file")


def fetch_s3(cfg: Config) -> dict:
    listing = remote.list_s3(cfg.source, cfg.endpoint, cfg.region)
    output = Path(cfg.output)
    if output.name != listing.digest:
        raise StageError(f"the objects at {cfg.source} changed since Snakemake listed them (cache {output.name}, "
                         f"now {listing.digest}): start Snakemake again, which plans the data stage anew")
    output.parent.mkdir(parents=True, exist_ok=True)
    return remote.fetch(listing, output, cfg.endpoint, cfg.region)


def fetch_hub(cfg: Config) -> dict:
    from hpc_finetune.data import hub
    from hpc_finetune.hub.request import hub_endpoint, read_token

    repo_id = cfg.source.removeprefix("hf://datasets/")
    if not (cfg.revision and cfg.commit):
        raise StageError(f"dataset {cfg.source}: --revision and --commit are needed (the workflow resolves them)")
    pinned = hub.Pinned(repo_id, cfg.revision, cfg.commit, hub_endpoint(cfg.hub_url))
    if Path(cfg.output).resolve() != Path(pinned.snapshot(cfg.cache_dir)).resolve():
        raise StageError(f"--output {cfg.output} is not where the cache keeps {repo_id}@{cfg.commit[:12]}")
    return hub.fetch(pinned, cfg.cache_dir, read_token(cfg.token_file, f"dataset {repo_id}"))


FETCHERS = {"s3": fetch_s3, "hf": fetch_hub}  # by URL scheme


def main(cfg: Config) -> dict:
    kind = urllib.parse.urlsplit(cfg.source).scheme
    if kind not in FETCHERS:
        raise StageError(f"dataset {cfg.source}: no fetcher for {kind or 'a local path'!r} (have: "
                         f"{', '.join(f'{k}://' for k in FETCHERS)})")
    record = FETCHERS[kind](cfg)
    write_json(cfg.record_out, record)
    rows = [("source", cfg.source), ("objects", len(record["objects"]))]
    if "commit" in record:
        rows.append(("commit", f"{record['commit']} ({cfg.revision})"))
    if "downloaded_files" in record:
        rows.append(("downloaded", f"{record['downloaded_files']} files, {record['downloaded_bytes']:,} B"))
    log.info("\n%s", table([*rows, ("cache", cfg.output)], "Dataset fetch"))
    return record


if __name__ == "__main__":
    cli(main, Config, __doc__)
