"""The container: singularity/finetune.def against the project's pins, the container stage's four image sources
(real SIF files made with Debian's siftool, a git-lfs parts repository on file://, downloads over file://,
http:// and from an S3-protocol server (moto) on loopback), and the seam that runs stages inside the image.

Apptainer cannot be installed here. Everything that would call it goes to a STAND-IN on PATH
(tests/container_standin.py) that records its arguments and environment and runs the inner command on the host.
These tests check the command lines, environment and binds the workflow gives the runtime; no container runs.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import container
import container_standin
import helpers
import pytest
import s3
from common import StageError, sha256_file
from conftest import REPO, moto_auth, planned_jobs, run_workflow, s3_key, s3_put

SIFTOOL = shutil.which("siftool")
pytestmark = pytest.mark.skipif(SIFTOOL is None, reason="needs Debian's siftool (apt-get install siftool)")
SECRET = "hf_containerTestTokenNeverInArgv0123456"
DEF = REPO / "singularity" / "finetune.def"


def pins(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def sections(text: str) -> dict[str, str]:
    """The def file's %sections by name; the header (Bootstrap/From) under ''."""
    parts = re.split(r"^%(\w+)[^\n]*\n", text, flags=re.M)
    return {"": parts[0], **{parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}}


# --- the definition file --------------------------------------------------------------------------------------


def test_the_def_installs_exactly_the_projects_pins():
    """One source of truth: the def copies singularity/requirements.txt into the image and installs it as is;
    no package version is written in the def itself (torch's pin is read from the list)."""
    text = DEF.read_text()
    sec = sections(text)
    files = [line.split() for line in sec["files"].splitlines() if line.strip()]
    assert ["singularity/requirements.txt", "/opt/finetune/requirements.txt"] in files
    post = sec["post"]
    assert re.search(r"pip install [^\n]*-r /opt/finetune/requirements\.txt", post)
    assert "grep -E '^torch==' /opt/finetune/requirements.txt" in post
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert not re.findall(r"\b[A-Za-z][\w.-]*==\d", code), "a version pinned in the def instead of the list"
    # the build fails when what pip installed differs from the list
    assert "installed versions differ from singularity/requirements.txt" in post
    # every package of the list that the stages import is imported by %test
    wanted = {line.partition("==")[0].lower() for line in pins(REPO / "singularity" / "requirements.txt")}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "safetensors"):
        assert name in wanted and re.search(rf"\b{name}\b", sec["test"]), name


def test_the_def_pins_its_base_and_sets_writable_caches_labels_test_and_runscript():
    sec = sections(DEF.read_text())
    base = re.search(r"^From:\s*(\S+)", sec[""], re.M).group(1)
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-[\w.-]+", base), base  # a CUDA image, pinned by full tag
    assert re.search(r"^Bootstrap:\s*docker", sec[""], re.M)
    for var in ("HF_HOME", "TRITON_CACHE_DIR", "XDG_CACHE_HOME"):
        assert re.search(rf"export {var}=\$\{{{var}:-/scratch/", sec["environment"]), var
    assert "{{ PROJECT_COMMIT }}" in sec["labels"] and "PROJECT_COMMIT=" in sec["arguments"]
    assert "finetune.version." in sec["post"]  # installed versions become labels
    assert "torch.cuda.is_available()" in sec["test"] and "import torch" in sec["test"]
    assert 'exec "$@"' in sec["runscript"]


# --- verification of SIF files --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sif(tmp_path_factory) -> Path:
    return container_standin.make_sif(tmp_path_factory.mktemp("sif") / "finetune.sif")


