"""moto's S3-protocol server on loopback (an on-prem object store stand-in for the protocol), with IAM
authorisation that checks every SigV4 signature when turned on."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def moto_server() -> Iterator[str]:
    """Start moto_server on a free loopback port; yield its endpoint."""
    server = Path(sys.executable).parent / "moto_server"
    if not server.exists():
        raise RuntimeError("moto_server is missing: make env (moto is in requirements.lock)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint + "/", timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    try:
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(10)


AWS_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
                 "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS")


def isolate_aws(monkeypatch, tmp_path: Path, **env: str) -> None:
    """boto3's credential chain sees only what a test gives it: no profile files of the person running the tests,
    no instance metadata lookups (a second each off EC2), no AWS_* variables but `env`."""
    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def s3_client(endpoint: str, key: dict | None = None):
    """A boto3 client of the server (as `key`, an s3_key answer; else a dummy key for the server without checks)."""
    import boto3

    key = key or {"AccessKeyId": "testing", "SecretAccessKey": "testing"}
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key["AccessKeyId"],
                        aws_secret_access_key=key["SecretAccessKey"])


def s3_put(endpoint: str, path: str, data: bytes = b"") -> None:
    request = urllib.request.Request(f"{endpoint}/{path}", data=data, method="PUT",
                                     headers={"Content-Type": "application/octet-stream"})
    urllib.request.urlopen(request, timeout=10)


def moto_auth(endpoint: str, free_requests: str) -> None:
    """Turn moto's IAM authorisation on ("0": every request must carry a valid SigV4 signature of a known key with
    a policy that allows it) or off ("inf")."""
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=free_requests.encode(),
                                                  method="POST", headers={"Content-Type": "text/plain"}), timeout=10)


def s3_key(endpoint: str, user: str, actions: list[str], resources: list[str]) -> dict:
    """An IAM user of the server with a policy that allows `actions` on `resources`; its access key (AccessKeyId,
    SecretAccessKey). Set up before moto_auth turns the checks on."""
    import boto3  # moto's own dependency

    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                       aws_secret_access_key="setup")
    iam.create_user(UserName=user)
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": resources}]}
    iam.put_user_policy(UserName=user, PolicyName=f"{user}-policy", PolicyDocument=json.dumps(policy))
    return iam.create_access_key(UserName=user)["AccessKey"]
