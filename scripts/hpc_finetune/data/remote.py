"""Datasets in buckets: `dataset.path: s3://bucket/file.jsonl` (any file type the data stage reads) or
`s3://bucket/prefix/` (data files under it, e.g. shards named by split as in a dataset repository:
train-00000.parquet, validation-00000.parquet; one file type for every split, as datasets requires).

The workflow lists the objects when it starts (list_s3; one paginated ListObjectsV2) and names the cache after
them (Listing.digest: bucket, keys, ETags and sizes), so an overwritten object is a new cache directory and the data
stage runs again. The fetch stage downloads into a temporary directory and renames it into place (an interrupted
fetch leaves no half cache), each object at the listed ETag (the store refuses another version) and size; a
complete cache is reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from hpc_finetune.data.readers import FILE_TYPES
from hpc_finetune.io.cli import StageError, log
from hpc_finetune.storage import s3


@dataclass
class Listing:
    """What the workflow found at an s3:// dataset.path."""

    url: str
    bucket: str
    prefix: str  # the key of a single file, else the prefix ("" or ending in /)
    single: bool
    objects: list[dict]  # {"key", "etag", "bytes", "path"}: path is where it lies in the cache directory

    @property
    def digest(self) -> str:
        """The cache key: the bucket and every object's key, ETag and size."""
        basis = [self.bucket, self.prefix, [[o["key"], o["etag"], o["bytes"]] for o in self.objects]]
        return hashlib.sha256(json.dumps(basis).encode()).hexdigest()[:20]

    def cache(self, root: str) -> str:
        """The cache directory under dataset.cache_dir."""
        return f"{root.rstrip('/')}/s3/{self.bucket}/{self.digest}"

    def data_path(self, root: str) -> str:
        """What the data stage reads: the file, or the directory laid out as under the prefix."""
        return f"{self.cache(root)}/{self.objects[0]['path']}" if self.single else self.cache(root)


def store(endpoint: str | None, region: str) -> s3.Store:
    return s3.Store(endpoint, region, anonymous=True)  # a public bucket needs no credentials


def list_s3(url: str, endpoint: str | None, region: str) -> Listing:
    """The objects at `url`: one file, or the data files under a prefix. StageErrors name what is missing."""
    bucket, key = s3.split_url(url, "dataset.path")
    types = "/".join(FILE_TYPES)
    found = store(endpoint, region).listing(bucket, key)
    exact = [o for o in found if o["Key"] == key] if key and not key.endswith("/") else []
    if exact:
        if PurePosixPath(key).suffix.lower() not in FILE_TYPES:
            raise StageError(f"dataset.path {url}: unsupported file type {PurePosixPath(key).suffix or '(none)'!r}; "
                             f"use a {types} file or a prefix s3://{bucket}/<prefix>/ of such files")
        return Listing(url, bucket, key, True, [entry(exact[0], PurePosixPath(key).name)])
    prefix = key if not key or key.endswith("/") else key + "/"
    under = [o for o in found if o["Key"].startswith(prefix) and not o["Key"].endswith("/")]
    if not under:
        what = f"no object s3://{bucket}/{key} and nothing under s3://{bucket}/{prefix}" if key and \
            not key.endswith("/") else f"nothing under s3://{bucket}/{prefix}"
        raise StageError(f"dataset.path {url}: {what} (NoSuchKey: check the path in the s3:// URL and the endpoint)")
    objects, skipped = [], []
    for obj in under:
        relative = PurePosixPath(obj["Key"][len(prefix):])
        if ".." in relative.parts or any(part.startswith((".", "_")) for part in relative.parts) \
                or relative.suffix.lower() not in FILE_TYPES:
            skipped.append(obj["Key"])
        else:
            objects.append(entry(obj, relative.as_posix()))
    if not objects:
        raise StageError(f"dataset.path {url}: no data files under s3://{bucket}/{prefix} (looked for {types} files, "
                         f"not hidden; found {len(skipped)} other objects: {', '.join(skipped[:5])})")
    if skipped:
        log.info("dataset %s: not data files, left out: %s", url, ", ".join(skipped[:10]))
    return Listing(url, bucket, prefix, False, objects)


def entry(obj: dict, path: str) -> dict:
    return {"key": obj["Key"], "etag": obj["ETag"], "bytes": obj["Size"], "path": path}


def complete(listing: Listing, cache: Path) -> bool:
    """A cache directory that holds every object at its size (only a finished fetch renames one into place)."""
    return cache.is_dir() and all((cache / o["path"]).is_file() and (cache / o["path"]).stat().st_size == o["bytes"]
                                  for o in listing.objects)


def fetch(listing: Listing, cache: Path, endpoint: str | None, region: str) -> dict:
    """Download the listed objects into `cache` (reused when complete); the record of what it holds."""
    started, sent = time.time(), 0
    reused = complete(listing, cache)
    if not reused:
        client = store(endpoint, region)
        tmp = cache.parent / f".{cache.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            for obj in listing.objects:
                target = tmp / obj["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                got = client.download(listing.bucket, obj["key"], target, etag=obj["etag"])
                if got.get("ETag") != obj["etag"] or got["ContentLength"] != obj["bytes"]:
                    raise StageError(f"s3://{listing.bucket}/{obj['key']} changed since it was listed (ETag "
                                     f"{got.get('ETag')}, {got['ContentLength']} bytes): start Snakemake again")
                sent += obj["bytes"]
                log.info("%12s B  s3://%s/%s", f"{obj['bytes']:,}", listing.bucket, obj["key"])
            shutil.rmtree(cache, ignore_errors=True)  # an incomplete one (files removed by hand)
            os.rename(tmp, cache)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("dataset %s: %s in %s", listing.url, "cache complete, nothing downloaded" if reused else
             f"{len(listing.objects)} objects, {sent / 2**20:,.1f} MiB downloaded", cache)
    return {**asdict(listing), "kind": "s3", "digest": listing.digest, "cache": str(cache),
            "endpoint": store(endpoint, region).url,
            "downloaded_files": 0 if reused else len(listing.objects), "downloaded_bytes": sent,
            "seconds": round(time.time() - started, 2)}
