"""model.source hub: the git-lfs model cache against real remotes built here (a bare repository on file:// and
a loopback HTTP hub that requires a token), with real git and git-lfs. Covers the first clone and its reuse
without network, pins (branch, tag, commit), repair of interrupted or damaged caches, concurrent runs, the
token never being written anywhere, the errors, and what Snakemake re-runs when the commit moves."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import helpers
import hub_cache
import make_lfs_remote
import prepare_model
import pytest
from common import StageError
from conftest import REPO, SCRIPTS
from lfs_server import LfsServer

MODEL_ID = "demo/tiny-llama"
SECRET = "hf_hubTestTokenThatMustNeverBeWritten42"


@pytest.fixture(autouse=True)
def info_logs(caplog):
    caplog.set_level(logging.INFO, logger="finetune")


# --- a hub holding the demo model ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def upload(tiny_model, tmp_path_factory) -> Path:
    """The demo model's files as a hub repository has them, with weight duplicates that must not be fetched."""
    directory = tmp_path_factory.mktemp("upload") / "model"
    shutil.copytree(tiny_model, directory)
    (directory / "pytorch_model.bin").write_bytes(os.urandom(40_000))
    (directory / "original").mkdir()
    (directory / "original" / "consolidated.00.pth").write_bytes(os.urandom(30_000))
    (directory / "original" / "params.json").write_text('{"dim": 64}\n')
    return directory


class Hub:
    """A hub directory with the demo model at {root}/demo/tiny-llama (main, tag v1)."""

    def __init__(self, root: Path, upload: Path):
        self.root, self.upload = root, upload
        self.remote = root / MODEL_ID
        self.url = root.as_uri()
        self.commits = [self.publish(upload, tag="v1")]

    def publish(self, directory: Path, tag: str | None = None) -> str:
        cfg = make_lfs_remote.Config(model_dir=str(directory), remote=str(self.remote), tag=tag)
        return make_lfs_remote.main(cfg)["commit"]

    def advance(self, tmp_path: Path) -> str:
        """A new commit on main: generation_config.json changes, the weights stay."""
        changed = Path(shutil.copytree(self.upload, tmp_path / f"upload-{len(self.commits)}"))
        config = json.loads((changed / "generation_config.json").read_text())
        (changed / "generation_config.json").write_text(json.dumps({**config, "temperature": 0.1 * len(self.commits)}))
        self.commits.append(self.publish(changed))
        return self.commits[-1]


@pytest.fixture(scope="session")
def shared_hub(upload, tmp_path_factory) -> Hub:
    return Hub(tmp_path_factory.mktemp("hub"), upload)


@pytest.fixture
def hub(upload, tmp_path) -> Hub:
    """A hub of the test's own, for tests that change the remote."""
    return Hub(tmp_path / "hub", upload)


def config(hub_url: str, tmp_path: Path, **options) -> prepare_model.Config:
    options = {"model_id": MODEL_ID, "model_cache_dir": str(tmp_path / "cache"), "min_free_gb": 0.0} | options
    return prepare_model.Config(output=str(tmp_path / "model.json"), source="hub", hub_url=hub_url, **options)


def fetch(hub: Hub, tmp_path: Path, **options) -> dict:
    return prepare_model.main(config(hub.url, tmp_path, **options))


def model_root(tmp_path: Path) -> Path:
    return tmp_path / "cache" / MODEL_ID


def lfs_object(tmp_path: Path, path: Path) -> Path:
    oid = hub_cache.parse_pointer(subprocess.run(
        ["git", "show", f"HEAD:{path.name}"], cwd=path.parent, capture_output=True, check=True
    ).stdout)[0]
    return model_root(tmp_path) / "lfs" / "objects" / oid[:2] / oid[2:4] / oid


def git_lfs_fsck(directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "lfs", "fsck", "--objects"], cwd=directory, capture_output=True, text=True)


def script_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    return env | {"PYTHONPATH": str(SCRIPTS)} | extra


def stage_command(cfg: prepare_model.Config) -> list[str]:
    """The stage as the workflow runs it: a process of its own with `--name value` arguments."""
    args = [str(SCRIPTS / "prepare_model.py")]
    for name, value in vars(cfg).items():
        text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        args += [f"--{name.replace('_', '-')}", text]
    return [sys.executable, *args]


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