def test_a_real_sif_passes_and_its_header_is_read(sif):
    info = container.verify(sif, sha256_file(sif), "test")
    assert info["sif_version"] == "01" and info["descriptors"] == 1 and info["size"] == sif.stat().st_size
    listed = subprocess.run(["siftool", "list", str(sif)], capture_output=True, text=True, check=True).stdout
    assert "FS" in listed  # siftool itself reads the same file


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda data: data[: len(data) - 1000], "is truncated"),
        (lambda data: data[:20000], "is truncated"),
        (lambda data: b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n", "git-lfs pointer"),
        (lambda data: b"<html>403 Forbidden</html>" + bytes(200), "HTML/JSON error page"),
        (lambda data: b"hsqs" + bytes(300), "bare squashfs"),
        (lambda data: data[:32] + b"SIF_MAGIX" + data[41:], "not a SIF file"),
    ],
    ids=["truncated-end", "truncated-half", "lfs-pointer", "error-page", "squashfs", "bad-magic"],
)
def test_damaged_images_are_refused_with_the_reason(sif, tmp_path, damage, message):
    bad = tmp_path / "bad.sif"
    bad.write_bytes(damage(sif.read_bytes()))
    with pytest.raises(StageError, match=message):
        container.verify(bad, None, "test")


def test_a_corrupt_image_or_wrong_digest_is_refused(sif, tmp_path):
    corrupt = tmp_path / "corrupt.sif"
    data = bytearray(sif.read_bytes())
    data[-5000] ^= 0xFF  # a flipped bit in the data: the header is fine, the digest is not
    corrupt.write_bytes(bytes(data))
    container.sif_header(corrupt)
    with pytest.raises(StageError, match=r"has sha256 [0-9a-f]{64}, expected"):
        container.verify(corrupt, sha256_file(sif), "test")
    with pytest.raises(StageError, match="is not a sha256 digest"):
        container.normalise_digest("abc123", "container.sha256")


# --- sources: path and lfs ------------------------------------------------------------------------------------


def stage(tmp_path: Path, **options) -> dict:
    cfg = container.Config(output=str(tmp_path / "img" / "finetune.sif"),
                           record_out=str(tmp_path / "img" / "finetune.sif.json"), **options)
    return container.main(cfg)


def test_path_source_links_the_verified_image_and_records_its_digest(sif, tmp_path):
    record = stage(tmp_path, source="path", path=str(sif), sha256="sha256:" + sha256_file(sif).upper())
    out = tmp_path / "img" / "finetune.sif"
    assert out.is_symlink() and out.resolve() == sif.resolve()
    assert record["sha256"] == sha256_file(sif) and record["sha256_checked"]
    assert json.loads((tmp_path / "img" / "finetune.sif.json").read_text()) == json.loads(json.dumps(record))
    with pytest.raises(StageError, match="expected 0{64}"):
        stage(tmp_path / "wrong", source="path", path=str(sif), sha256="0" * 64)
    with pytest.raises(StageError, match="does not exist"):
        stage(tmp_path / "missing", source="path", path=str(tmp_path / "nope.sif"))


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


class PartsRepo:
    """A git-lfs repository on file:// that holds the image as parts (published with the project's script),
    next to an unrelated LFS file that the container stage must not fetch."""

    def __init__(self, root: Path):
        self.remote = root / "images.git"
        self.url = f"file://{self.remote}"
        self.work = root / "work"
        root.mkdir(parents=True)
        git(root, "init", "-q", "--bare", str(self.remote))
        git(root, "clone", "-q", self.url, str(self.work))
        (self.work / "other").mkdir()
        (self.work / "other" / "unrelated.bin").write_bytes(os.urandom(40000))
        git(self.work, "lfs", "install", "--local")
        git(self.work, "lfs", "track", "other/*.bin")
        git(self.work, "add", "-A")
        git(self.work, "commit", "-q", "-m", "unrelated")

    def publish(self, image: Path, tag: str | None = None) -> str:
        args = [sys.executable, str(REPO / "scripts" / "publish_image_lfs.py"), "--image", str(image),
                "--repo", str(self.work), "--part-size-mb", "0.02", "--push", "true"]
        subprocess.run(args + (["--tag", tag] if tag else []), check=True, capture_output=True, text=True)
        return git(self.work, "rev-parse", "HEAD")


@pytest.fixture
def parts_repo(sif, tmp_path) -> PartsRepo:
    repo = PartsRepo(tmp_path / "lfs")
    repo.publish(sif, tag="v1")
    return repo


