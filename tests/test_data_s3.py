"""Datasets in buckets (dataset.path s3://...) on moto's S3 server with its signature and policy checks: a file and
a prefix of parquet shards with train/validation splits are fetched into a cache named after the objects' ETags,
read by the data stage (whose report records the origin), reused when unchanged and re-keyed when an object is
overwritten; each error names the bucket or key and the fix, and comes from the listing the workflow makes when
it starts."""

from __future__ import annotations

import io
import json

import fetch_dataset
import pytest
from hpc_finetune.data import remote
from hpc_finetune.data.source import read_source
from hpc_finetune.io.cli import StageError
from hpc_finetune.workflow.config import ConfigError
from hpc_finetune.workflow.dataset import dataset_input
from support.common import DEMO_DATA, REPO
from support.s3 import isolate_aws, moto_auth, s3_client, s3_key
from support.workflow import planned_jobs, run_workflow

BUCKET = "datasets"


@pytest.fixture(scope="module")
def keys(s3_server):
    """The bucket with a file and a prefix of shards; a key that may read buckets, one that may only get objects."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    reader = s3_key(s3_server, "dataset-reader", ["s3:ListBucket", "s3:GetObject"], ["arn:aws:s3:::*"])
    getter = s3_key(s3_server, "dataset-getter", ["s3:GetObject"], [f"arn:aws:s3:::{BUCKET}/*"])
    client = s3_client(s3_server)
    client.create_bucket(Bucket=BUCKET)
    client.put_object(Bucket=BUCKET, Key="medical/qa.jsonl", Body=DEMO_DATA.read_bytes())
    rows = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(12)]
    for key, part in [("shards/data/train-00000-of-00002.parquet", rows[:5]),
                      ("shards/data/train-00001-of-00002.parquet", rows[5:10]),
                      ("shards/data/validation-00000-of-00001.parquet", rows[10:])]:
        body = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(part), body)
        client.put_object(Bucket=BUCKET, Key=key, Body=body.getvalue())
    client.put_object(Bucket=BUCKET, Key="shards/_SUCCESS", Body=b"")
    client.put_object(Bucket=BUCKET, Key="empty/README.md", Body=b"# no data here\n")
    moto_auth(s3_server, "0")
    yield {"reader": reader, "getter": getter}
    moto_auth(s3_server, "inf")


@pytest.fixture
def reader(keys, tmp_path, monkeypatch):
    isolate_aws(monkeypatch, tmp_path, AWS_ACCESS_KEY_ID=keys["reader"]["AccessKeyId"],
                AWS_SECRET_ACCESS_KEY=keys["reader"]["SecretAccessKey"])
    return keys["reader"]


def overwrite(endpoint: str, key: str, body: bytes) -> None:
    """Another writer replaces an object (checks off for a moment: the reader's key may not write)."""
    moto_auth(endpoint, "inf")
    s3_client(endpoint).put_object(Bucket=BUCKET, Key=key, Body=body)
    moto_auth(endpoint, "0")


def fetch(url: str, endpoint: str, root, **overrides) -> tuple[remote.Listing, dict]:
    """What the workflow does: list when it starts, then the fetch stage into the cache it names."""
    listing = remote.list_s3(url, endpoint, "us-east-1")
    cache = listing.cache(str(root))
    cfg = fetch_dataset.Config(source=url, output=overrides.get("output", cache), record_out=f"{cache}.json",
                               endpoint=endpoint)
    return listing, fetch_dataset.main(cfg)


def test_a_file_is_fetched_reused_and_rekeyed_when_overwritten(reader, s3_server, tmp_path, run):
    listing, record = fetch("s3://datasets/medical/qa.jsonl", s3_server, tmp_path / "cache")
    path = tmp_path / "cache" / "s3" / BUCKET / listing.digest / "qa.jsonl"
    assert listing.data_path(str(tmp_path / "cache")) == str(path)
    assert path.read_bytes() == DEMO_DATA.read_bytes()
    assert record["downloaded_files"] == 1 and record["objects"] == [
        {"key": "medical/qa.jsonl", "etag": listing.objects[0]["etag"], "bytes": len(DEMO_DATA.read_bytes()),
         "path": "qa.jsonl"}]
    assert json.loads((path.parent.parent / f"{listing.digest}.json").read_text()) == record
    assert not [p for p in path.parent.parent.iterdir() if ".partial" in p.name]

    _, again = fetch("s3://datasets/medical/qa.jsonl", s3_server, tmp_path / "cache")
    assert again["downloaded_files"] == 0 and again["downloaded_bytes"] == 0  # the cache is complete: reused

    report = run(str(path), origin=f"{path.parent}.json")
    assert report["origin"] == {"source": "s3://datasets/medical/qa.jsonl", "endpoint": s3_server,
                                "digest": listing.digest, "objects": [{k: record["objects"][0][k] for k in
                                                                       ("key", "etag", "bytes")}]}

    overwrite(s3_server, "medical/qa.jsonl", DEMO_DATA.read_bytes()[:-200])
    changed = remote.list_s3("s3://datasets/medical/qa.jsonl", s3_server, "us-east-1")
    assert changed.digest != listing.digest  # another cache directory: the data stage's input changes
    with pytest.raises(StageError, match="changed since Snakemake listed them .*start Snakemake again"):
        fetch("s3://datasets/medical/qa.jsonl", s3_server, tmp_path / "cache",
              output=str(tmp_path / "cache" / "s3" / BUCKET / listing.digest))
    overwrite(s3_server, "medical/qa.jsonl", DEMO_DATA.read_bytes())


def test_a_prefix_of_parquet_shards_keeps_its_splits(reader, s3_server, tmp_path):
    listing, record = fetch("s3://datasets/shards", s3_server, tmp_path / "cache")  # the trailing / is optional
    assert [o["path"] for o in listing.objects] == [
        "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
        "data/validation-00000-of-00001.parquet"]  # _SUCCESS is no data file
    assert record["downloaded_files"] == 3
    source = read_source(listing.data_path(str(tmp_path / "cache")), "train", "auto")
    assert (source.split, source.eval_split, len(source.rows), len(source.eval_rows)) == ("train", "validation", 10, 2)


def test_the_workflow_lists_when_it_starts_and_jobs_reuse_its_listing(reader, s3_server, tmp_path):
    cfg = {"dataset": {"path": "s3://datasets/medical/qa.jsonl", "s3_endpoint": s3_server, "s3_region": "us-east-1",
                       "cache_dir": "resources/datasets"}}
    state = str(tmp_path / "state")
    planned = dataset_input(cfg, state)
    assert planned.inputs == [planned.fetch["output"]] and planned.path.endswith("/qa.jsonl")
    assert planned.origin == planned.fetch["record"] == planned.fetch["output"] + ".json"
    # a job's own Snakemake process (on a compute node, maybe without network) plans what the main one planned
    offline = {"dataset": {**cfg["dataset"], "s3_endpoint": s3_server}}
    assert dataset_input(offline, state, main_process=False) == planned
    with pytest.raises(ConfigError, match="no listing of s3://datasets/medical/qa.jsonl from the main Snakemake"):
        dataset_input(offline, str(tmp_path / "elsewhere"), main_process=False)
    local = dataset_input({"dataset": {"path": str(DEMO_DATA)}}, state)
    assert (local.path, local.inputs, local.fetch) == (str(DEMO_DATA), [str(DEMO_DATA)], None)


@pytest.mark.parametrize(("url", "message"), [
    ("s3://nosuchbucket/qa.jsonl", r"list s3://nosuchbucket/qa.jsonl failed .*NoSuchBucket.*check the s3:// URL and "
                                   "the endpoint"),
    ("s3://datasets/medical/missing.jsonl", r"no object s3://datasets/medical/missing.jsonl and nothing under "
                                            r"s3://datasets/medical/missing.jsonl/ \(NoSuchKey: check the path"),
    ("s3://datasets/empty/", r"no data files under s3://datasets/empty/ \(looked for .json/.jsonl/.csv/.parquet/"
                             r".arrow files.*empty/README.md"),
])
def test_listing_errors_name_the_bucket_key_and_fix(reader, s3_server, tmp_path, url, message):
    cfg = {"dataset": {"path": url, "s3_endpoint": s3_server, "s3_region": "us-east-1", "cache_dir": "c"}}
    with pytest.raises(ConfigError, match=message):
        dataset_input(cfg, str(tmp_path))


def test_credential_and_endpoint_errors(keys, s3_server, tmp_path, monkeypatch):
    url = "s3://datasets/medical/qa.jsonl"
    getter = keys["getter"]
    isolate_aws(monkeypatch, tmp_path, AWS_ACCESS_KEY_ID=getter["AccessKeyId"],
                AWS_SECRET_ACCESS_KEY=getter["SecretAccessKey"], AWS_MAX_ATTEMPTS="1")
    with pytest.raises(StageError, match=r"list s3://datasets/medical/qa.jsonl failed \(ListObjectsV2\): HTTP 403 "
                                         r"AccessDenied: .*check the bucket policy"):
        remote.list_s3(url, s3_server, "us-east-1")  # s3:GetObject alone cannot list
    isolate_aws(monkeypatch, tmp_path, AWS_ACCESS_KEY_ID=keys["reader"]["AccessKeyId"],
                AWS_SECRET_ACCESS_KEY=keys["reader"]["SecretAccessKey"])
    listing = remote.list_s3(url, s3_server, "us-east-1")
    isolate_aws(monkeypatch, tmp_path)  # the fetch finds no credentials: it goes anonymous, the store refuses
    with pytest.raises(StageError, match=r"download s3://datasets/medical/qa.jsonl failed .*HTTP 403.*no credentials "
                                         "were found, so the request went anonymous: set AWS_ACCESS_KEY_ID/"):
        remote.fetch(listing, tmp_path / "cache" / listing.digest, s3_server, "us-east-1")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())  # no half cache
    isolate_aws(monkeypatch, tmp_path, AWS_ACCESS_KEY_ID="only-half")
    with pytest.raises(StageError, match="incomplete credentials .*AWS_SECRET_ACCESS_KEY"):
        remote.list_s3(url, s3_server, "us-east-1")
    isolate_aws(monkeypatch, tmp_path, AWS_ACCESS_KEY_ID="a", AWS_SECRET_ACCESS_KEY="b", AWS_MAX_ATTEMPTS="1")
    with pytest.raises(StageError, match=r"list s3://datasets/medical/qa.jsonl failed: .*is http://127.0.0.1:9 "
                                         "reachable from this node"):
        remote.list_s3(url, "http://127.0.0.1:9", "us-east-1")
    with pytest.raises(StageError, match=r"no fetcher for 'file'"):
        fetch_dataset.main(fetch_dataset.Config(source="file:///x", output="o", record_out="r"))


