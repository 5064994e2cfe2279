"""Upload stage (optional): copy the merged model, the adapter and the manifest to an S3-protocol bucket.

    python scripts/upload.py --bucket s3://models/finetune/demo --dirs '["results/demo/merged", "results/demo/adapters"]' \
        --manifest results/demo/manifest.json --record-out results/demo/upload.json

Each file goes to {bucket}/{directory name}/{path in it}, with its sha256 as object metadata (x-amz-meta-sha256).
An object that already holds the same sha256 is skipped, so a re-run, or a run after an interrupted one, uploads
only what is missing or changed. Files above --part-size-mb go up in parts (multipart upload; an upload that fails
is aborted, no half object stays). Bodies are signed with their sha256, which the store checks. The manifest goes
last: a reader who finds {bucket}/manifest.json finds every file it lists. Credentials: AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN) in the environment; the endpoint: --endpoint or AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from hpc_finetune.io.cli import StageError, cli, log, table
from hpc_finetune.io.files import sha256_file, write_json
from hpc_finetune.io.schema import option
from hpc_finetune.storage import s3

MIN_PART_MB = 5  # S3's smallest part but the last
MAX_PARTS = 10_000  # S3's most parts of one object


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
        # hidden files (Snakemake's .snakemake_timestamp) are bookkeeping: the manifest leaves them out too
        for path in sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".")):
            pairs.append((path, "/".join(filter(None, [prefix, directory.name, path.relative_to(directory).as_posix()]))))
    if not Path(cfg.manifest).is_file():
        raise StageError(f"{cfg.manifest}: no manifest to upload (run the summary stage first)")
    pairs.append((Path(cfg.manifest), "/".join(filter(None, [prefix, "manifest.json"]))))
    return pairs


def put_single(store: s3.Store, bucket: str, key: str, path: Path, digest: str) -> int:
    """Upload in one request; returns 1 (the parts, as put_multipart does). The body is signed with the file's
    sha256, so the store itself refuses a body that differs from the digest recorded in the metadata."""
    store.call(f"upload {path} to s3://{bucket}/{key}", "PUT", bucket, key, data=path.read_bytes(),
               headers={"x-amz-meta-sha256": digest}, payload_hash=digest)
    return 1


def put_multipart(store: s3.Store, bucket: str, key: str, path: Path, digest: str, part_size: int) -> int:
    """Upload in parts of part_size bytes; abort the upload when anything fails. Returns the number of parts."""
    what = f"upload {path} to s3://{bucket}/{key}"
    if -(-path.stat().st_size // part_size) > MAX_PARTS:
        raise StageError(f"{path} needs more than {MAX_PARTS:,} parts of {part_size >> 20} MiB: raise "
                         "upload.part_size_mb")
    _, _, body = store.call(f"{what} (start)", "POST", bucket, key, query={"uploads": ""},
                            headers={"x-amz-meta-sha256": digest})
    found = re.search(rb"<UploadId>(.*?)</UploadId>", body)
    if not found:
        raise StageError(f"{what}: the store did not return an UploadId: {body[:300]!r}")
    upload_id = found.group(1).decode()
    try:
        etags = []
        with open(path, "rb") as fh:
            while chunk := fh.read(part_size):
                number = len(etags) + 1
                _, headers, _ = store.call(f"{what} (part {number})", "PUT", bucket, key, data=chunk,
                                           query={"partNumber": number, "uploadId": upload_id},
                                           payload_hash=hashlib.sha256(chunk).hexdigest())
                etags.append(headers.get("etag", ""))
        parts = "".join(f"<Part><PartNumber>{n}</PartNumber><ETag>{etag}</ETag></Part>"
                        for n, etag in enumerate(etags, 1))
        done = f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>".encode()
        _, _, body = store.call(f"{what} (complete)", "POST", bucket, key, query={"uploadId": upload_id}, data=done,
                                payload_hash=hashlib.sha256(done).hexdigest())
        if b"<Error>" in body:  # S3 may answer 200 and report the failure in the body
            raise StageError(f"{what} (complete) failed: {s3.error_detail(200, body.decode(errors='replace'))}")
        return len(etags)
    except BaseException:
        try:
            store.call(f"{what} (abort)", "DELETE", bucket, key, query={"uploadId": upload_id})
        except StageError as err:
            log.warning("%s; the incomplete upload %s stays until the bucket's lifecycle removes it", err, upload_id)
        raise


def main(cfg: Config) -> dict:
    started = time.time()
    if cfg.part_size_mb < MIN_PART_MB:
        raise StageError(f"upload.part_size_mb must be at least {MIN_PART_MB} (S3's smallest part), got "
                         f"{cfg.part_size_mb}")
    bucket, prefix = s3.split_url(cfg.bucket, "upload.bucket")
    missing = [name for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not os.environ.get(name)]
    if missing:
        raise StageError(f"{' and '.join(missing)} not set: the upload to {cfg.bucket} needs a key that may write "
                         "there (export both where Snakemake runs; the upload runs on that host)")
    store = s3.Store(cfg.endpoint, cfg.region)
    part_size = cfg.part_size_mb << 20
    objects, sent = [], 0
    pairs = files_to_upload(cfg, prefix)
    log.info("uploading %d files to s3://%s/%s at %s", len(pairs), bucket, prefix, store.base.geturl())
    for path, key in pairs:
        digest, size = sha256_file(path), path.stat().st_size
        status, headers, _ = store.call(f"check s3://{bucket}/{key}", "HEAD", bucket, key)
        if status == 200 and headers.get("x-amz-meta-sha256") == digest:
            action = "skipped (same sha256)"
        else:
            parts = put_single(store, bucket, key, path, digest) if size <= part_size else put_multipart(
                store, bucket, key, path, digest, part_size)
            status, headers, _ = store.call(f"check s3://{bucket}/{key}", "HEAD", bucket, key)
            if status != 200 or int(headers.get("content-length", -1)) != size:
                raise StageError(f"s3://{bucket}/{key} holds {headers.get('content-length')} bytes after the upload, "
                                 f"{path} has {size}")
            action = "uploaded" if parts == 1 else f"uploaded in {parts} parts"
            sent += size
        log.info("%-24s %12s B  s3://%s/%s", action, f"{size:,}", bucket, key)
        objects.append({"key": key, "file": str(path), "sha256": digest, "bytes": size, "action": action})
    seconds = time.time() - started
    record = {
        "url": f"s3://{bucket}/{prefix}".rstrip("/"),
        "endpoint": store.base.geturl(),
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