def test_lfs_source_joins_the_parts_of_the_pinned_revision_and_records_the_commit(sif, parts_repo, tmp_path):
    commit = git(parts_repo.work, "rev-parse", "HEAD")
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "img" / "finetune.sif"
    record = container.from_lfs(
        container.Config(source="lfs", output=str(out), record_out="", lfs_url=parts_repo.url, lfs_revision="v1"),
        out, work)
    assert out.read_bytes() == sif.read_bytes() and record["parts"] > 3
    assert record["commit"] == commit and record["sha256"] == sha256_file(sif) and record["sha256_checked"]
    checked_out = {p.relative_to(work / "repo").as_posix() for p in (work / "repo").rglob("*")
                   if p.is_file() and ".git" not in p.parts}
    assert checked_out and all(p.startswith("containers/") for p in checked_out), checked_out  # sparse
    lfs_objects = list((work / "repo" / ".git" / "lfs" / "objects").rglob("*"))
    unrelated = sha256_file(parts_repo.work / "other" / "unrelated.bin")
    assert lfs_objects and unrelated not in {p.name for p in lfs_objects}  # the other LFS file was not fetched


def test_lfs_source_refuses_parts_that_do_not_match_their_digest(sif, parts_repo, tmp_path):
    part = parts_repo.work / "containers" / "finetune.sif.part-001"
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    git(parts_repo.work, "commit", "-q", "-am", "a corrupt part")
    git(parts_repo.work, "lfs", "push", "--all", "origin")
    git(parts_repo.work, "push", "-q", "origin", "HEAD")
    with pytest.raises(StageError, match="expected " + sha256_file(sif)):
        stage(tmp_path, source="lfs", lfs_url=parts_repo.url, lfs_revision="main")
    assert not (tmp_path / "img" / "finetune.sif").exists()
    with pytest.raises(StageError, match="container.sha256 pins"):
        stage(tmp_path, source="lfs", lfs_url=parts_repo.url, lfs_revision="v1", sha256="1" * 64)
    with pytest.raises(StageError, match="revision nope"):
        stage(tmp_path, source="lfs", lfs_url=parts_repo.url, lfs_revision="nope")


