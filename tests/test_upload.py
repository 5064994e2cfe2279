"""The upload stage against a real S3-protocol server on loopback (moto) that checks every SigV4 signature and the
key's policy: single and multipart uploads, byte-exact objects with their sha256, re-runs that send only what
changed, an aborted multipart upload, credentials from a profile, and the errors a person gets for bad settings,
credentials or endpoints."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import replace

import pytest
import upload
import yaml
from botocore.exceptions import ClientError
from hpc_finetune.io.cli import StageError
from hpc_finetune.io.files import sha256_file
from hpc_finetune.storage import s3
from hpc_finetune.workflow.config import ConfigError, resolve_config
from support.common import REPO, make_adapter
from support.s3 import isolate_aws, moto_auth, s3_client, s3_key, s3_put

BUCKET = "models"


@pytest.fixture(scope="module")
def key(s3_server):
    """The bucket, a key that may write it (and nothing else), and signature checks on for the module's tests."""
    key = s3_key(s3_server, "uploader", ["s3:PutObject", "s3:GetObject", "s3:AbortMultipartUpload",
                                         "s3:ListBucketMultipartUploads"],
                 [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"])
    s3_put(s3_server, BUCKET)
    moto_auth(s3_server, "0")
    yield key
    moto_auth(s3_server, "inf")


@pytest.fixture
def client(key, s3_server, tmp_path, monkeypatch):
    """The key in the environment (and nothing else of AWS's), and a client of the server to read back with."""
    isolate_aws(monkeypatch, tmp_path, AWS_ACCESS_KEY_ID=key["AccessKeyId"], AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"])
    return s3_client(s3_server, key)


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


def test_every_file_arrives_byte_exact_and_a_rerun_sends_only_what_changed(client, s3_server, tmp_path):
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
        got = client.get_object(Bucket=BUCKET, Key=obj["key"], ChecksumMode="ENABLED")
        assert got["Body"].read() == open(obj["file"], "rb").read()
        assert got["Metadata"]["sha256"] == sha256_file(obj["file"])  # x-amz-meta-sha256
    single = client.head_object(Bucket=BUCKET, Key="runs/demo/merged/config.json", ChecksumMode="ENABLED")
    assert "ChecksumSHA256" in single  # the body went with its SHA256 checksum, which the store checked
    assert json.loads((tmp_path / "upload.json").read_text())["uploaded_files"] == 5

    again = upload.main(config(tmp_path, s3_server))
    assert again["uploaded_files"] == 0 and again["uploaded_bytes"] == 0

    (adapters / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    changed = upload.main(config(tmp_path, s3_server))
    assert [o["key"] for o in changed["objects"] if o["action"] == "uploaded"] == [
        "runs/demo/adapters/adapter_model.safetensors"]


def test_a_failed_multipart_upload_is_aborted(client, s3_server, tmp_path, monkeypatch):
    outputs(tmp_path)
    plain = s3.Store.client.func

    def failing_part_2(self):
        made = plain(self)

        def cut(request, **_):
            if "partNumber=2" in request.url:
                raise ConnectionResetError("connection reset by peer during part 2")

        made.meta.events.register("before-send.s3.UploadPart", cut)
        return made

    prop = functools.cached_property(failing_part_2)
    prop.__set_name__(s3.Store, "client")
    monkeypatch.setattr(s3.Store, "client", prop)
    with pytest.raises(StageError, match=r"upload .*model.safetensors to s3://models/aborted/.*part 2"):
        upload.main(config(tmp_path, s3_server, prefix="aborted"))
    assert client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []  # aborted: no parts left behind
    assert s3.Store(s3_server).head(BUCKET, "aborted/merged/model.safetensors") is None
    assert not (tmp_path / "upload.json").exists()


def test_credentials_from_a_profile(key, s3_server, tmp_path, monkeypatch):
    """AWS_PROFILE names a profile of the shared files (here temporary ones): no key in the environment."""
    isolate_aws(monkeypatch, tmp_path, AWS_PROFILE="uploader")
    (tmp_path / "no-aws-credentials").write_text(
        f"[uploader]\naws_access_key_id = {key['AccessKeyId']}\naws_secret_access_key = {key['SecretAccessKey']}\n")
    (tmp_path / "no-aws-config").write_text("[profile uploader]\nregion = us-east-1\n")
    outputs(tmp_path)
    record = upload.main(config(tmp_path, s3_server, prefix="profiled", part_size_mb=64))
    assert record["uploaded_files"] == 5
    assert key["SecretAccessKey"] not in (tmp_path / "upload.json").read_text()
    monkeypatch.setenv("AWS_PROFILE", "nobody")
    with pytest.raises(StageError, match="profile .*nobody.* could not be found: check AWS_PROFILE"):
        upload.main(config(tmp_path, s3_server, prefix="profiled"))


def test_bad_settings_and_credentials_are_named(client, s3_server, tmp_path, monkeypatch):
    outputs(tmp_path)
    (tmp_path / "upload.json").write_text('{"kept": true}')
    with pytest.raises(StageError, match="upload.bucket 'models/x': an S3 URL is s3://bucket/path"):
        upload.main(replace(config(tmp_path, s3_server), bucket="models/x"))
    with pytest.raises(StageError, match="part_size_mb must be at least 5"):
        upload.main(config(tmp_path, s3_server, part_size_mb=1))
    with pytest.raises(StageError, match=f"{tmp_path / 'missing'}: no such directory"):
        upload.main(replace(config(tmp_path, s3_server), dirs=[str(tmp_path / "missing")]))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StageError, match="check s3://models/denied/.* HTTP 403: .*check AWS_ACCESS_KEY_ID/AWS_SECRET"):
        upload.main(config(tmp_path, s3_server, prefix="denied"))
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StageError, match="check s3://models/denied/.*: incomplete credentials .*AWS_SECRET_ACCESS_KEY.*or AWS_PROFILE"):
        upload.main(config(tmp_path, s3_server, prefix="denied"))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    with pytest.raises(StageError, match="check s3://models/denied/.*: no credentials: set AWS_ACCESS_KEY_ID/"
                                         "AWS_SECRET_ACCESS_KEY or AWS_PROFILE"):
        upload.main(config(tmp_path, s3_server, prefix="denied"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "any")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "any")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(StageError, match="is http://127.0.0.1:9 reachable from this node"):
        upload.main(config(tmp_path, "http://127.0.0.1:9", prefix="denied"))
    assert json.loads((tmp_path / "upload.json").read_text()) == {"kept": True}  # an earlier record is untouched


def test_an_adapter_vllm_refuses_is_refused_before_anything_is_sent(client, s3_server, tmp_path, tiny_model):
    """The upload checks servability as the Hub upload does (hpc_finetune.merge.adapter.check_servable_adapter):
    at config time for the rank, and in the stage for the adapter's own config."""
    outputs(tmp_path)
    make_adapter(tiny_model, tmp_path / "adapters", use_dora=True)
    with pytest.raises(StageError, match=r"adapter .*adapters would be published but vLLM cannot serve it: DoRA.*"
                                         r"publish the merged model only \(upload.include: \[merged\]\)"):
        upload.main(config(tmp_path, s3_server, prefix="dora"))
    for key in ("dora/merged/config.json", "dora/manifest.json"):  # nothing was sent, not even the merged model
        with pytest.raises(ClientError, match="404|Not Found"):
            client.head_object(Bucket=BUCKET, Key=key)
    demo = yaml.safe_load((REPO / "config.yaml").read_text()) | {"training": {"lora_r": 1024}}
    with pytest.raises(ConfigError, match=r"training.lora_r: 1024 .* upload.include sends the adapter"):
        resolve_config(demo | {"upload": {"bucket": "s3://models/x"}})
    resolve_config(demo | {"upload": {"bucket": "s3://models/x", "include": ["merged"]}})
