"""Upload stage (optional): copy the merged model, the adapter and the manifest to an S3-protocol bucket.

    python scripts/upload.py --bucket s3://models/finetune/demo --dirs '["results/demo/merged", "results/demo/adapters"]' \
        --manifest results/demo/manifest.json --record-out results/demo/upload.json

Each file goes to {bucket}/{directory name}/{path in it}, with its sha256 as object metadata (x-amz-meta-sha256).
An adapter vLLM would refuse (DoRA, modules_to_save, a rank above 512) is refused before anything is sent.
An object that already holds the same sha256 is skipped, so a re-run, or a run after an interrupted one, uploads
only what is missing or changed. Files above --part-size-mb go up in parts (multipart upload; an upload that fails
is aborted, no half object stays). Bodies carry a SHA256 checksum, which the store checks. The manifest goes
last: a reader who finds {bucket}/manifest.json finds every file it lists. Credentials: boto3's chain (environment,
AWS_PROFILE, roles); the endpoint: --endpoint, else AWS_ENDPOINT_URL (hpc_finetune.storage.s3).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from hpc_finetune.io.cli import StageError, cli, log, plural, table
from hpc_finetune.io.files import sha256_file, write_json
from hpc_finetune.io.schema import option
from hpc_finetune.merge.adapter import check_servable_adapter
from hpc_finetune.storage import s3

MIN_PART_MB = 5  # S3's smallest part but the last


@dataclass
class Config:
    bucket: str = field(metadata={"help": "s3://bucket/prefix to upload to"})
    dirs: list[str] = field(metadata={"help": "JSON list of directories to upload (merged model, adapter)"})
    manifest: str = field(metadata={"help": "manifest.json of the summary stage, uploaded last"})
    record_out: str = field(metadata={"help": "upload.json to write: every object, uploaded or skipped"})
    endpoint: str | None = option("upload.endpoint")
    region: str = option("upload.region")
    part_size_mb: int = option("upload.part_size_mb")


def files_to_upload(cfg: Config, prefix: str) -> list[tuple[Path, str]]:
    """(local file, object key) for every file of the directories, then the manifest."""
    pairs = []
    for directory in map(Path, cfg.dirs):
        if not directory.is_dir():
            raise StageError(f"{directory}: no such directory to upload (run the stage that makes it first)")
        if (directory / "adapter_config.json").is_file():  # an adapter users will serve: one vLLM loads
            check_servable_adapter(directory, "upload.include: [merged]")
        # hidden files (Snakemake's .snakemake_timestamp) are bookkeeping: the manifest leaves them out too
        for path in sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".")):
            pairs.append((path, "/".join(filter(None, [prefix, directory.name, path.relative_to(directory).as_posix()]))))
    if not Path(cfg.manifest).is_file():
        raise StageError(f"{cfg.manifest}: no manifest to upload (run the summary stage first)")
    pairs.append((Path(cfg.manifest), "/".join(filter(None, [prefix, "manifest.json"]))))
    return pairs


def main(cfg: Config) -> dict:
    started = time.time()
    if cfg.part_size_mb < MIN_PART_MB:
        raise StageError(f"upload.part_size_mb must be at least {MIN_PART_MB} (S3's smallest part), got "
                         f"{cfg.part_size_mb}")
    bucket, prefix = s3.split_url(cfg.bucket, "upload.bucket")
    prefix = prefix.rstrip("/")
    store = s3.Store(cfg.endpoint, cfg.region)
    part_size = cfg.part_size_mb << 20
    objects, sent = [], 0
    pairs = files_to_upload(cfg, prefix)
    log.info("uploading %s to s3://%s/%s at %s", plural(len(pairs), "file"), bucket, prefix, store.url)
    for path, key in pairs:
        digest, size = sha256_file(path), path.stat().st_size
        found = store.head(bucket, key)
        if found and found.get("Metadata", {}).get("sha256") == digest:
            action = "skipped (same sha256)"
        else:
            store.upload(path, bucket, key, {"sha256": digest}, part_size)
            found = store.head(bucket, key) or {}
            if found.get("ContentLength") != size:
                raise StageError(f"s3://{bucket}/{key} holds {found.get('ContentLength')} bytes after the upload, "
                                 f"{path} has {size}")
            parts = found.get("ETag", "").strip('"').partition("-")[2]  # a multipart object's ETag ends in -<parts>
            action = f"uploaded in {parts} parts" if parts else "uploaded"
            sent += size
        log.info("%-24s %12s B  s3://%s/%s", action, f"{size:,}", bucket, key)
        objects.append({"key": key, "file": str(path), "sha256": digest, "bytes": size, "action": action})
    seconds = time.time() - started
    record = {
        "url": f"s3://{bucket}/{prefix}".rstrip("/"),
        "endpoint": store.url,
        "objects": objects,
        "uploaded_bytes": sent,
        "uploaded_files": sum(o["action"].startswith("uploaded") for o in objects),
        "seconds": round(seconds, 2),
    }
    write_json(cfg.record_out, record)
    log.info("\n%s", table([
        ("destination", record["url"]),
        ("files", f"{len(objects)} ({record['uploaded_files']} uploaded, {len(objects) - record['uploaded_files']} "
                  "already there)"),
        ("uploaded", f"{sent / 2**20:,.1f} MiB in {seconds:.1f} s"),
    ], "Upload"))
    return record


if __name__ == "__main__":
    cli(main, Config, __doc__)
