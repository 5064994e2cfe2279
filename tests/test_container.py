"""The container: singularity/finetune.def against the project's lock, the container stage's four image sources
(real SIF files made with Debian's siftool, a git-lfs parts repository on file://, downloads over file://,
http:// and from an S3-protocol server (moto) on loopback), and the seam that runs stages inside the image.

Apptainer cannot be installed here. Everything that would call it goes to a STAND-IN on PATH
(tests/support/container_standin.py) that records its arguments and environment and runs the inner command on the host.
These tests check the command lines, environment and binds the workflow gives the runtime; the stages run in a real
container (Charliecloud, the CPU image of the same recipe) in tests/e2e/test_container_charliecloud.py.
"""

from __future__ import annotations

import json
import re
import runpy
import subprocess

import container
import pytest
from hpc_finetune.container import sif as sif_check
from hpc_finetune.container import sources
from hpc_finetune.container.cpu_image import SUITE
from hpc_finetune.io.cli import StageError
from hpc_finetune.io.files import sha256_file
from hpc_finetune.workflow import container as workflow_container
from hpc_finetune.workflow.config import resolve_config
from support import container_standin
from support.common import REPO
from support.container import DEF, git, sections, stage
from tools import lock

# --- the definition file --------------------------------------------------------------------------------------


IMAGE_ENV = runpy.run_path(str(REPO / "singularity" / "image_env.py"))


def test_the_def_installs_exactly_the_lock_through_the_shared_recipe():
    """One source of truth: the def copies requirements.lock and the recipe (image_env.py, os-packages.txt) into
    the image and runs it; the recipe installs the lock hash-checked and with nothing more; no package version and
    no package list is written in the def itself (torch's version is read from the lock)."""
    text = DEF.read_text()
    sec = sections(text)
    files = [line.split() for line in sec["files"].splitlines() if line.strip()]
    assert ["requirements.lock", "/opt/finetune/requirements.lock"] in files
    assert "python3 /opt/finetune/image_env.py install --torch-index {{ TORCH_INDEX }}" in sec["post"]
    recipe = (REPO / "singularity" / "image_env.py").read_text()
    assert re.search(r'"--require-hashes", "--no-deps", "-r"', recipe) and '"check"' in recipe
    for code in (text, recipe):
        code = "\n".join(line for line in code.splitlines() if not line.lstrip().startswith("#"))
        assert not re.findall(r"\b[A-Za-z][\w.-]*==\d", code), "a version pinned in the recipe instead of the lock"
    assert IMAGE_ENV["locked"](lock.LOCK) == lock.locked()
    # every package of the stack that the stages import is imported by the self check (%test)
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "safetensors"):
        assert name in lock.locked() and name in IMAGE_ENV["STACK"], name
    assert "/opt/venv/bin/python /opt/finetune/image_env.py selftest" in sec["test"]


def test_the_recipe_drops_exactly_torchs_entry_for_the_cuda_build_and_fails_on_any_difference(tmp_path):
    out = tmp_path / "without-torch.lock"
    IMAGE_ENV["without"](lock.LOCK, "torch", out)
    kept, hashes = lock.locked(out), lock.hashes(out)
    assert "torch" not in kept and kept == {n: v for n, v in lock.locked().items() if n != "torch"}
    assert hashes == {n: h for n, h in lock.hashes().items() if n != "torch"}
    want = {"torch": "2.13.0+cpu", "peft": "0.21.2", "trl": "1.16.0"}
    differences = IMAGE_ENV["differences"]
    assert differences({"torch": "2.13.0+cu128", "peft": "0.21.2", "trl": "1.16.0", "pip": "26.3"}, want) == []
    assert differences({"torch": "2.12.0+cu128", "peft": "0.21.2", "trl": "1.16.0"}, want) == [
        "torch 2.12.0+cu128 != 2.13.0+cpu"]
    assert differences({"torch": "2.13.0+cpu", "peft": "0.21.1", "rich": "1"}, want) == [
        "peft 0.21.1 != 0.21.2", "rich 1 is installed but not in the lock", "trl missing != 1.16.0"]


def test_the_cpu_image_gets_the_os_packages_the_def_gets_less_the_cuda_ones():
    from hpc_finetune.container.cpu_image import os_packages

    assert os_packages() == ["python3", "python3-venv", "ca-certificates"]
    assert set(os_packages()) < set(os_packages(cuda=True)) and "build-essential" in os_packages(cuda=True)
    assert "/opt/finetune/os-packages.txt" in sections(DEF.read_text())["post"]


def test_the_def_pins_its_base_and_sets_writable_caches_labels_test_and_runscript():
    sec = sections(DEF.read_text())
    base = re.search(r"^From:\s*(\S+)", sec[""], re.M).group(1)
    # the CPU image's OS (Debian bookworm, Python 3.11: what the lock is resolved and tested for), pinned by its dated
    # tag; CUDA's libraries come with torch's CUDA build, not from the base
    assert re.fullmatch(rf"debian:{SUITE}-\d{{8}}-slim", base), base
    assert f"docker.io/library/{base}" in sec["labels"]
    assert re.search(r"^Bootstrap:\s*docker", sec[""], re.M)
    for var in ("HF_HOME", "TRITON_CACHE_DIR", "XDG_CACHE_HOME"):
        assert re.search(rf"export {var}=\$\{{{var}:-/scratch/", sec["environment"]), var
    assert "{{ PROJECT_COMMIT }}" in sec["labels"] and "PROJECT_COMMIT=" in sec["arguments"]
    assert "finetune.version." in sec["post"]  # installed versions become labels
    assert "torch.cuda.is_available()" in (REPO / "singularity" / "image_env.py").read_text()  # %test's check
    assert 'exec "$@"' in sec["runscript"]


