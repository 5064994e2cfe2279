"""A small S3-protocol client on the standard library: path-style requests signed with AWS SigV4, for AWS and for
on-prem object stores (MinIO, Ceph RGW, ...). Used by the container stage (pull s3://) and the upload stage.

Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) in the environment;
without them requests go anonymous. The secret never leaves this process: only the signature is sent.
Errors are StageErrors that show the store's error code, its message and what to check.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from hpc_finetune.io.cli import StageError

UNSIGNED = "UNSIGNED-PAYLOAD"
HINTS = {
    "SignatureDoesNotMatch": "the server computed another signature: check AWS_SECRET_ACCESS_KEY and the region, "
                             "which the signature covers",
    "InvalidAccessKeyId": "this endpoint does not know AWS_ACCESS_KEY_ID: check it and the endpoint",
    "AccessDenied": "the key may not do this (bucket policy), or the request went anonymous because "
                    "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY are unset",
    "NoSuchKey": "no such object: check the path in the s3:// URL",
    "NoSuchBucket": "no such bucket: check the s3:// URL and the endpoint",
    "EntityTooSmall": "a multipart part is below the store's minimum (5 MiB on S3): raise the part size",
}


def split_url(url: str, what: str) -> tuple[str, str]:
    """s3://bucket/key -> (bucket, key); `what` names the setting in the error."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StageError(f"{what} {url!r}: an S3 URL is s3://bucket/path")
    return parsed.netloc, parsed.path.strip("/")


def quote(text: str, safe: str = "/") -> str:
    """URI-encode as SigV4 wants it: everything but unreserved characters (and `safe`)."""
    return urllib.parse.quote(text, safe=safe + "-_.~")


def error_detail(code: int, body: str) -> str:
    """What a person needs from an error response: an S3 error's code and message with a hint, else its start."""
    found = {tag: re.search(f"<{tag}>(.*?)</{tag}>", body, re.S) for tag in ("Code", "Message")}
    if found["Code"]:
        name = found["Code"].group(1)
        message = found["Message"].group(1).strip() if found["Message"] else ""
        return f"{name}: {message} ({HINTS.get(name, 'see the server message')})"
    if code in (401, 403):
        return "access refused (check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and the bucket policy) " + body[:300]
    return body[:300]


def http_error(what: str, err: urllib.error.HTTPError) -> StageError:
    """The StageError for an HTTP error response to `what`: status, and the detail error_detail finds."""
    return StageError(f"{what} failed: HTTP {err.code} {err.reason}: "
                      f"{error_detail(err.code, err.read(2000).decode(errors='replace'))}")


@dataclass
class Store:
    endpoint: str | None = None  # None: AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, else AWS in `region`
    region: str = "us-east-1"

    @property
    def base(self) -> urllib.parse.SplitResult:
        url = (self.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
               or f"https://s3.{self.region}.amazonaws.com")
        return urllib.parse.urlsplit(url.rstrip("/"))

    def request(self, method: str, bucket: str, key: str = "", *, query: dict | None = None, data: bytes | None = None,
                headers: dict | None = None, payload_hash: str = UNSIGNED) -> urllib.request.Request:
        """A path-style request, signed with SigV4 when credentials are set. `payload_hash` is the body's sha256
        (hex) for signed bodies, which the store then checks, or UNSIGNED-PAYLOAD."""
        base = self.base
        path = f"{base.path}/{quote(bucket)}" + (f"/{quote(key)}" if key else "")
        canonical_query = "&".join(f"{quote(k, '')}={quote(str(v), '')}" for k, v in sorted((query or {}).items()))
        url = f"{base.scheme}://{base.netloc}{path}" + (f"?{canonical_query}" if canonical_query else "")
        request = urllib.request.Request(url, data=data, method=method)
        headers = {k.lower(): str(v).strip() for k, v in (headers or {}).items()}
        if data is not None:  # urllib's default (form data) makes some servers parse the body as a form
            headers.setdefault("content-type", "application/octet-stream")
        access, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
        if access and secret:
            now = dt.datetime.now(dt.UTC)
            amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
            headers.update({"host": base.netloc, "x-amz-content-sha256": payload_hash, "x-amz-date": amz_date})
            if os.environ.get("AWS_SESSION_TOKEN"):
                headers["x-amz-security-token"] = os.environ["AWS_SESSION_TOKEN"]
            signed = ";".join(sorted(headers))
            canonical = "\n".join([method, path, canonical_query, *(f"{k}:{headers[k]}" for k in sorted(headers)), "",
                                   signed, payload_hash])
            scope = f"{day}/{self.region}/s3/aws4_request"
            to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
            k = f"AWS4{secret}".encode()
            for part in (day, self.region, "s3", "aws4_request"):
                k = hmac.new(k, part.encode(), hashlib.sha256).digest()
            signature = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
            headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={access}/{scope}, SignedHeaders={signed}, "
                                        f"Signature={signature}")
        for name, value in headers.items():
            if name != "host":
                request.add_header(name, value)
        return request

    def call(self, what: str, method: str, bucket: str, key: str = "", **kwargs) -> tuple[int, dict, bytes]:
        """Send a request; (status, headers, body). Errors raise a StageError that starts with `what`; a HEAD
        of a missing object returns status 404 instead."""
        request = self.request(method, bucket, key, **kwargs)
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
        except urllib.error.HTTPError as err:
            if method == "HEAD" and err.code == 404:
                return 404, {}, b""
            raise http_error(what, err) from None
        except (urllib.error.URLError, OSError) as err:
            raise StageError(f"{what} failed: {getattr(err, 'reason', err)} (is {self.base.geturl()} reachable "
                             "from this node?)") from None
