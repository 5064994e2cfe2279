"""The GPU check (scripts/tools/gpu_check.py): its dry run on the CPU writes every step's JSON with sane figures and
the summary; time caps and the budget stop steps; the bundle's pins, its slimmed bitsandbytes, and the 64 MiB
the device tool carries; the printed `run` call. No verdict here depends on how fast the machine is: the dry run's
steps run to their end (no caps), and the cap and budget tests use a step that never ends by itself and a budget
that is spent before the first step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from support.common import REPO, SCRIPTS
from tools import lock
from tools.benchmarks import bundle, gpucheck
from tools.benchmarks.train import overrides

TOOL = SCRIPTS / "tools" / "gpu_check.py"
OUT_FILES = {"env.json", "a.json", "b.json", "c.json", "d.json", "e.json", "summary.json"}


@pytest.fixture(scope="module")
def dry(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One dry run of the whole check (every step, small sizes), shared by the tests that read it. Its steps have
    no time caps; the timeout here only keeps a hung run from holding the suite."""
    root = tmp_path_factory.mktemp("gpu-check")
    out = root / "out"
    proc = subprocess.run([sys.executable, str(TOOL), "--dry", "--out", str(out), "--work", str(root / "work")],
                          capture_output=True, text=True, cwd=REPO, timeout=3600)
    return out, proc


def figures(out: Path, step: str) -> dict:
    return json.loads((out / f"{step}.json").read_text())


def test_the_dry_run_passes_and_writes_at_most_eight_files(dry):
    out, proc = dry
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert {p.name for p in out.iterdir()} == OUT_FILES  # the device tool brings back at most 8
    summary = figures(out, "summary")
    assert summary["dry"] is True and set(summary["steps"]) == {"m", "a", "b", "c", "d", "e"}
    assert all(s["status"] == "ok" and s["problems"] == [] for s in summary["steps"].values()), summary["steps"]
    assert summary["budget_s"] is None and all(s["timeout_s"] is None for s in summary["steps"].values())
    for line in ("GPU check (dry run on the CPU)", "c:padding-free", "c:liger"):
        assert line in proc.stdout
    for step in "mabcde":
        assert any(row.startswith(f"{step} ") and " ok " in row for row in proc.stdout.splitlines()), step


def test_env_records_the_stack(dry):
    env = figures(dry[0], "env")
    assert env["install"]["skipped"] is True  # everything is importable here
    assert env["versions"]["trl"] == bundle.pins()["trl"] and env["versions"]["snakemake"]
    assert env["cuda_available"] is False and "unmet_requirements" in env


def test_the_workflow_step_trained_merged_and_evaluated(dry):
    a = figures(dry[0], "a")
    assert a["exit_code"] == 0 and a["preflight"]["device"] == "cpu" == a["train"]["device"]
    assert a["train"]["quantization"] == "4bit" and a["train"]["train_loss_last"] < a["train"]["train_loss_first"]
    assert a["merge"]["max_abs_logit_diff"] <= a["merge"]["tolerance"]
    assert a["evaluate"]["samples_generated"] > 0 and a["evaluate"]["finetuned_eval_loss"] > 0
    assert {"train", "merge", "evaluate"} <= set(a["stage_wall_s"])


@pytest.mark.parametrize("step", ["b", "c"])
def test_the_train_benchmarks_measured_ours_and_the_baseline(dry, step):
    f = figures(dry[0], step)
    assert f["complete"] is True and f["failed"] == {}
    want = gpucheck.DRY.b if step == "b" else gpucheck.DRY.c
    assert f["settings"]["micro_batch_size"] == want["micro-batch-size"]
    assert f["settings"]["max_seq_length"] == want["max-seq-length"] and f["settings"]["gradient_checkpointing"]
    for kind, r in f["results"].items():
        assert r["tokens_per_s"] > 0 and r["step_time_s"] > 0 and 0 < r["mfu"] < 1, kind
        assert r["timed_steps"] == want["steps"] - want["warmup"] and r["peak_rss_mb"] > 100, kind
    assert f["speedup_tokens_per_s"] == pytest.approx(
        f["results"]["ours"]["tokens_per_s"] / f["results"]["baseline"]["tokens_per_s"])


def test_the_lever_step_flipped_each_lever_and_listed_the_ones_that_need_a_gpu(dry):
    c = figures(dry[0], "c")
    assert c["levers"] == {"padding-free": "ours[padding_free=true]"}
    assert c["results"]["ours[padding_free=true]"]["tokens_per_s"] > 0
    assert c["levers_skipped"] == {"liger": "needs a GPU"}


def test_the_merge_step_timed_both_merges(dry):
    d = figures(dry[0], "d")
    assert set(d["results"]) == {"streaming", "peft"} and d["arch"] == gpucheck.DRY.arch
    for r in d["results"].values():
        assert r["merge_s"] > 0 and r["wall_s"] >= r["merge_s"] and r["peak_rss_mb"] > 50