def test_the_workflow_fetches_once_and_prepares_the_data_again_after_an_overwrite(reader, s3_server, tmp_path):
    """Snakemake on the demo config with the dataset in a bucket: fetch_dataset runs on the host, before the data
    stage; nothing runs again while the objects stay; an overwritten object plans a new fetch and prepare_data.
    One short real run (fetch, demo model, data stage: ~10 s) so that the plan after the overwrite is a re-run."""
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    args = ("--config", "dataset__path=s3://datasets/medical/qa.jsonl", f"dataset__s3_endpoint={s3_server}")
    report = "results/demo/data/report.json"
    assert {"fetch_dataset", "prepare_data", "build_demo_model"} <= planned_jobs(run_workflow(tmp_path, "-n", *args))
    run_workflow(tmp_path, report, *args)
    origin = json.loads((tmp_path / report).read_text())["origin"]
    assert origin["source"] == "s3://datasets/medical/qa.jsonl" and origin["objects"][0]["key"] == "medical/qa.jsonl"
    assert planned_jobs(run_workflow(tmp_path, "-n", report, *args)) == set()
    overwrite(s3_server, "medical/qa.jsonl", DEMO_DATA.read_bytes()[:-300])
    try:
        assert {"fetch_dataset", "prepare_data"} <= planned_jobs(run_workflow(tmp_path, "-n", report, *args))
    finally:
        overwrite(s3_server, "medical/qa.jsonl", DEMO_DATA.read_bytes())
    failed = run_workflow(tmp_path, "-n", "--config", "dataset__path=s3://datasets/medical/nothing.jsonl",
                          f"dataset__s3_endpoint={s3_server}", check=False)
    assert failed.returncode != 0 and "Dataset not readable (fix it before anything runs):" in failed.stderr
    assert "no object s3://datasets/medical/nothing.jsonl" in failed.stderr
