"""model.source hub: the git-lfs model cache against real remotes built here (a bare repository on file:// and
a loopback HTTP hub that requires a token), with real git and git-lfs. Covers the first clone and its reuse
without network, pins (branch, tag, commit), repair of interrupted or damaged caches and concurrent runs; the
token, the errors and what Snakemake re-runs are in test_model_hub_errors.py."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import prepare_model
import pytest
from hpc_finetune.hub import snapshot as hub_cache
from hpc_finetune.io.cli import StageError
from support.hub import (
    SECRET,
    Hub,
    config,
    fetch,
    git_lfs_fsck,
    lfs_object,
    model_root,
    script_env,
    stage_command,
)
from support.lfs_server import LfsServer

pytestmark = pytest.mark.usefixtures("info_logs")  # the stage's log lines, for the assertions on them


# --- first clone, reuse, pins ----------------------------------------------------------------------------------


def test_first_clone_fetches_only_what_the_loader_reads(shared_hub, tiny_model, tmp_path):
    record = fetch(shared_hub, tmp_path)
    snapshot = Path(record["path"])
    assert snapshot == model_root(tmp_path) / "snapshots" / shared_hub.commits[0]
    assert record["commit"] == shared_hub.commits[0] and record["revision"] == "main"
    assert record["num_parameters"] == prepare_model.check_model_dir(tiny_model)["num_parameters"]
    assert (snapshot / "model.safetensors").read_bytes() == (tiny_model / "model.safetensors").read_bytes()
    assert (snapshot / "tokenizer.json").read_bytes() == (tiny_model / "tokenizer.json").read_bytes()
    assert os.path.samefile(snapshot / "model.safetensors", lfs_object(tmp_path, snapshot / "model.safetensors"))
    # The .bin and .pth duplicates stay on the hub: no object, no pointer file.
    assert not (snapshot / "pytorch_model.bin").exists() and not (snapshot / "original" / "consolidated.00.pth").exists()
    assert (snapshot / "original" / "params.json").is_file()
    objects = list((model_root(tmp_path) / "lfs" / "objects").rglob("*"))
    assert len([p for p in objects if p.is_file()]) == 2  # model.safetensors, tokenizer.json
    assert git_lfs_fsck(snapshot).returncode == 0
    assert (model_root(tmp_path) / "refs" / "main").read_text().strip() == shared_hub.commits[0]


def test_complete_cache_is_reused_without_network(hub, tmp_path, caplog):
    first = fetch(hub, tmp_path)
    written = (tmp_path / "model.json").read_bytes()
    hub.remote.rename(hub.remote.with_name("gone"))  # the hub is unreachable now
    caplog.clear()
    assert fetch(hub, tmp_path) == first
    assert (tmp_path / "model.json").read_bytes() == written  # same bytes: Snakemake's checksum sees no change
    assert "complete in the cache, nothing downloaded" in caplog.text and "cloning" not in caplog.text
    assert fetch(hub, tmp_path, revision=hub.commits[0])["path"] == first["path"]  # a SHA pin needs no network


def test_pins_to_tag_commit_and_abbreviated_commit(hub, tmp_path, caplog):
    second = hub.advance(tmp_path)
    assert fetch(hub, tmp_path, revision="v1")["commit"] == hub.commits[0]
    assert fetch(hub, tmp_path)["commit"] == second
    caplog.clear()
    by_sha = fetch(hub, tmp_path, revision=hub.commits[0])
    assert by_sha["commit"] == hub.commits[0] and "cloning" not in caplog.text
    assert fetch(hub, tmp_path, revision=second[:10])["commit"] == second
    snapshots = sorted(p.name for p in (model_root(tmp_path) / "snapshots").iterdir())
    assert snapshots == sorted(hub.commits)
    # Both snapshots share the weights: one object, linked into each.
    a, b = (model_root(tmp_path) / "snapshots" / c / "model.safetensors" for c in hub.commits)
    assert os.path.samefile(a, b)


def test_branch_pin_holds_until_an_update_is_asked_for(hub, tmp_path, caplog):
    first = fetch(hub, tmp_path)
    second = hub.advance(tmp_path)
    assert fetch(hub, tmp_path) == first  # upstream moved: nothing changes
    caplog.clear()
    updated = fetch(hub, tmp_path, update=True)
    assert updated["commit"] == second and f"the pin moves from {first['commit']} to {second}" in caplog.text
    assert fetch(hub, tmp_path)["commit"] == second  # the cache's pin moved for later runs too
    assert Path(first["path"]).is_dir()  # the old snapshot stays for runs that pinned it


def test_models_of_two_orgs_with_the_same_name_do_not_collide(shared_hub, upload, tmp_path):
    other = Hub(tmp_path / "other-hub", upload)
    shutil.move(other.root / "demo", other.root / "other-org")
    a = fetch(shared_hub, tmp_path)
    b = fetch(other, tmp_path, model_id="other-org/tiny-llama")
    assert Path(a["path"]).parts[-4:-2] == ("demo", "tiny-llama")
    assert Path(b["path"]).parts[-4:-2] == ("other-org", "tiny-llama")


# --- repair ----------------------------------------------------------------------------------------------------


def remove_object_and_file(snapshot: Path, tmp_path: Path) -> None:
    obj = lfs_object(tmp_path, snapshot / "model.safetensors")
    obj.unlink()
    (snapshot / "model.safetensors").unlink()


def corrupt_object(snapshot: Path, tmp_path: Path) -> None:
    obj = lfs_object(tmp_path, snapshot / "model.safetensors")
    size = obj.stat().st_size
    obj.unlink()  # a new file: the hub's object (hard-linked by git-lfs on file://) stays intact
    obj.write_bytes(os.urandom(size))


def replace_working_file(snapshot: Path, tmp_path: Path) -> None:
    weights = snapshot / "model.safetensors"
    size = weights.stat().st_size
    weights.unlink()
    weights.write_bytes(b"\0" * size)


def damage_plain_files(snapshot: Path, tmp_path: Path) -> None:
    (snapshot / "config.json").unlink()
    (snapshot / "tokenizer_config.json").write_text("{}")


def interrupted_clone(snapshot: Path, tmp_path: Path) -> None:
    """What a clone killed before its checkout leaves: a half-made .incoming and no snapshot."""
    shutil.rmtree(snapshot)
    incoming = model_root(tmp_path) / ".incoming"
    (incoming / ".git" / "objects").mkdir(parents=True)
    (incoming / ".git" / "HEAD").write_text("ref: refs/heads/main\n")


def broken_checkout(snapshot: Path, tmp_path: Path) -> None:
    shutil.rmtree(snapshot / ".git" / "objects")
    (snapshot / "model.safetensors").unlink()


def partial_download(snapshot: Path, tmp_path: Path) -> None:
    """A fetch killed mid-object: a truncated temporary file and no object, plus the lock file it held."""
    obj = lfs_object(tmp_path, snapshot / "model.safetensors")
    incomplete = model_root(tmp_path) / "lfs" / "incomplete"
    incomplete.mkdir(exist_ok=True)
    (incomplete / obj.name).write_bytes(obj.read_bytes()[:1000])
    obj.unlink()
    (model_root(tmp_path) / ".lock").write_text("node042 pid 4242\n")


@pytest.mark.parametrize(
    "damage",
    [remove_object_and_file, corrupt_object, replace_working_file, damage_plain_files, interrupted_clone,
     broken_checkout, partial_download],
)
def test_a_damaged_or_interrupted_cache_is_repaired(shared_hub, tmp_path, damage):
    first = fetch(shared_hub, tmp_path)
    snapshot = Path(first["path"])
    damage(snapshot, tmp_path)
    assert fetch(shared_hub, tmp_path) == first
    assert git_lfs_fsck(snapshot).returncode == 0
    assert os.path.samefile(snapshot / "model.safetensors", lfs_object(tmp_path, snapshot / "model.safetensors"))
    assert not (model_root(tmp_path) / ".incoming").exists()


def test_a_fetch_killed_mid_download_is_resumed_by_the_next_run(hub, tmp_path, monkeypatch):
    with LfsServer(hub.root, SECRET, stall_downloads=True) as server:
        cfg = config(server.url, tmp_path)
        proc = subprocess.Popen(stage_command(cfg), env=script_env(HF_TOKEN=SECRET), start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert server.download_started.wait(30), proc.communicate()[0]
        os.killpg(proc.pid, signal.SIGKILL)  # the stage and its git-lfs, mid-object
        proc.wait()
        server.stall_downloads = False
        server.release.set()
        snapshot = model_root(tmp_path) / "snapshots" / hub.commits[0]
        assert hub_cache.is_lfs_pointer(snapshot / "model.safetensors")  # cloned, weights not there yet
        monkeypatch.setenv("HF_TOKEN", SECRET)
        record = prepare_model.main(cfg)
    assert record["commit"] == hub.commits[0] and git_lfs_fsck(snapshot).returncode == 0


def waiting_on(path: Path) -> int:
    """Processes blocked on the flock of `path`, from the kernel's lock table."""
    inode = path.stat().st_ino
    lines = Path("/proc/locks").read_text().splitlines()
    return sum(1 for line in lines if " -> " in line and line.split()[-3].endswith(f":{inode}"))