def test_the_seed_quick_test_trained_the_rows_for_one_epoch(dry):
    e = figures(dry[0], "e")
    assert e["exit_code"] == 0 and e["adapter_saved"] and e["rows"] == gpucheck.DRY.e_rows
    assert e["train_job_s"] > 0 and e["train"]["device"] == "cpu" and e["train"]["epochs"] == pytest.approx(1.0)
    assert e["train"]["steps"] == -(-gpucheck.DRY.e_rows // 8)  # micro-batch 4 x accumulation 2
    assert 0.5 * gpucheck.DRY.e_mean_tokens <= e["row_tokens_mean"] <= 1.5 * gpucheck.DRY.e_mean_tokens
    assert e["speedup_vs_reference"] is None  # a CPU time is not compared with an A100's


def test_a_step_past_its_cap_is_killed_with_its_children(tmp_path):
    """The time cap holds for a whole process tree: the step and what it started. The step sleeps 300 s and never
    ends by itself: it is killed (by a signal), not before its cap, and its grandchild with it."""
    pid_file = tmp_path / "grandchild.pid"
    script = (f"import subprocess, time; p = subprocess.Popen(['sleep', '300']); "
              f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(300)")
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    log = tmp_path / "x.log"
    log.write_text("started\n")
    while not pid_file.is_file() or not pid_file.read_text():  # the tree is whole: the clock starts now
        assert proc.poll() is None
        time.sleep(0.05)
    done = gpucheck.wait_all([gpucheck.Running("x", proc, log, time.perf_counter(), 3)])
    assert done["x"]["status"] == "timeout" and done["x"]["elapsed_s"] >= 3 and done["x"]["timeout_s"] == 3
    assert proc.returncode in (-signal.SIGTERM, -signal.SIGKILL), proc.returncode
    grandchild = int(pid_file.read_text())
    assert not Path(f"/proc/{grandchild}").exists() or "Z" in Path(f"/proc/{grandchild}/stat").read_text().split()[2]


def test_steps_without_budget_are_skipped_not_started(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(TOOL), "--dry", "--only", "b", "--budget", "5", "--out", str(out),
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 1
    summary = figures(out, "summary")
    assert summary["steps"]["m"]["reason"].startswith("out of budget")
    b = figures(out, "b")
    assert b["status"] == "skipped" and "model build" in b["reason"]


def test_every_lever_is_a_setting_of_the_train_stage():
    for lever in gpucheck.LEVERS:
        parsed = overrides(lever.variant.split(","))
        assert set(parsed) == {pair.split("=")[0] for pair in lever.variant.split(",")}, lever
    assert set(gpucheck.CORE_LEVERS) <= {lv.name for lv in gpucheck.LEVERS}


def test_the_gpu_check_fits_one_call():
    call = gpucheck.invocation(gpucheck.GPU.budget_s)
    assert call["timeout_s"] <= 600 and call["carry"] == [bundle.BUNDLE_DIR]
    assert "scripts/tools/gpu_check.py" in call["command"] and "--dry" not in call["command"]
    # every step's cap fits the call; step c takes what is left of the budget
    assert all(cap < gpucheck.GPU.budget_s for cap in gpucheck.GPU.caps.values())


def test_bundle_pins_are_the_projects_and_this_environments():
    wanted = dict(r.split("==") for r in bundle.requirements())
    assert len(wanted) == len(bundle.requirements())  # one version of each: two stop the whole install
    for name, version in bundle.pins().items():
        if name in wanted:
            assert wanted[name] == version, name
    for name, version in wanted.items():
        try:
            assert metadata.version(name) == version, f"{name}: bundle {version}, this environment {metadata.version(name)}"
        except metadata.PackageNotFoundError:
            assert name == "liger-kernel", f"{name} is bundled but not installed here"
    assert "torch" not in wanted and "pulp" not in wanted


def test_the_tree_leaves_room_for_the_bundle():
    tree = bundle.tree_bytes()
    assert tree + bundle.BUNDLE_BUDGET <= bundle.CARRY_LIMIT, f"tree {tree / 2**20:.1f} MiB"
    folder = REPO / bundle.BUNDLE_DIR
    if folder.is_dir():  # built here (make gpu-bundle): what would travel
        assert bundle.folder_bytes(folder) <= bundle.BUNDLE_BUDGET
        assert bundle.carried()["fits"]
    ignored = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", f"{bundle.BUNDLE_DIR}/x.whl"])
    assert ignored.returncode == 0, "the bundle must never be committed"
    # the check's own code travels with the tree: the tools and their package (scripts/tools/benchmarks)
    sent = subprocess.run(["git", "-C", str(REPO), "ls-files", "--cached", "--others", "--exclude-standard", "scripts"],
                          capture_output=True, text=True, check=True).stdout.split()
    tools = {str(p.relative_to(REPO)) for p in (SCRIPTS / "tools").rglob("*.py")}
    assert "scripts/tools/benchmarks/gpusteps.py" in tools and tools <= set(sent), tools - set(sent)


def test_slimming_bitsandbytes_keeps_cuda13_and_cpu_and_a_matching_record(tmp_path):
    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    libs = ["cpu", "cuda118", "cuda128", "cuda130", "cuda132", "rocm72"]
    record = "".join(f"bitsandbytes/libbitsandbytes_{lib}.so,sha256=x,3\n" for lib in libs) + \
        "bitsandbytes/__init__.py,sha256=y,5\nbitsandbytes-0.50.2.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as zf:
        for lib in libs:
            zf.writestr(f"bitsandbytes/libbitsandbytes_{lib}.so", "lib")
        zf.writestr("bitsandbytes/__init__.py", "x = 1")
        zf.writestr("bitsandbytes-0.50.2.dist-info/RECORD", record)
    bundle.slim_bitsandbytes(wheel)
    bundle.slim_bitsandbytes(wheel)  # idempotent
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        listed = {line.split(",")[0] for line in zf.read("bitsandbytes-0.50.2.dist-info/RECORD").decode().splitlines()}
        assert zf.read("bitsandbytes/__init__.py") == b"x = 1"
    kept = {f"bitsandbytes/libbitsandbytes_{lib}.so" for lib in ("cpu", "cuda130", "cuda132")}
    assert {n for n in names if n.endswith(".so")} == kept and listed == names


def test_plan_prints_the_call_and_the_sizes():
    proc = subprocess.run([sys.executable, str(TOOL), "plan"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert "MiB of the 64 MiB one call carries" in proc.stdout
    if (REPO / bundle.BUNDLE_DIR).is_dir():
        assert proc.returncode == 0 and '"carry": [\n    ".gpu-bundle"\n  ]' in proc.stdout
        assert '"timeout_s": 560' in proc.stdout
    else:
        assert proc.returncode == 1 and "make gpu-bundle" in proc.stdout


def test_the_bundle_installs_into_a_site_folder_and_reports_unmet_requirements(tmp_path):
    """bundle.install as the GPU machine runs it (no index, no deps, --target), on a wheel made here; then the
    requirement check sees the installed package's needs that this environment does not meet."""
    folder = tmp_path / "bundle"
    folder.mkdir()
    dist = "gcprobe-1.0.dist-info"
    files = {"gcprobe/__init__.py": "VALUE = 42\n",
             f"{dist}/METADATA": "Metadata-Version: 2.1\nName: gcprobe\nVersion: 1.0\nRequires-Dist: torch>=99\n"
                                 "Requires-Dist: packaging\nRequires-Dist: nothere-pkg\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    with zipfile.ZipFile(folder / "gcprobe-1.0-py3-none-any.whl", "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
        zf.writestr(f"{dist}/RECORD", "".join(f"{n},,\n" for n in files) + f"{dist}/RECORD,,\n")
    site = tmp_path / "site"
    report = bundle.install(folder, site, timeout=120)
    assert report["wheels"] == 1 and (site / "gcprobe" / "__init__.py").is_file()
    code = "import json, gcprobe; from tools.benchmarks.bundle import unmet_requirements as u; " \
           "print(json.dumps([gcprobe.VALUE, u(['gcprobe'])]))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": f"{site}:{SCRIPTS}"})
    value, unmet = json.loads(proc.stdout)
    assert value == 42 and len(unmet) == 2, unmet
    assert unmet[0].startswith("gcprobe needs torch>=99: have ") and unmet[1] == "gcprobe needs nothere-pkg: missing"


def test_the_bundle_asks_pip_for_the_locks_files_only(tmp_path):
    """Each bundled requirement goes to pip with the lock's hashes: a file that is not the one the lock was made from
    (here a tampered wheel of the locked idna) is refused by pip before anything is kept."""
    requirement = next(r for r in bundle.requirements() if r.startswith("idna=="))
    args = bundle.hashed(requirement, tmp_path)
    assert args[:2] == ["--require-hashes", "-r"]
    assert Path(args[2]).read_text().count("--hash=sha256:") == len(lock.hashes()["idna"]) >= 1
    index = tmp_path / "index"
    index.mkdir()
    (index / f"idna-{requirement.split('==')[1]}-py3-none-any.whl").write_bytes(b"not the locked wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-index", "--find-links",
                           str(index), "-d", str(tmp_path / "out"), *args], capture_output=True, text=True)
    assert proc.returncode != 0 and "DO NOT MATCH THE HASHES" in proc.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    # a package the lock does not hold (liger-kernel) goes as it is
    assert bundle.hashed("liger-kernel==0.8.5", tmp_path) == ["liger-kernel==0.8.5"]
