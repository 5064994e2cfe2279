"""S3-protocol object stores (AWS, MinIO, Ceph RGW, ...) through boto3, for the upload stage, the container pull
from s3:// and datasets in buckets.

- Credentials: boto3's chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN, AWS_PROFILE and
  ~/.aws/config, web-identity and instance roles); never the config. Reads (`anonymous=True`) go unsigned when the
  chain finds none, so public buckets work; writes fail with what to set.
- Endpoint: the config's, else boto3's own (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, the profile's endpoint_url),
  else AWS in the region. A configured endpoint is addressed path-style, as on-prem stores want.
- Retries: botocore's standard mode with backoff, 5 attempts (AWS_RETRY_MODE / AWS_MAX_ATTEMPTS override).
- Multipart: the transfer manager, parts of the given size; it aborts a failed upload. Bodies carry a SHA256
  checksum that the store verifies; downloads check the stored checksum when the object has one.
- Errors: StageErrors that name the bucket and key, the store's code and what to check (HINTS).
"""

from __future__ import annotations

import functools
import os
import shutil
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hpc_finetune.io.cli import StageError

CREDENTIALS = "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE (a profile of ~/.aws/config)"
HINTS = {
    "SignatureDoesNotMatch": "the server computed another signature: check AWS_SECRET_ACCESS_KEY and the region, "
                             "which the signature covers",
    "InvalidAccessKeyId": "this endpoint does not know AWS_ACCESS_KEY_ID: check it and the endpoint",
    "AccessDenied": "the key may not do this: check the bucket policy and that the key (or AWS_PROFILE) is the "
                    "intended one",
    "NoSuchKey": "no such object: check the path in the s3:// URL",
    "NoSuchBucket": "no such bucket: check the s3:// URL and the endpoint",
    "EntityTooSmall": "a multipart part is below the store's minimum (5 MiB on S3): raise the part size",
    "PreconditionFailed": "the object changed since it was listed: start again",
    "403": "access refused: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), the region and the "
           "bucket policy",
    "404": "not found: check the bucket and the key in the s3:// URL, and the endpoint",
}


def split_url(url: str, what: str) -> tuple[str, str]:
    """s3://bucket/key -> (bucket, key); `what` names the setting in the error."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StageError(f"{what} {url!r}: an S3 URL is s3://bucket/path")
    return parsed.netloc, parsed.path.lstrip("/")


@dataclass
class Store:
    endpoint: str | None = None  # None: boto3's (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, profile), else AWS
    region: str = "us-east-1"
    anonymous: bool = False  # go unsigned when no credentials are found (reads of public buckets)

    @functools.cached_property
    def client(self):
        import boto3
        import botocore
        from botocore.config import Config

        custom = self.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        retries = {} if {"AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS"} & set(os.environ) else {
            "retries": {"mode": "standard", "max_attempts": 5}}
        session = boto3.session.Session(region_name=self.region)  # used inside errors(): finding credentials can fail
        self.unsigned = self.anonymous and session.get_credentials() is None
        config = Config(connect_timeout=10, read_timeout=120, s3={"addressing_style": "path" if custom else "auto"},
                        signature_version=botocore.UNSIGNED if self.unsigned else None, **retries)
        return session.client("s3", endpoint_url=self.endpoint or None, config=config)

    @property
    def url(self) -> str:
        """The endpoint: the client's once it exists (a profile's endpoint_url included), else the settings'."""
        if "client" in self.__dict__:
            return self.client.meta.endpoint_url
        return (self.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                or f"https://s3.{self.region}.amazonaws.com")

    @contextmanager
    def errors(self, what: str) -> Iterator[None]:
        """Turn what boto3 raises into a StageError that starts with `what` and says what to check."""
        from boto3.exceptions import Boto3Error
        from botocore import exceptions as boto

        try:
            yield
        except boto.ClientError as err:
            error, status = err.response.get("Error", {}), err.response.get("ResponseMetadata", {})
            code = str(error.get("Code", "?"))
            hint = HINTS.get(code, "see the store's message")
            if getattr(self, "unsigned", False) and code in ("AccessDenied", "403"):
                hint = f"no credentials were found, so the request went anonymous: {CREDENTIALS}"
            named = "" if code.isdigit() else f" {code}"  # a HEAD's (or a bodiless) error has only its status
            raise StageError(f"{what} failed ({err.operation_name}): HTTP {status.get('HTTPStatusCode', '?')}{named}: "
                             f"{error.get('Message', '')} ({hint})") from None
        except boto.NoCredentialsError:
            raise StageError(f"{what} failed: no credentials: {CREDENTIALS}, or run where an instance or "
                             "web-identity role provides them") from None
        except boto.PartialCredentialsError as err:
            raise StageError(f"{what} failed: incomplete credentials ({err}): {CREDENTIALS}") from None
        except boto.ProfileNotFound as err:
            raise StageError(f"{what} failed: {err}: check AWS_PROFILE and ~/.aws/config (AWS_CONFIG_FILE)") from None
        except (boto.EndpointConnectionError, boto.ConnectTimeoutError) as err:
            raise StageError(f"{what} failed: {err} (is {self.url} reachable from this node? check the endpoint "
                             "setting and AWS_ENDPOINT_URL)") from None
        except (boto.BotoCoreError, Boto3Error, OSError) as err:  # OSError: a local file, or a connection cut
            raise StageError(f"{what} failed: {type(err).__name__}: {err}") from None

    def head(self, bucket: str, key: str) -> dict | None:
        """The object's HEAD response (ContentLength, ETag, Metadata), or None when there is none."""
        from botocore.exceptions import ClientError

        with self.errors(f"check s3://{bucket}/{key}"):
            try:
                return self.client.head_object(Bucket=bucket, Key=key)
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                    return None
                raise

    def listing(self, bucket: str, prefix: str) -> list[dict]:
        """Every object under `prefix` (Key, ETag, Size), through ListObjectsV2 pages."""
        with self.errors(f"list s3://{bucket}/{prefix}"):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            return [obj for page in pages for obj in page.get("Contents", [])]

    def download(self, bucket: str, key: str, dst: Path, etag: str | None = None) -> dict:
        """Stream the object to `dst`; with `etag`, only that version (the store refuses another). The stored
        checksum is checked when the object has one, and the size always. Returns the GET response."""
        what = f"download s3://{bucket}/{key}"
        with self.errors(what):
            response = self.client.get_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED",
                                              **({"IfMatch": etag} if etag else {}))
            with open(dst, "wb") as fh:
                shutil.copyfileobj(response["Body"], fh, 1 << 22)
        if dst.stat().st_size != response["ContentLength"]:
            raise StageError(f"{what}: {dst.stat().st_size} bytes arrived, the object has {response['ContentLength']} "
                             "(connection cut? run again)")
        return response

    def upload(self, path: Path, bucket: str, key: str, metadata: dict, part_size: int) -> None:
        """Upload a file: in one request up to part_size bytes, above it in parts of part_size (the transfer
        manager uploads them in parallel and aborts the upload when one fails)."""
        from boto3.s3.transfer import TransferConfig, create_transfer_manager

        config = TransferConfig(multipart_threshold=part_size + 1, multipart_chunksize=part_size)
        with self.errors(f"upload {path} to s3://{bucket}/{key}"), create_transfer_manager(self.client, config) as tm:
            tm.upload(str(path), bucket, key, extra_args={"Metadata": metadata, "ChecksumAlgorithm": "SHA256"}).result()
