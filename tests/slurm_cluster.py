"""A single-node SLURM cluster on localhost for the tests: munged, slurmctld and slurmd from
Debian's packages (``slurm-wlm``, ``munge``), each started in the foreground by this process
with its own key, config, state, spool and log files in one temporary folder, and stopped by
its pid.

    with LocalSlurm.start(cpus=2) as cluster:      # or LocalSlurm.start() + cluster.stop()
        job = cluster.sbatch(script, cwd=other_folder)
        cluster.wait(job, timeout=600)

Client commands (``sbatch``, ``squeue``, ``scontrol``, ``scancel``) find the cluster through
``SLURM_CONF`` in :attr:`LocalSlurm.env`; jobs inherit it from ``sbatch``'s environment, so the
``srun`` inside a job reaches the same controller. Nothing listens beyond what slurmctld and
slurmd open on two free ports; the node's address is 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# The programs a cluster needs: the daemons (Debian puts them in /usr/sbin) and the clients.
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "sinfo", "squeue", "scontrol", "scancel", "srun")
SBIN = ("/usr/sbin", "/sbin")
NODE = "localhost"  # the node's name; slurmd is told it (-N), so the host's name plays no part
START_TIMEOUT_S = 60.0  # daemons up and the node idle
STOP_TIMEOUT_S = 15.0  # after SIGTERM, before SIGKILL
POLL_S = 0.5
# Job states after which a job does nothing more (squeue/scontrol names).
FINISHED_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                             "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"})


def find_program(name: str) -> str | None:
    """The path of ``name`` on PATH or in the sbin folders (not always on a user's PATH)."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def missing_programs() -> list[str]:
    """The SLURM and munge programs that are not installed."""
    return [name for name in (*DAEMONS, *CLIENTS) if find_program(name) is None]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class LocalSlurm:
    """A running single-node cluster (see the module docstring)."""

    folder: Path  # config, key, state, spool, logs; removed by stop()
    conf: Path  # slurm.conf
    cpus: int  # CPUs the node offers
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)  # daemon name -> it

    @property
    def env(self) -> dict[str, str]:
        """The environment for client commands (and the jobs they submit)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    @classmethod
    def start(cls, cpus: int = 2) -> LocalSlurm:
        """Start munged, slurmctld and slurmd; stop whatever started if one fails. Raises
        RuntimeError with the daemons' logs when the node does not become idle."""
        missing = missing_programs()
        if missing:
            raise RuntimeError(f"not installed: {', '.join(missing)} (apt-get install "
                               "slurm-wlm munge)")
        # Short path: munge's socket path must fit a unix socket address (108 bytes).
        folder = Path(tempfile.mkdtemp(prefix="dpt-slurm-"))
        folder.chmod(0o700)  # munged refuses keys and sockets in folders others can write
        cluster = cls(folder=folder, conf=folder / "slurm.conf", cpus=cpus)
        try:
            cluster._start_daemons()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start_daemons(self) -> None:
        f = self.folder
        for sub in ("state", "spool", "munge"):
            (f / sub).mkdir(mode=0o700)
        key = f / "munge" / "munge.key"
        subprocess.run([find_program("mungekey"), "--create", f"--keyfile={key}"], check=True,
                       capture_output=True)
        socket_path = f / "munge" / "munge.socket"
        self._spawn("munged", [find_program("munged"), "--foreground", "--force",
                               f"--key-file={key}", f"--socket={socket_path}",
                               f"--pid-file={f / 'munged.pid'}", f"--log-file={f / 'munged.log'}",
                               f"--seed-file={f / 'munge' / 'munged.seed'}"])
        self._wait_for(lambda: socket_path.exists(), "munged's socket")
        self.conf.write_text(slurm_conf(f, socket_path, self.cpus))
        self._spawn("slurmctld", [find_program("slurmctld"), "-D", "-c", "-f", str(self.conf)])
        self._spawn("slurmd", [find_program("slurmd"), "-D", "-N", NODE, "-f", str(self.conf)])
        self._wait_for(self._node_idle, "the node to be idle")

    def _spawn(self, name: str, argv: list[str]) -> None:
        with open(self.folder / f"{name}.out", "wb") as log:  # the daemon keeps its own copy
            self.processes[name] = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, start_new_session=True)

    def _wait_for(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():
            dead = [n for n, p in self.processes.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"SLURM did not start ({', '.join(dead) or 'timeout'} "
                                   f"waiting for {what}):\n{self.logs()}")
            time.sleep(POLL_S)

    def _node_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-n", NODE, "-o", "%T", check=False).stdout
        return out.strip().rstrip("*") == "idle"

    def run(self, *argv: str, cwd: Path | None = None, check: bool = True
            ) -> subprocess.CompletedProcess:
        """A client command against this cluster."""
        return subprocess.run(list(argv), cwd=cwd, env=self.env, capture_output=True,
                              text=True, check=check, timeout=START_TIMEOUT_S)

    def sbatch(self, script: Path, *options: str, cwd: Path) -> int:
        """Submit ``script`` from ``cwd``; returns the job id."""
        out = self.run("sbatch", "--parsable", *options, str(script), cwd=cwd).stdout
        return int(out.strip().split(";")[0])

    def states(self, job: int) -> dict[str, str]:
        """Array task id (or the job id) -> state, for every task SLURM still knows of."""
        out = self.run("scontrol", "-o", "show", "job", str(job), check=False).stdout
        states = {}
        for line in out.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            states[fields.get("ArrayTaskId", fields.get("JobId", ""))] = fields["JobState"]
        return states

    def wait(self, job: int, timeout: float) -> dict[str, str]:
        """Wait until every task of ``job`` has finished; returns their states."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.states(job)
            if states and all(s in FINISHED_STATES for s in states.values()):
                return states
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job} still {states} after {timeout:.0f} s:\n"
                                   f"{self.logs()}")
            time.sleep(POLL_S)

    def logs(self) -> str:
        """The end of every daemon's log, for failure messages."""
        parts = []
        for name in sorted(self.folder.glob("*.log")) + sorted(self.folder.glob("*.out")):
            text = name.read_text(errors="replace")[-3000:]
            parts.append(f"--- {name.name}\n{text}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop the daemons by their pids (SIGTERM, then SIGKILL) and remove the folder. Jobs
        still queued or running are cancelled first, so that no job's processes outlive the
        cluster."""
        try:
            self._cancel_jobs()
        except (subprocess.SubprocessError, OSError):
            pass  # the daemons are stopped below all the same
        for name in ("slurmd", "slurmctld", "munged"):  # the reverse of their start
            process = self.processes.pop(name, None)
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _cancel_jobs(self) -> None:
        if "slurmctld" not in self.processes or self.processes["slurmctld"].poll() is not None:
            return
        self.run("scancel", "--full", "--user", str(os.getuid()), check=False)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip():
            if time.monotonic() > deadline:
                return
            time.sleep(POLL_S)

    def __enter__(self) -> LocalSlurm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def slurm_conf(folder: Path, munge_socket: Path, cpus: int) -> str:
    """A slurm.conf for one node on 127.0.0.1: no cgroups (linuxproc tracking), no
    accounting, cores as the unit of allocation (two one-CPU tasks run side by side)."""
    return "\n".join([
        "ClusterName=dptfast",
        f"SlurmctldHost={NODE}(127.0.0.1)",
        f"SlurmctldPort={free_port()}",
        f"SlurmdPort={free_port()}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        f"StateSaveLocation={folder / 'state'}",
        f"SlurmdSpoolDir={folder / 'spool'}",
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
        f"SlurmdPidFile={folder / 'slurmd.pid'}",
        f"SlurmctldLogFile={folder / 'slurmctld.log'}",
        f"SlurmdLogFile={folder / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "MpiDefault=none",
        "ReturnToService=2",
        "KillWait=5",
        "MinJobAge=600",  # finished jobs stay visible to scontrol while the test reads them
        f"NodeName={NODE} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
        f"PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])