def test_concurrent_runs_wait_for_each_other(shared_hub, tmp_path):
    root = model_root(tmp_path)
    root.mkdir(parents=True)
    outputs = [tmp_path / f"run{i}" for i in range(2)]
    with open(root / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a third party holds the model: both runs start and must wait
        procs = [
            subprocess.Popen(stage_command(config(shared_hub.url, out, model_cache_dir=str(tmp_path / "cache"))),
                             env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for out in outputs
        ]
        deadline = time.monotonic() + 60
        while waiting_on(root / ".lock") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert waiting_on(root / ".lock") == 2 and all(p.poll() is None for p in procs)
        fcntl.flock(lock, fcntl.LOCK_UN)
    logs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert all("waiting for" in log for log in logs)
    assert sum("cloning" in log for log in logs) == 1, logs  # one run fetched, the other reused its work
    records = [json.loads((out / "model.json").read_text()) for out in outputs]
    assert records[0] == records[1] and git_lfs_fsck(Path(records[0]["path"])).returncode == 0


def test_a_damaged_lfs_file_is_named_when_it_cannot_be_fetched_again(hub, tmp_path):
    """The cache checks every LFS file's sha256 on each run (git lfs fsck); a damaged one is set aside and fetched
    again. With the hub out of reach, the error names the file, the check it failed and the fix."""
    snapshot = Path(fetch(hub, tmp_path)["path"])
    obj = lfs_object(tmp_path, snapshot / "model.safetensors")
    data = obj.read_bytes()
    obj.unlink()  # a new file: the hub's object (hard-linked by git-lfs on file://) stays intact
    obj.write_bytes(data[: len(data) // 2])
    hub.remote.rename(hub.remote.with_name("gone"))
    with pytest.raises(StageError) as err:
        fetch(hub, tmp_path)
    message = str(err.value)
    assert re.search(r"model\.safetensors in \S+ failed its sha256 check \(git lfs fsck\)", message), message
    assert "fetching it again failed" in message and "Run the model stage again where the hub is reachable" in message
    hub.remote.with_name("gone").rename(hub.remote)
    fetch(hub, tmp_path)  # the hub is back: repaired
    assert git_lfs_fsck(snapshot).returncode == 0
