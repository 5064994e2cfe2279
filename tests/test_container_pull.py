"""The container stage's pull and build sources: downloads over file://, http:// (loopback) and from an
S3-protocol server (moto, signatures checked), registry pulls and builds through the stand-in runtime."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest
from hpc_finetune.io.cli import StageError
from hpc_finetune.io.files import sha256_file
from support import container_standin
from support.common import REPO
from support.container import DEF, stage
from support.s3 import isolate_aws, moto_auth, s3_key, s3_put

# --- sources: pull --------------------------------------------------------------------------------------------


def test_pull_over_file_urls_checks_the_digest_from_config_or_sidecar(sif, tmp_path):
    record = stage(tmp_path / "a", source="pull", url=f"file://{sif}", sha256=sha256_file(sif))
    assert record["sha256_checked"] and (tmp_path / "a" / "img" / "finetune.sif").read_bytes() == sif.read_bytes()
    with pytest.raises(StageError, match="only used when its sha256 is known"):
        stage(tmp_path / "b", source="pull", url=f"file://{sif}")
    published = tmp_path / "pub" / "finetune.sif"
    published.parent.mkdir()
    shutil.copy(sif, published)
    Path(f"{published}.sha256").write_text(f"{sha256_file(sif)}  finetune.sif\n")
    assert stage(tmp_path / "c", source="pull", url=f"file://{published}")["sha256"] == sha256_file(sif)
    published.write_bytes(sif.read_bytes()[:30000])  # a truncated copy on the server
    with pytest.raises(StageError, match="truncated"):
        stage(tmp_path / "d", source="pull", url=f"file://{published}")
    assert not list((tmp_path / "d" / "img").glob("*.sif*"))


def test_pull_over_http_from_loopback(sif, tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    shutil.copy(sif, root / "finetune.sif")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/finetune.sif"
        assert stage(tmp_path, source="pull", url=url, sha256=sha256_file(sif))["sha256_checked"]
        with pytest.raises(StageError, match="HTTP 404"):
            stage(tmp_path / "x", source="pull", url=url + ".missing", sha256=sha256_file(sif))
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_pull_from_s3_on_a_configurable_endpoint(sif, s3_server, tmp_path, monkeypatch):
    s3_put(s3_server, "images")
    s3_put(s3_server, "images/v1/finetune.sif", sif.read_bytes())
    s3_put(s3_server, "images/v1/finetune.sif.sha256", f"{sha256_file(sif)}  finetune.sif\n".encode())
    s3_put(s3_server, "images/v1/short.sif", sif.read_bytes()[:40000])
    isolate_aws(monkeypatch, tmp_path, AWS_ACCESS_KEY_ID="AKIDEXAMPLE",
                AWS_SECRET_ACCESS_KEY="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
    record = stage(tmp_path / "a", source="pull", url="s3://images/v1/finetune.sif", s3_endpoint=s3_server)
    assert record["sha256"] == sha256_file(sif) and record["sha256_checked"]  # digest from the .sha256 next to it
    assert "wJalrX" not in json.dumps(record)
    with pytest.raises(StageError, match="truncated"):
        stage(tmp_path / "b", source="pull", url="s3://images/v1/short.sif", s3_endpoint=s3_server,
              sha256=sha256_file(sif))
    with pytest.raises(StageError, match=r"download s3://images/v2/finetune.sif failed .*HTTP 404 NoSuchKey"):
        stage(tmp_path / "c", source="pull", url="s3://images/v2/finetune.sif", s3_endpoint=s3_server,
              sha256=sha256_file(sif))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)  # boto3's own endpoint setting, when the config has none
    record = stage(tmp_path / "d", source="pull", url="s3://images/v1/finetune.sif", sha256=sha256_file(sif))
    assert record["sha256_checked"]


def test_s3_signature_is_verified_by_the_server(sif, s3_server, tmp_path, monkeypatch):
    """With moto checking every signature (it recomputes SigV4 with botocore), a signed GET of a key with
    characters that the canonical URI must encode is accepted; a wrong secret, an unknown key, half a key and an
    anonymous request are refused with an error that says what to check, and leave no image behind."""
    key = s3_key(s3_server, "puller", ["s3:GetObject"], ["arn:aws:s3:::signed/*"])
    s3_put(s3_server, "signed")
    s3_put(s3_server, "signed/v1/fine%20tune%2B1.sif", sif.read_bytes())
    url, digest = "s3://signed/v1/fine tune+1.sif", sha256_file(sif)
    moto_auth(s3_server, "0")
    try:
        isolate_aws(monkeypatch, tmp_path, AWS_ACCESS_KEY_ID=key["AccessKeyId"],
                    AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"])
        record = stage(tmp_path / "a", source="pull", url=url, s3_endpoint=s3_server, sha256=digest)
        assert record["sha256"] == digest
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"][:-1] + "x")
        with pytest.raises(StageError, match=r"HTTP 403 SignatureDoesNotMatch: .*check AWS_SECRET_ACCESS_KEY"):
            stage(tmp_path / "b", source="pull", url=url, s3_endpoint=s3_server, sha256=digest)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTKNOWNHERE0000")
        with pytest.raises(StageError, match=r"HTTP 403 InvalidAccessKeyId: .*check it and the endpoint"):
            stage(tmp_path / "b", source="pull", url=url, s3_endpoint=s3_server, sha256=digest)
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        with pytest.raises(StageError, match=r"incomplete credentials .*set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"):
            stage(tmp_path / "c", source="pull", url=url, s3_endpoint=s3_server, sha256=digest)
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        with pytest.raises(StageError, match=r"HTTP 403.*went anonymous: set AWS_ACCESS_KEY_ID"):
            stage(tmp_path / "c", source="pull", url=url, s3_endpoint=s3_server, sha256=digest)
        assert not list((tmp_path / "b" / "img").glob("*")) and not list((tmp_path / "c" / "img").glob("*"))
    finally:
        moto_auth(s3_server, "inf")


def test_registry_pulls_go_through_the_runtime(standin, tmp_path):
    for url in ("oras://registry.example.org/ml/finetune:1.0", "docker://ghcr.io/example/finetune:1.0",
                "library://example/ml/finetune:1.0"):
        record = stage(tmp_path / url.split(":")[0], source="pull", url=url, runtime="apptainer")
        assert record["url"] == url and not record["sha256_checked"]
    calls = [c["argv"] for c in container_standin.records(standin)]
    assert [c[0] for c in calls] == ["pull"] * 3 and all(c[1] == "--force" for c in calls)
    assert [c[-1] for c in calls][0] == "oras://registry.example.org/ml/finetune:1.0"
    with pytest.raises(StageError, match="unsupported scheme 'ftp'"):
        stage(tmp_path / "ftp", source="pull", url="ftp://example.org/finetune.sif")


# --- source: build --------------------------------------------------------------------------------------------


def test_build_tries_fakeroot_then_other_modes_and_says_what_the_site_must_allow(standin, tmp_path, monkeypatch):
    monkeypatch.setenv("STANDIN_BUILD_ALLOW", "unprivileged")
    record = stage(tmp_path / "a", source="build", definition=str(DEF), build_modes=["fakeroot", "unprivileged"],
                   project_commit="abc123")
    assert record["build_mode"] == "unprivileged" and record["definition_sha256"] == sha256_file(DEF)
    first, second = (c for c in container_standin.records(standin) if c["argv"][0] == "build")
    assert first["argv"][:2] == ["build", "--fakeroot"] and "--fakeroot" not in second["argv"]
    assert "PROJECT_COMMIT=abc123" in second["argv"] and second["argv"][-1] == str(DEF)
    assert first["cwd"] == str(REPO)  # %files paths are relative to the repository
    monkeypatch.setenv("STANDIN_BUILD_ALLOW", "")
    with pytest.raises(StageError) as err:
        stage(tmp_path / "b", source="build", definition=str(DEF), build_modes=["fakeroot", "unprivileged"])
    message = str(err.value)
    assert "The site must allow one of" in message and "subuid" in message and "user namespaces" in message
    assert "container.source path or pull" in message