# --- the token ---------------------------------------------------------------------------------------------------


def command_lines() -> list[bytes]:
    lines = []
    for proc in Path("/proc").iterdir():
        try:
            lines.append((proc / "cmdline").read_bytes())
        except OSError:
            pass
    return lines


def files_containing(root: Path, secret: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and secret in p.read_bytes()]


def test_the_token_reaches_the_hub_and_nothing_else(hub, tmp_path):
    """HF_TOKEN is sent as a header to a hub that refuses requests without it, and appears in no process
    argument, no file of the cache or the outputs, and no log."""
    with LfsServer(hub.root, SECRET) as server:
        cfg = config(server.url, tmp_path)
        proc = subprocess.Popen(stage_command(cfg), env=script_env(HF_TOKEN=SECRET),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        seen_in_argv = False
        while proc.poll() is None:
            seen_in_argv |= any(SECRET.encode() in line for line in command_lines())
            time.sleep(0.005)
        log = proc.communicate()[0]
        assert proc.returncode == 0, log.decode()
        # The same through a token file (and an update, so that the hub is asked again).
        (tmp_path / "token").write_text(SECRET + "\n")
        file_cfg = config(server.url, tmp_path, token_file=str(tmp_path / "token"), update=True)
        file_log = subprocess.run(stage_command(file_cfg), env=script_env(), capture_output=True)
        assert file_log.returncode == 0, file_log.stderr.decode()
    assert not seen_in_argv
    paths = {path for _, path, _ in server.requests}
    assert any("info/refs" in p for p in paths) and any("/info/lfs/objects/batch" in p for p in paths)
    assert any(p.startswith("/lfs-objects/") for p in paths)
    assert all(ok for _, _, ok in server.requests)  # git, the LFS API and the downloads all got the header
    assert SECRET.encode() not in log + file_log.stdout + file_log.stderr
    assert files_containing(tmp_path / "cache", SECRET.encode()) == []
    assert SECRET not in (tmp_path / "model.json").read_text()
    snapshot = model_root(tmp_path) / "snapshots" / hub.commits[0]
    assert server.url in (snapshot / ".git" / "config").read_text()  # the remote, without any credential


def test_gated_model_without_or_with_a_wrong_token(hub, tmp_path, monkeypatch):
    with LfsServer(hub.root, SECRET) as server:
        with pytest.raises(StageError) as err:
            prepare_model.main(config(server.url, tmp_path))
        monkeypatch.setenv("HF_TOKEN", "hf_wrongToken")
        with pytest.raises(StageError) as wrong:
            prepare_model.main(config(server.url, tmp_path))
    for message in (str(err.value), str(wrong.value)):
        assert MODEL_ID in message and "gated" in message and "HF_TOKEN" in message and "model.token_file" in message
    assert "no token is set" in str(err.value) and "hf_wrongToken" not in str(wrong.value)


# --- clear errors ------------------------------------------------------------------------------------------------


def expect_error(cfg: prepare_model.Config, *parts: str) -> str:
    with pytest.raises(StageError) as err:
        prepare_model.main(cfg)
    message = str(err.value)
    for part in parts:
        assert part in message, message
    assert not Path(cfg.output).exists()
    return message


def test_missing_model(shared_hub, tmp_path):
    expect_error(config(shared_hub.url, tmp_path, model_id="demo/no-such-model"), "demo/no-such-model",
                 "does not exist or refuses access", "model.model_id")


def test_unknown_revision(shared_hub, tmp_path):
    message = expect_error(config(shared_hub.url, tmp_path, revision="no-such-branch"), MODEL_ID,
                           "'no-such-branch' is not a branch, tag or commit", "set model.revision")
    assert "branches: main" in message and "tags: v1" in message
    expect_error(config(shared_hub.url, tmp_path, revision="deadbeef00"), "'deadbeef00' is not a branch")
    expect_error(config(shared_hub.url, tmp_path, revision="0" * 40), "is not a branch, tag or commit")


def test_git_lfs_not_installed(shared_hub, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "git").symlink_to(shutil.which("git"))
    monkeypatch.setenv("PATH", str(bin_dir))
    expect_error(config(shared_hub.url, tmp_path), MODEL_ID, "git-lfs is not installed", "install it")


def test_cache_directory_not_writable(shared_hub, tmp_path):
    (tmp_path / "a-file").write_text("")
    expect_error(config(shared_hub.url, tmp_path, model_cache_dir=str(tmp_path / "a-file" / "cache")), MODEL_ID,
                 "is not writable", "model.model_cache_dir")


def test_not_enough_disk_space_is_known_before_downloading(shared_hub, tmp_path):
    message = expect_error(config(shared_hub.url, tmp_path, min_free_gb=1e9), MODEL_ID, "not enough disk space",
                           "read from the LFS pointers", "model.model_cache_dir")
    weights = (shared_hub.upload / "model.safetensors").stat().st_size
    tokenizer = (shared_hub.upload / "tokenizer.json").stat().st_size
    assert f"needs {hub_cache.human(weights + tokenizer)}" in message
    assert not list((model_root(tmp_path) / "lfs" / "objects").rglob("*"))


def test_a_hub_model_without_tokenizer_is_named(hub, tmp_path):
    broken = Path(shutil.copytree(hub.upload, tmp_path / "no-tokenizer"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (broken / name).unlink()
    hub.publish(broken)
    expect_error(config(hub.url, tmp_path), f"hub model {MODEL_ID}@main", "no tokenizer")


def test_bad_token_file(shared_hub, tmp_path):
    expect_error(config(shared_hub.url, tmp_path, token_file=str(tmp_path / "missing")), "model.token_file",
                 "cannot be read")
    (tmp_path / "two").write_text("hf_one hf_two\n")
    expect_error(config(shared_hub.url, tmp_path, token_file=str(tmp_path / "two")), "write the token alone")


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ({"source": "hub"}, "model.model_id: required"),
        ({"source": "hub", "model_id": "gpt2"}, "is not a hub id org/name"),
        ({"source": "hub", "model_id": "../etc"}, "is not a hub id org/name"),
        ({"source": "hub", "model_id": "a/b", "hub_url": "https://user:hf_x@huggingface.co"}, "holds credentials"),
        ({"source": "hub", "model_id": "a/b", "hub_url": "ssh://host/x"}, "is not an https://"),
    ],
)
def test_hub_configuration_is_checked_before_any_job(model, expected):
    with pytest.raises(helpers.ConfigError, match=re.escape(expected)):
        helpers.resolve_config({"run_name": "hub", "model": model})


# --- what Snakemake re-runs --------------------------------------------------------------------------------------


def test_snakemake_reruns_later_stages_only_when_the_commit_changes(hub, tmp_path):
    """The model stage's record changes only with the commit, so the data stage (standing for every stage after
    it) re-runs only then; an upstream change does nothing until an update is asked for."""
    workdir = tmp_path / "project"
    workdir.mkdir()
    shutil.copytree(REPO / "data", workdir / "data")
    (workdir / "config.yaml").write_text(
        "run_name: hub\nmodel:\n  source: hub\n  model_id: demo/tiny-llama\n"
        f"  hub_url: {hub.url}\n  model_cache_dir: {tmp_path / 'cache'}\n  min_free_gb: 0\n"
    )
    target = "results/hub/data/report.json"

    def snakemake(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--cores", "1", *args],
            cwd=workdir, capture_output=True, text=True,
            env=os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout + result.stderr

    def planned() -> set[str]:
        text = snakemake("-n", target)
        rules = set() if "Nothing to be done" in text else set(re.findall(r"^rule (\w+):", text, re.M))
        print(rules, re.findall(r"reason: .*", text))  # shown when an assertion fails
        return rules

    snakemake(target)
    record = workdir / "results" / "hub" / "model" / "model.json"
    assert json.loads(record.read_text())["commit"] == hub.commits[0]
    update = ("--forcerun", "model", "--until", "model", "--config", "model__update=true")
    snakemake(*update)  # asked for an update, the hub has nothing new: the record is the same
    assert planned() == set()
    hub.advance(tmp_path)
    assert planned() == set()  # upstream moved: nothing to do until asked
    snakemake(*update)
    assert json.loads(record.read_text())["commit"] == hub.commits[1]
    assert planned() == {"prepare_data"}
