"""The upload stage against a real S3-protocol server on loopback (moto) that checks every SigV4 signature and the
key's policy: single and multipart uploads, byte-exact objects with their sha256, re-runs that send only what
changed, an aborted multipart upload, and the errors a person gets for bad settings or credentials."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import upload
from hpc_finetune.io.cli import StageError
from hpc_finetune.io.files import sha256_file
from hpc_finetune.storage import s3
from support.s3 import moto_auth, s3_key, s3_put

BUCKET = "models"


@pytest.fixture(scope="module")
def store(s3_server):
    """The bucket, a key that may write it (and nothing else), and signature checks on for the module's tests."""
    key = s3_key(s3_server, "uploader", ["s3:PutObject", "s3:GetObject", "s3:AbortMultipartUpload",
                                         "s3:ListBucketMultipartUploads"],
                 [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"])
    s3_put(s3_server, BUCKET)
    previous = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(AWS_ACCESS_KEY_ID=key["AccessKeyId"], AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"])
    moto_auth(s3_server, "0")
    yield s3.Store(s3_server)
    moto_auth(s3_server, "inf")
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name)
        else:
            os.environ[name] = value


def outputs(tmp_path):
    """A merged model (one file above the part size), an adapter and a manifest, as the stages leave them."""
    merged, adapters = tmp_path / "merged", tmp_path / "adapters"
    (merged / "sub").mkdir(parents=True)
    adapters.mkdir()
    (merged / "model.safetensors").write_bytes(os.urandom(11 << 20))  # 3 parts of 5 MiB
    (merged / "config.json").write_text('{"model_type": "llama"}')
    (merged / "sub" / "tokenizer file+1.json").write_text("{}")
    (adapters / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    (tmp_path / "manifest.json").write_text('{"files": 4}')
    return merged, adapters


def config(tmp_path, endpoint, prefix="runs/demo", **overrides) -> upload.Config:
    return upload.Config(bucket=f"s3://{BUCKET}/{prefix}", dirs=[str(tmp_path / "merged"), str(tmp_path / "adapters")],
                         manifest=str(tmp_path / "manifest.json"), record_out=str(tmp_path / "upload.json"),
                         endpoint=endpoint, **{"part_size_mb": 5, **overrides})


def test_every_file_arrives_byte_exact_and_a_rerun_sends_only_what_changed(store, s3_server, tmp_path):
    merged, adapters = outputs(tmp_path)
    record = upload.main(config(tmp_path, s3_server))
    keys = [o["key"] for o in record["objects"]]
    assert keys[-1] == "runs/demo/manifest.json"  # last: a reader who sees it sees everything
    assert set(keys) == {"runs/demo/merged/model.safetensors", "runs/demo/merged/config.json",
                         "runs/demo/merged/sub/tokenizer file+1.json", "runs/demo/adapters/adapter_model.safetensors",
                         "runs/demo/manifest.json"}
    actions = {o["key"]: o["action"] for o in record["objects"]}
    assert actions["runs/demo/merged/model.safetensors"] == "uploaded in 3 parts"
    for obj in record["objects"]:
        _, headers, body = store.call("get", "GET", BUCKET, obj["key"])
        assert body == open(obj["file"], "rb").read() and headers["x-amz-meta-sha256"] == sha256_file(obj["file"])
    assert json.loads((tmp_path / "upload.json").read_text())["uploaded_files"] == 5

    again = upload.main(config(tmp_path, s3_server))
    assert again["uploaded_files"] == 0 and again["uploaded_bytes"] == 0

    (adapters / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    changed = upload.main(config(tmp_path, s3_server))
    assert [o["key"] for o in changed["objects"] if o["action"] == "uploaded"] == [
        "runs/demo/adapters/adapter_model.safetensors"]


def test_a_failed_multipart_upload_is_aborted(store, s3_server, tmp_path, monkeypatch):
    outputs(tmp_path)
    real_call = store.call

    def failing(self, what, method, *args, **kwargs):
        if "(part 2)" in what:
            raise StageError(f"{what} failed: connection reset")
        return real_call(what, method, *args, **kwargs)

    monkeypatch.setattr(s3.Store, "call", failing)
    with pytest.raises(StageError, match="part 2"):
        upload.main(config(tmp_path, s3_server, prefix="aborted"))
    monkeypatch.undo()
    _, _, body = store.call("list uploads", "GET", BUCKET, query={"uploads": ""})
    assert b"<UploadId>" not in body  # aborted: no parts left behind in the bucket
    assert store.call("head", "HEAD", BUCKET, "aborted/merged/model.safetensors")[0] == 404
    assert not (tmp_path / "upload.json").exists()


def test_bad_settings_and_credentials_are_named(store, s3_server, tmp_path, monkeypatch):
    outputs(tmp_path)
    (tmp_path / "upload.json").write_text('{"kept": true}')
    with pytest.raises(StageError, match="upload.bucket 'models/x': an S3 URL is s3://bucket/path"):
        upload.main(replace(config(tmp_path, s3_server), bucket="models/x"))
    with pytest.raises(StageError, match="part_size_mb must be at least 5"):
        upload.main(config(tmp_path, s3_server, part_size_mb=1))
    with pytest.raises(StageError, match=f"{tmp_path / 'missing'}: no such directory"):
        upload.main(replace(config(tmp_path, s3_server), dirs=[str(tmp_path / "missing")]))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StageError, match="check s3://models/denied/.* HTTP 403 .*check AWS_ACCESS_KEY_ID/AWS_SECRET"):
        upload.main(config(tmp_path, s3_server, prefix="denied"))
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StageError, match="AWS_SECRET_ACCESS_KEY not set: the upload to s3://models/denied needs a key"):
        upload.main(config(tmp_path, s3_server, prefix="denied"))
    assert json.loads((tmp_path / "upload.json").read_text()) == {"kept": True}  # an earlier record is untouched