def test_a_moved_lfs_revision_is_noticed_only_when_an_update_is_asked_for(sif, parts_repo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = helpers.resolve_config({"run_name": "demo", "container": {"runtime": "apptainer", "source": "lfs",
                                                                   "lfs": {"url": parts_repo.url}}})
    assert helpers.lfs_pin(cfg) == "main"  # no update asked: the configured revision, no network
    cfg["container"]["lfs"]["update"] = True
    first = helpers.lfs_pin(cfg)
    assert first == git(parts_repo.work, "rev-parse", "HEAD")
    record = container.main(container.Config(source="lfs", lfs_url=parts_repo.url, pin=first,
                                             output=helpers.container_image(cfg),
                                             record_out=helpers.container_image(cfg) + ".json"))
    assert record["pin"] == first and helpers.lfs_pin(cfg) == first  # same commit: nothing to re-run
    newer = container_standin.make_sif(tmp_path / "newer.sif", payload=b"a newer image\n" * 3000)
    moved = parts_repo.publish(newer)
    assert moved != first and helpers.lfs_pin(cfg) == moved  # the remote moved: the container rule's param changes


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
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
    record = stage(tmp_path / "a", source="pull", url="s3://images/v1/finetune.sif", s3_endpoint=s3_server)
    assert record["sha256"] == sha256_file(sif) and record["sha256_checked"]  # digest from the .sha256 next to it
    request = s3.Store(s3_server, "us-east-1").request("GET", "images", "v1/finetune.sif")
    assert request.get_header("Authorization").startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    assert "wJalrX" not in json.dumps(record)
    with pytest.raises(StageError, match="truncated"):
        stage(tmp_path / "b", source="pull", url="s3://images/v1/short.sif", s3_endpoint=s3_server,
              sha256=sha256_file(sif))
    with pytest.raises(StageError, match="HTTP 404"):
        stage(tmp_path / "c", source="pull", url="s3://images/v2/finetune.sif", s3_endpoint=s3_server,
              sha256=sha256_file(sif))


def test_s3_signature_is_verified_by_the_server(sif, s3_server, tmp_path, monkeypatch):
    """With moto checking every signature (it recomputes SigV4 with botocore), our signed GET of a key with
    characters that the canonical URI must encode is accepted; a wrong secret and an anonymous request are refused
    with an error that says what to check, and leave no image behind."""
    key = s3_key(s3_server, "puller", ["s3:GetObject"], ["arn:aws:s3:::signed/*"])
    s3_put(s3_server, "signed")
    s3_put(s3_server, "signed/v1/fine%20tune%2B1.sif", sif.read_bytes())
    url, digest = "s3://signed/v1/fine tune+1.sif", sha256_file(sif)
    moto_auth(s3_server, "0")
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        record = stage(tmp_path / "a", source="pull", url=url, s3_endpoint=s3_server, sha256=digest)
        assert record["sha256"] == digest
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"][:-1] + "x")
        with pytest.raises(StageError, match=r"HTTP 403 .*SignatureDoesNotMatch: .*check AWS_SECRET_ACCESS_KEY"):
            stage(tmp_path / "b", source="pull", url=url, s3_endpoint=s3_server, sha256=digest)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTKNOWNHERE0000")
        with pytest.raises(StageError, match=r"HTTP 403 .*InvalidAccessKeyId: .*check it and the endpoint"):
            stage(tmp_path / "b", source="pull", url=url, s3_endpoint=s3_server, sha256=digest)
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        with pytest.raises(StageError, match=r"HTTP 403 .*(AccessDenied|access refused).*AWS_ACCESS_KEY_ID"):
            stage(tmp_path / "c", source="pull", url=url, s3_endpoint=s3_server, sha256=digest)
        assert not list((tmp_path / "b" / "img").glob("*")) and not list((tmp_path / "c" / "img").glob("*"))
    finally:
        moto_auth(s3_server, "inf")

@pytest.fixture
def standin(tmp_path, monkeypatch) -> Path:
    """The stand-in `apptainer` first on PATH; returns its log of calls."""
    container_standin.install(tmp_path / "standin-bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'standin-bin'}:{os.environ['PATH']}")
    log = tmp_path / "standin.jsonl"
    monkeypatch.setenv("STANDIN_LOG", str(log))
    return log


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


# --- the workflow: checks at parse time, the demo through the stand-in, what a new image re-runs -----------------

def snakemake(workdir: Path, *args: str, path: str | None = None, check: bool = True,
              env: dict | None = None, profile: str = "local") -> subprocess.CompletedProcess:
    return run_workflow(workdir, *args, profile=profile, env={"HF_TOKEN": SECRET} | (env or {}), path=path,
                        check=check)


def project(tmp_path: Path) -> Path:
    workdir = tmp_path / "project"
    workdir.mkdir()
    (workdir / "config.yaml").write_text((REPO / "config.yaml").read_text())
    (workdir / "data").symlink_to(REPO / "data")
    return workdir


def test_a_missing_runtime_or_image_stops_the_workflow_before_any_job(sif, tmp_path, monkeypatch):
    workdir = project(tmp_path)
    no_runtime = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    result = snakemake(workdir, "--dry-run", "--config", "container__runtime=apptainer", path=no_runtime,
                       check=False)
    assert result.returncode != 0
    assert "'apptainer' is not on PATH" in result.stderr and "module load apptainer" in result.stderr
    cfg = helpers.resolve_config({"run_name": "demo", "container": {
        "runtime": "singularity", "source": "path", "path": str(tmp_path / "nope.sif")}})
    container_standin.install(tmp_path / "bin", "singularity")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    with pytest.raises(helpers.ConfigError, match="image .*nope.sif does not exist"):
        helpers.check_container(cfg)
    cfg["container"].update(source="lfs")
    with pytest.raises(helpers.ConfigError, match="container.lfs.url: required"):
        helpers.check_container(cfg)
    assert not (workdir / "results").exists()


def test_the_seam_is_empty_for_runtime_none_and_one_command_otherwise(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = helpers.resolve_config({"run_name": "demo"})
    assert helpers.container_prefix(cfg) == "" and helpers.container_environment(cfg, {"HF_TOKEN": "x"}) == {}
    cfg = helpers.resolve_config({"run_name": "demo", "container__runtime": "singularity", "container__gpu": "false"})
    prefix = helpers.container_prefix(cfg)
    assert prefix.startswith("singularity exec --cleanenv --bind ") and "--nv" not in prefix
    assert ";" not in prefix and "&&" not in prefix  # `exec {prefix}python ...` must stay one command
    assert helpers.container_environment(cfg, {"HF_TOKEN": "t"}) == {"SINGULARITYENV_HF_TOKEN": "t"}


CONTAINER_DEMO = [  # with profiles/apptainer, which switches the container on
    "container__source=path",
    "training__max_steps=3", "training__eval_steps=3", "training__save_steps=3", "training__logging_steps=1",
    "dataset__max_samples=24", "evaluate__num_samples=2", "evaluate__max_new_tokens=8", "merge__check_samples=1",
]
IN_IMAGE_STAGES = {"build_demo_model", "prepare_data", "preflight", "train", "merge", "evaluate"}


@pytest.fixture(scope="module")
def container_demo(tmp_path_factory):
    """The demo with profiles/apptainer (container on), every stage that needs the stack run through the STAND-IN
    runtime (on the host)."""
    root = tmp_path_factory.mktemp("container-demo")
    workdir = project(root)
    image = container_standin.make_sif(root / "images" / "finetune.sif")
    bindir = root / "standin-bin"
    container_standin.install(bindir)
    log = root / "standin.jsonl"
    path = f"{bindir}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    config = [*CONTAINER_DEMO, f"container__path={image}", f"container__sha256={sha256_file(image)}"]
    snakemake(workdir, "--config", *config, path=path, env={"STANDIN_LOG": str(log)}, profile="apptainer")
    return {"workdir": workdir, "image": image, "config": config, "path": path,
            "calls": container_standin.records(log), "log": log}


def stage_of(call: dict) -> str:
    inner = call["argv"][call["argv"].index(next(a for a in call["argv"] if a.endswith(".sif"))) + 1:]
    script = next(a for a in inner if a.endswith(".py") and "/scripts/" in a and "launch" not in a)
    return {"build_demo_model": "build_demo_model", "prepare_data": "prepare_data", "preflight": "preflight",
            "train": "train", "merge": "merge", "evaluate": "evaluate"}[Path(script).stem]


def test_the_demo_runs_each_stack_stage_through_the_runtime_with_nv_cleanenv_binds_and_env(container_demo):
    workdir = container_demo["workdir"]
    run = workdir / "results" / "demo"
    assert (run / "manifest.json").is_file() and (run / "merged" / "model.safetensors").is_file()
    calls = [c for c in container_demo["calls"] if c["argv"][0] == "exec"]
    assert {stage_of(c) for c in calls} == IN_IMAGE_STAGES and len(calls) == len(IN_IMAGE_STAGES)
    image = workdir / "resources" / "container" / "finetune.sif"
    assert image.is_symlink() and image.resolve() == container_demo["image"].resolve()
    scratch = workdir / "resources" / "container" / "scratch"
    for call in calls:
        opts, rest = container_standin.parse(call["argv"][1:])
        assert "--nv" in opts and "--cleanenv" in opts, call["argv"]
        assert rest[0] == str(image)
        binds = opts["--bind"]
        for needed in (workdir, REPO):
            assert any(str(needed) == b or str(needed).startswith(b + "/") for b in binds), (needed, binds)
        env = dict(pair.split("=", 1) for pair in opts["--env"])
        assert env["HF_HOME"] == str(scratch / "cache" / "huggingface")
        assert env["TRITON_CACHE_DIR"] == str(scratch / "cache" / "triton")
        assert env["XDG_CACHE_HOME"] == str(scratch / "cache")
        assert call["env"] == {"APPTAINERENV_HF_TOKEN": SECRET}  # the token through the environment ...
        assert SECRET not in json.dumps(call["argv"])  # ... never on the command line
        for arg in rest[1:]:  # every file the inner command names lies under a bind
            if "/" in arg and not arg.startswith("-") and not arg.startswith(("{", "[")):
                target = (Path(call["cwd"]) / arg).absolute()
                assert any(str(target).startswith(b.rstrip("/") + "/") for b in binds), (arg, binds)


def test_the_model_fetch_and_summary_stay_on_the_host(container_demo):
    logs = container_demo["workdir"] / "results" / "demo" / "logs"
    for stage in ("model", "summary"):
        assert (logs / f"{stage}.log").is_file()
    inner = " ".join(" ".join(c["argv"]) for c in container_demo["calls"])
    assert "prepare_model.py" not in inner and "summary.py" not in inner


def test_no_file_of_the_container_demo_holds_the_token(container_demo):
    leaks = [str(p) for p in container_demo["workdir"].rglob("*") if p.is_file() and not p.is_symlink()
             and SECRET.encode() in p.read_bytes()]
    assert leaks == []


def test_a_new_image_reruns_the_stages_in_it_only_when_retrain_on_new_image(container_demo):
    workdir, path = container_demo["workdir"], container_demo["path"]
    config = container_demo["config"]
    env = {"STANDIN_LOG": str(container_demo["log"])}
    run = functools.partial(snakemake, workdir, path=path, env=env, profile="apptainer")
    assert planned_jobs(run("--dry-run", "--config", *config)) == set()
    forced = ["--dry-run", "--forcerun", "container_image", "--config", *config]
    assert planned_jobs(run(*forced)) == IN_IMAGE_STAGES | {
        "container_image", "model", "summary", "all"}
    assert planned_jobs(run(*forced, "container__retrain_on_new_image=false")) == {"container_image"}
    # a changed pin of the image (here: another path) re-runs the container stage by itself
    other = container_standin.make_sif(container_demo["image"].parent / "other.sif", payload=b"other\n" * 9000)
    changed = [c for c in config if not c.startswith(("container__path", "container__sha256"))]
    changed += [f"container__path={other}", "container__retrain_on_new_image=false"]
    assert planned_jobs(run("--dry-run", "--config", *changed)) == {"container_image"}


def test_lfs_and_build_sources_through_the_workflow(sif, parts_repo, tmp_path):
    """The container rule itself, run by Snakemake (target container_image), with the stand-in runtime on PATH:
    lfs fetches the pinned parts; a moved branch is noticed only with lfs.update; build rebuilds when the def
    changes."""
    workdir = project(tmp_path)
    bindir = tmp_path / "standin-bin"
    container_standin.install(bindir)
    path = f"{bindir}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    env = {"STANDIN_LOG": str(tmp_path / "standin.jsonl"), "STANDIN_BUILD_ALLOW": "fakeroot"}
    run = functools.partial(snakemake, workdir, path=path, env=env, profile="apptainer")
    lfs = ["--config", f"container__lfs__url={parts_repo.url}"]
    image = workdir / "resources" / "container" / "finetune.sif"
    run("container_image", *lfs)
    record = json.loads(Path(f"{image}.json").read_text())
    assert image.read_bytes() == sif.read_bytes() and record["commit"] == git(parts_repo.work, "rev-parse", "HEAD")
    update = [*lfs, "container__lfs__update=true"]
    assert planned_jobs(run("container_image", "--dry-run", *update)) == set()  # asked, but the remote did not move
    newer = container_standin.make_sif(tmp_path / "newer.sif", payload=b"newer\n" * 7000)
    parts_repo.publish(newer)
    assert planned_jobs(run("container_image", "--dry-run", *lfs)) == set()  # not asked: no network, nothing noticed
    assert planned_jobs(run("container_image", "--dry-run", *update)) == {"container_image"}
    run("container_image", *update)
    assert image.read_bytes() == newer.read_bytes()

    definition = tmp_path / "finetune.def"
    shutil.copy(DEF, definition)
    build = ["--config", "container__source=build", f"container__definition={definition}"]
    run("container_image", *build)
    assert json.loads(Path(f"{image}.json").read_text())["build_mode"] == "fakeroot"
    assert planned_jobs(run("container_image", "--dry-run", *build)) == set()
    os.utime(definition, (time.time() + 5, time.time() + 5))  # touched, same content: Snakemake's checksum
    assert planned_jobs(run("container_image", "--dry-run", *build)) == set()
    definition.write_text(definition.read_text() + "# a change\n")
    assert planned_jobs(run("container_image", "--dry-run", *build)) == {"container_image"}  # the def changed
