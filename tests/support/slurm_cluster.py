"""A real single-node Slurm cluster on this machine, for the tests: Debian's slurmctld, slurmd and munge, partitions
`cpu` (default) and `gpu`, and two GPU gres backed by placeholder character devices (no CUDA behind them: jobs see
CUDA_VISIBLE_DEVICES, torch sees no GPU, and the demo trains on the CPU).

Needs root (packages, /etc/slurm, daemons). `stop()` puts back the configuration files it found (none, usually):
a slurm.conf left behind makes every later `snakemake` start on this machine wait for the executor plugin's probe
of a controller that is gone (~10 s). `start()` raises `Unavailable` with the reason when the cluster cannot be
had; the `cluster` fixture (tests/conftest.py) turns that into a skip, or into a failure when REQUIRE_SLURM=1 (CI).
The recipe and its pitfalls: ../shared/NOTES.md, "A real Slurm cluster on one machine".
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
SLURM_CONF = Path("/etc/slurm/slurm.conf")  # the job step strips SLURM_* variables: SLURM_CONF cannot move it
GRES_CONF = Path("/etc/slurm/gres.conf")
STATE = Path("/var/lib/slurm-test")
FAKE_GPUS = STATE / "dev"
MARKER = "# written by tests/slurm_cluster.py"


class Unavailable(RuntimeError):
    """No cluster on this machine; the message says why."""


def _run(*cmd: str, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=timeout, **kw)


def install() -> None:
    """apt-get the daemons, only when one is missing."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch", "scontrol")):
        return
    if not shutil.which("apt-get"):
        raise Unavailable("slurmctld/slurmd/munge are not installed and there is no apt-get to install them")
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (("apt-get", "update", "-qq"),
                ("apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES)):
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if result.returncode != 0:
            raise Unavailable(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 4096


@dataclass
class Cluster:
    host: str
    cpus: int
    memory_mb: int
    gpus: int = 2
    processes: list[subprocess.Popen] = field(default_factory=list)
    started_munged: bool = False
    found: dict[Path, bytes | None] = field(default_factory=dict)  # the config files before write_config

    def conf(self) -> str:
        state = STATE
        return f"""{MARKER}
ClusterName=testcluster
SlurmctldHost={self.host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
GresTypes=gpu
SlurmdParameters=config_overrides
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=3600
KillWait=30
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/d
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} Gres=gpu:{self.gpus} State=UNKNOWN
PartitionName=cpu Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes={self.host} Default=NO MaxTime=INFINITE State=UP
"""

    def write_config(self) -> None:
        if SLURM_CONF.exists() and MARKER not in SLURM_CONF.read_text():
            raise Unavailable(f"{SLURM_CONF} exists and was not written by the tests: not touching a real cluster")
        self.found = {path: path.read_bytes() if path.exists() else None for path in (SLURM_CONF, GRES_CONF)}
        for sub in ("ctld", "d", "dev"):
            (STATE / sub).mkdir(parents=True, exist_ok=True)
        for i in range(self.gpus):  # character devices: regular files and count-only gres are refused
            dev = FAKE_GPUS / f"fakegpu{i}"
            if not dev.exists():
                os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SLURM_CONF.write_text(self.conf())
        GRES_CONF.write_text(f"{MARKER}\nAutoDetect=off\n"
                             f"NodeName={self.host} Name=gpu File={FAKE_GPUS}/fakegpu[0-{self.gpus - 1}]\n")

    def start(self) -> None:
        munge_key = Path("/etc/munge/munge.key")
        if not munge_key.exists():
            _run("/usr/sbin/mungekey", "--create", check=False)
            shutil.chown(munge_key, "munge", "munge")
        Path("/run/munge").mkdir(exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        socket_path = Path("/run/munge/munge.socket.2")
        if not (socket_path.exists() and _run("pgrep", "-x", "munged", check=False).returncode == 0):
            result = _run("runuser", "-u", "munge", "--", "/usr/sbin/munged", "--force", check=False)
            if result.returncode != 0:
                raise Unavailable(f"munged did not start: {result.stderr}")
            self.started_munged = True
        for _ in range(50):
            if _run("munge", "-n", check=False).returncode == 0:
                break
            time.sleep(0.2)
        else:
            raise Unavailable("munged does not answer (munge -n fails)")
        for daemon in ("slurmctld", "slurmd"):  # -D: stay in the foreground, owned (and stopped) by the tests
            self.processes.append(subprocess.Popen([f"/usr/sbin/{daemon}", "-D"], stdout=subprocess.DEVNULL,
                                                   stderr=subprocess.DEVNULL, start_new_session=True))
        self.wait_idle()

    def wait_idle(self, timeout: float = 90) -> None:
        deadline, state = time.time() + timeout, ""
        while time.time() < deadline:
            for proc in self.processes:
                if proc.poll() is not None:
                    raise Unavailable(f"{proc.args[0]} exited with {proc.returncode}: {self.log_tail()}")
            result = _run("sinfo", "-h", "-N", "-o", "%T", check=False, timeout=30)
            state = result.stdout.strip()
            if result.returncode == 0 and state.split("\n")[0] in ("idle", "mixed"):
                return
            if "drain" in state:
                _run("scontrol", "update", f"NodeName={self.host}", "State=RESUME", check=False)
            time.sleep(1)
        raise Unavailable(f"the node is not idle after {timeout:.0f} s (state {state!r}): {self.log_tail()}")

    def log_tail(self) -> str:
        return "\n".join(f"--- {name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
                         for name in ("slurmctld.log", "slurmd.log") if (p := STATE / name).exists())

    def stop(self) -> None:
        _run("scancel", "--full", "-u", "root", check=False, timeout=30)
        for proc in reversed(self.processes):
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.processes.clear()
        pidfile = Path("/run/munge/munged.pid")
        if self.started_munged and pidfile.exists():
            try:
                os.kill(int(pidfile.read_text().strip()), 15)
            except (ValueError, ProcessLookupError):
                pass
            self.started_munged = False
        self.restore_config()

    def restore_config(self) -> None:
        """Put back what write_config found; a file an earlier test session left behind (with MARKER) counts as
        none found."""
        for path, before in self.found.items():
            if before is None or MARKER.encode() in before:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(before)
        self.found = {}


def start() -> Cluster:
    """Install (when missing), configure and start the cluster; wait until its node is idle."""
    if os.geteuid() != 0:
        raise Unavailable("a Slurm cluster needs root (packages, /etc/slurm, daemons); run the tests as root")
    cluster = Cluster(host=socket.gethostname().split(".")[0], cpus=max(4, os.cpu_count() or 1),
                      memory_mb=max(4000, int(_memory_mb() * 0.8)))
    if shutil.which("pgrep") and _run("pgrep", "-x", "slurmctld", check=False).returncode == 0:
        if SLURM_CONF.exists() and MARKER in SLURM_CONF.read_text():  # left running by a test session: reuse it
            cluster.wait_idle()
            return cluster
        raise Unavailable("a slurmctld not started by the tests is running on this machine: not touching it")
    install()
    cluster.write_config()
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def scontrol_job(job_id: str) -> dict[str, str]:
    """`scontrol show job -o` as a dict (MinJobAge keeps finished jobs for 300 s)."""
    text = _run("scontrol", "show", "job", "-o", job_id).stdout
    fields: dict[str, str] = {}
    for token in text.split():
        if "=" in token:
            key, value = token.split("=", 1)
            fields[key] = value
    return fields
