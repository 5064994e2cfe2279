"""model.source hub, continued: the token is never written anywhere (cache, logs, records, git config), every
failure has a clear error with the fix, and Snakemake re-runs the model stage when asked to follow a moved
branch."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import prepare_model
import pytest
from hpc_finetune.hub import snapshot as hub_cache
from hpc_finetune.io.cli import StageError
from hpc_finetune.workflow.config import ConfigError, resolve_config
from support.common import REPO
from support.hub import (
    MODEL_ID,
    SECRET,
    config,
    model_root,
    script_env,
    stage_command,
)
from support.lfs_server import LfsServer

pytestmark = pytest.mark.usefixtures("info_logs")  # the stage's log lines, for the assertions on them


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
    with pytest.raises(ConfigError, match=re.escape(expected)):
        resolve_config({"run_name": "hub", "model": model})


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
