"""A real one-node SLURM cluster on this machine, for the launcher tests and the submit benchmark.

    with LocalSlurm(tmp_path) as cluster:      # munged + slurmctld + slurmd, state and spool under tmp_path
        subprocess.run(["sbatch", ...], env=cluster.env)

Debian's packages (slurmctld, slurmd, slurm-client, munge; 22.05 on bookworm) are installed with apt-get when they
are missing and we are root (a fresh CI machine); otherwise `SlurmUnavailable` says why. The cluster is one node,
`localhost`, with `cpus` CPUs (one task per CPU), no accounting (sacct is not needed: submitit's job states fall
back to the result pickles, and `ddistill jobs` asks squeue), `ProctrackType=proctrack/linuxproc` and
`TaskPlugin=task/none` (no cgroups inside containers), munge with a key generated for this cluster, and ports
picked free at start, so several clusters (several test sessions) can run side by side. Every client command must
see `SLURM_CONF` (use `cluster.env`, or `cluster.activate()` for this process).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "sinfo", "squeue", "scontrol", "scancel")


class SlurmUnavailable(RuntimeError):
    """SLURM is not installed and cannot be installed here (not root, no apt-get, or apt-get failed)."""


def apt_install(packages: tuple[str, ...] | list[str], binaries: tuple[str, ...] | list[str]) -> None:
    """Install Debian `packages` when one of `binaries` is missing (root with apt-get only); SlurmUnavailable
    with the reason otherwise."""
    def missing() -> list[str]:
        return [name for name in binaries if shutil.which(name) is None and not Path(f"/usr/sbin/{name}").exists()]

    if not missing():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"missing {missing()} and cannot install {list(packages)} (needs root + apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    if missing():
        raise SlurmUnavailable(f"still missing after installing {list(packages)}: {missing()}")


def ensure_installed() -> None:
    """Install the Debian SLURM packages when a binary is missing (root with apt-get only)."""
    apt_install(PACKAGES, BINARIES)


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def slurm_conf_text(root: Path, *, cpus: int, ctld_port: int, slurmd_port: int, munge_socket: Path) -> str:
    """slurm.conf of the one-node cluster (state, spool, logs and pid files under root)."""
    return "\n".join([
        "ClusterName=ddistill-ci",
        "SlurmctldHost=localhost",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/slurmctld.pid",
        f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmctldLogFile={root}/slurmctld.log",
        f"SlurmdLogFile={root}/slurmd.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/builtin",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/none",
        "MpiDefault=none",
        "ReturnToService=2",
        "SlurmctldTimeout=30",
        "SlurmdTimeout=30",
        "KillWait=30",
        "MinJobAge=600",
        "InactiveLimit=0",
        "JobRequeue=1",
        f"NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
        "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


class LocalSlurm:
    """munged, slurmctld and slurmd for a one-node cluster under `root`; stopped (and nothing left) on exit."""

    def __init__(self, root: Path, *, cpus: int = 2, start_timeout_s: float = 60.0):
        self.root = Path(root)
        self.cpus = cpus
        self.start_timeout_s = start_timeout_s
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> "LocalSlurm":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        ensure_installed()
        for sub in ("state", "spool", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        munge = self.root / "munge"
        os.chmod(munge, 0o700)
        key = munge / "munge.key"
        subprocess.run([_sbin("mungekey"), "--create", f"--keyfile={key}", "--force"], check=True,
                       capture_output=True)
        os.chmod(key, 0o600)
        socket_path = munge / "munge.socket"
        self._spawn([_sbin("munged"), "--foreground", "--force", f"--key-file={key}", f"--socket={socket_path}",
                     f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
                     f"--seed-file={munge}/munged.seed"], "munged")
        self._wait(lambda: socket_path.exists(), "munged socket")
        ctld_port, slurmd_port = _free_ports(2)
        self.conf.write_text(slurm_conf_text(self.root, cpus=self.cpus, ctld_port=ctld_port,
                                             slurmd_port=slurmd_port, munge_socket=socket_path))
        self._spawn([_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld")
        self._wait(lambda: self._run(["scontrol", "ping"]).stdout.count("UP") > 0, "slurmctld (scontrol ping)")
        self._spawn([_sbin("slurmd"), "-D", "-N", "localhost", "-f", str(self.conf)], "slurmd")
        self._wait(lambda: self.node_state() == "idle", "node localhost idle (sinfo)")

    def activate(self, monkeypatch) -> None:
        """Point this process's SLURM clients (submitit's sbatch/squeue/scontrol calls) at this cluster."""
        monkeypatch.setenv("SLURM_CONF", str(self.conf))

    def node_state(self) -> str:
        return self._run(["sinfo", "-h", "-N", "-o", "%t"]).stdout.strip()

    def queue(self) -> list[str]:
        """The ids of the jobs the controller lists as pending or running."""
        return self._run(["squeue", "-h", "-o", "%i"]).stdout.split()

    def job_state(self, job_id: str) -> str:
        out = self._run(["squeue", "-h", "-j", str(job_id), "-o", "%T"]).stdout.strip()
        return out or "GONE"

    def scontrol(self, *args: str) -> str:
        proc = self._run(["scontrol", *args])
        if proc.returncode != 0:
            raise RuntimeError(f"scontrol {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / name
            if path.is_file():
                parts.append(f"--- {name} (tail) ---\n" + "\n".join(path.read_text().splitlines()[-40:]))
        return "\n".join(parts)

    def stop(self) -> None:
        if self.conf.is_file():  # cancel what is left, so that slurmd leaves no job processes behind
            self._run(["scancel", "--user=root"])
            deadline = time.time() + 30
            while time.time() < deadline and self._run(["squeue", "-h"]).stdout.strip():
                time.sleep(0.5)
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self._procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            try:  # job step daemons (slurmstepd) and tasks left in the daemon's process group
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._procs.clear()

    # ------------------------------------------------------------------ helpers
    def _run(self, cmd: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)

    def _spawn(self, cmd: list[str], name: str) -> None:
        log = open(self.root / f"{name}.stdout", "w")
        self._procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True))
        log.close()

    def _wait(self, ready, what: str) -> None:
        deadline = time.time() + self.start_timeout_s
        while time.time() < deadline:
            for proc in self._procs:
                if proc.poll() is not None:
                    raise SlurmUnavailable(f"{proc.args[0]} exited ({proc.returncode}) while waiting for {what}:\n"
                                           + self.logs() + self._stdout_tails())
            if ready():
                return
            time.sleep(0.2)
        raise SlurmUnavailable(f"timed out after {self.start_timeout_s:.0f} s waiting for {what}:\n" + self.logs()
                               + self._stdout_tails())

    def _stdout_tails(self) -> str:
        return "".join(f"\n--- {p.name} ---\n{p.read_text()[-1500:]}" for p in self.root.glob("*.stdout"))