# --- verification of SIF files --------------------------------------------------------------------------------


def test_a_real_sif_passes_and_its_header_is_read(sif):
    info = sif_check.verify(sif, sha256_file(sif), "test")
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
        sif_check.verify(bad, None, "test")


def test_a_corrupt_image_or_wrong_digest_is_refused(sif, tmp_path):
    corrupt = tmp_path / "corrupt.sif"
    data = bytearray(sif.read_bytes())
    data[-5000] ^= 0xFF  # a flipped bit in the data: the header is fine, the digest is not
    corrupt.write_bytes(bytes(data))
    sif_check.sif_header(corrupt)
    with pytest.raises(StageError, match=r"has sha256 [0-9a-f]{64}, expected"):
        sif_check.verify(corrupt, sha256_file(sif), "test")
    with pytest.raises(StageError, match="is not a sha256 digest"):
        sif_check.normalise_digest("abc123", "container.sha256")


# --- sources: path and lfs ------------------------------------------------------------------------------------


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


def test_lfs_source_joins_the_parts_of_the_pinned_revision_and_records_the_commit(sif, parts_repo, tmp_path):
    commit = git(parts_repo.work, "rev-parse", "HEAD")
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "img" / "finetune.sif"
    record = sources.from_lfs(
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
    cfg = resolve_config({"run_name": "demo", "container": {"runtime": "apptainer", "source": "lfs",
                                                                   "lfs": {"url": parts_repo.url}}})
    assert workflow_container.lfs_pin(cfg) == "main"  # no update asked: the configured revision, no network
    cfg["container"]["lfs"]["update"] = True
    first = workflow_container.lfs_pin(cfg)
    assert first == git(parts_repo.work, "rev-parse", "HEAD")
    record = container.main(container.Config(source="lfs", lfs_url=parts_repo.url, pin=first,
                                             output=workflow_container.container_image(cfg),
                                             record_out=workflow_container.container_image(cfg) + ".json"))
    assert record["pin"] == first and workflow_container.lfs_pin(cfg) == first  # same commit: nothing to re-run
    newer = container_standin.make_sif(tmp_path / "newer.sif", payload=b"a newer image\n" * 3000)
    moved = parts_repo.publish(newer)
    assert moved != first and workflow_container.lfs_pin(cfg) == moved  # the remote moved: the container rule's param changes


def test_the_squashfs_partition_is_extracted_for_charliecloud_with_a_mount_point_for_each_root(siftool, tmp_path):
    """ch-run cannot create a bind's destination in the read-only image: a project under a root the image lacks
    (CI's checkout under /check) gets an empty directory appended, and nothing of the image changes."""
    tree = tmp_path / "tree"
    (tree / "work").mkdir(parents=True)
    (tree / "etc").mkdir()
    (tree / "etc" / "motd").write_text("the image's own file\n")
    subprocess.run(["mksquashfs", str(tree), str(tmp_path / "root.sqfs"), "-quiet", "-no-progress"], check=True)
    payload = (tmp_path / "root.sqfs").read_bytes()
    image = container_standin.make_sif(tmp_path / "fs.sif", payload=payload)
    offset, size = sif_check.partition(image)
    info = sif_check.extract_squashfs(image, tmp_path / "fs.sqfs", roots=["/work", "/check", "/fs1"])
    assert info["mount_points_added"] == ["/check", "/fs1"] and size == len(payload)
    assert info["mount_points"] == ["/check", "/etc", "/fs1", "/work"] == sif_check.squashfs_roots(tmp_path / "fs.sqfs")
    motd = subprocess.run(["unsquashfs", "-cat", str(tmp_path / "fs.sqfs"), "etc/motd"], capture_output=True, text=True)
    assert motd.stdout == "the image's own file\n" and image.read_bytes()[offset:offset + size] == payload
    again = sif_check.extract_squashfs(image, tmp_path / "again.sqfs", roots=["/work", "/etc"])
    assert again["mount_points_added"] == [] and (tmp_path / "again.sqfs").read_bytes() == payload
    with_host = sif_check.extract_squashfs(image, tmp_path / "host.sqfs")  # default: the host's top level
    assert {"/tmp", "/" + tmp_path.parts[1]} <= set(with_host["mount_points"])
    with pytest.raises(StageError, match="not SquashFS"):
        sif_check.extract_squashfs(container_standin.make_sif(tmp_path / "x.sif"), tmp_path / "x.sqfs")
    assert not (tmp_path / "x.sqfs").exists() and not list(tmp_path.glob(".x.sqfs*"))
