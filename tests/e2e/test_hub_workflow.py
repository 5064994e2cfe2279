"""The finished demo published to the Hub-protocol server through Snakemake (the real huggingface_hub client in
the hub_upload rule), read back with snapshot_download and checked file by file against the run's manifest."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from support.workflow import planned_jobs, run_workflow

SECRET = "hf_hubUploadSecretThatNoFileMayHold987"


def test_the_demo_goes_to_the_hub_and_comes_back_byte_exact(demo, run_dir, hub_endpoint, tmp_path, monkeypatch):
    from huggingface_hub import constants, snapshot_download

    endpoint, state = hub_endpoint
    state.add_token(SECRET, "demo-user", "write", ("demo-org",))
    env = {"HF_TOKEN": SECRET, "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
           "TRANSFORMERS_OFFLINE": "0"}
    args = ("--config", "hub_upload__repo_id=demo-org/medqa", "hub_upload__retry_wait_s=0.1")
    assert planned_jobs(run_workflow(demo, "--dry-run", *args)) == {"hub_upload", "all"}  # nothing else re-runs
    started = time.time()
    run_workflow(demo, *args, env=env)
    upload_s = time.time() - started
    record = json.loads((run_dir / "hub_upload.json").read_text())
    assert [r["repo"] for r in record["repos"]] == ["demo-org/medqa", "demo-org/medqa-merged"]

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    manifest = {a["path"]: a["sha256"] for a in json.loads((run_dir / "manifest.json").read_text())["artifacts"]}
    started = time.time()
    for repo, directory in zip(record["repos"], ("adapters", "merged"), strict=True):
        local = Path(snapshot_download(repo["repo"], revision=repo["commit"], cache_dir=tmp_path / "cache",
                                       endpoint=endpoint, token=SECRET))
        got = {p.relative_to(local).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
               for p in local.rglob("*") if p.is_file()}
        expected = {path.removeprefix(f"{directory}/"): digest for path, digest in manifest.items()
                    if path.startswith(f"{directory}/") and not path.endswith(("/README.md", "/training_args.bin"))}
        assert {k: v for k, v in got.items() if k not in ("README.md", ".gitattributes")} == expected
        assert got["README.md"] == next(f["sha256"] for f in repo["files"] if f["path"] == "README.md")
        assert "| held-out loss | 9.5" in (local / "README.md").read_text()
    download_s = time.time() - started
    print(f"\ndemo through the test Hub: upload (snakemake, 2 repositories) {upload_s:.1f} s, "
          f"download (snapshot_download) {download_s:.1f} s, {state.received['lfs_bytes'] / 2**20:.1f} MiB of LFS")

    sent = dict(state.received)
    assert planned_jobs(run_workflow(demo, "--dry-run", *args)) == set()
    run_workflow(demo, *args, "--forcerun", "hub_upload", env=env)
    assert state.received == sent  # a second upload sends nothing
    changed = ("--config", "hub_upload__repo_id=demo-org/medqa", "hub_upload__revision=v2",
               "hub_upload__retry_wait_s=0.1")
    assert planned_jobs(run_workflow(demo, "--dry-run", *changed)) == {"hub_upload", "all"}  # settings re-run it alone

    leaks = [str(p) for p in demo.rglob("*") if p.is_file() and not p.is_symlink() and SECRET.encode() in p.read_bytes()]
    assert leaks == [] and os.environ.get("HF_TOKEN") != SECRET
