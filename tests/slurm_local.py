"""A real one-node Slurm cluster (slurmctld + slurmd + munge) in a temporary folder, for the launcher tests.

Debian's packages (`apt-get install -y slurmctld slurmd slurm-client munge`, Slurm 22.05) and root are
needed: the daemons run as root (SlurmUser / SlurmdUser) and munged as the `munge` user. Everything the
cluster writes (munge key copy and socket, state, spool, logs, pid files) lives under one folder; the ports
are free ones picked at start, so it never touches a system Slurm or munge. Accounting is off (no slurmdbd),
so `sacct` has nothing: job state comes from `squeue` / `scontrol`.

    cluster = LocalSlurm.start()      # waits until the node is idle
    env = cluster.env()               # os.environ + SLURM_CONF (sbatch, srun, squeue, scontrol read it)
    cluster.stop()                    # SIGTERM to the daemons it started (by PID), then removes the folder

`python tests/slurm_local.py` starts one and prints the SLURM_CONF to export, for trying the launchers by hand.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "munged")


def missing() -> str | None:
    """Why a local cluster cannot start here, or None."""
    for exe in ("slurmctld", "slurmd", "sbatch", "munged"):
        if not shutil.which(exe) and not os.path.exists(f"/usr/sbin/{exe}"):
            return f"{exe} not installed (apt-get install -y slurmctld slurmd slurm-client munge)"
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (the daemons run as SlurmUser root)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no `munge` user (installed by the munge package)"
    if not os.path.exists("/etc/munge/munge.key"):
        return "no /etc/munge/munge.key (created by the munge package)"
    return None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def slurm_conf(root: Path, host: str, cpus: int, ports: list[int], partition: str) -> str:
    return f"""# one-node test cluster written by tests/slurm_local.py
ClusterName=erpdtest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s); at 10 s a
# loaded machine's slurmd revoked the old run's credential after the new one was issued (JobLaunchFailure)
AuthInfo=socket={root}/munge/run/munge.socket,cred_expire=30
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
# the node may declare more CPUs than the machine has: the tests run several small jobs at once
SlurmdParameters=config_overrides
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# finished jobs stay visible to squeue / scontrol for 10 minutes (there is no accounting database)
MinJobAge=600
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName={partition} Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class LocalSlurm:
    root: Path
    conf: Path
    partition: str
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    owns_root: bool = True

    @classmethod
    def start(cls, root: str | None = None, cpus: int = 2, partition: str = "debug",
              timeout: float = 60.0) -> LocalSlurm:
        why = missing()
        if why:
            raise RuntimeError(why)
        # munged wants every directory above its socket searchable by all: not pytest's 0700 tmp folders
        rootp = Path(root or tempfile.mkdtemp(prefix="erpd-slurm-"))
        rootp.chmod(0o755)
        for d in ("state", "spool", "log", "munge/etc", "munge/run", "munge/lib"):
            (rootp / d).mkdir(parents=True, exist_ok=True)
        munge = pwd.getpwnam("munge")
        for d, mode in (("munge", 0o755), ("munge/etc", 0o700), ("munge/run", 0o755), ("munge/lib", 0o700)):
            os.chown(rootp / d, munge.pw_uid, munge.pw_gid)
            (rootp / d).chmod(mode)
        key = rootp / "munge/etc/munge.key"
        shutil.copyfile("/etc/munge/munge.key", key)
        os.chown(key, munge.pw_uid, munge.pw_gid)
        key.chmod(0o600)
        host = socket.gethostname()
        conf = rootp / "slurm.conf"
        conf.write_text(slurm_conf(rootp, host, cpus, _free_ports(2), partition))
        c = cls(root=rootp, conf=conf, partition=partition, owns_root=root is None)
        try:
            c._spawn("munged", [_exe("munged"), "--foreground", f"--socket={rootp}/munge/run/munge.socket",
                                f"--key-file={key}", f"--pid-file={rootp}/munge/run/munged.pid",
                                f"--log-file={rootp}/munge/lib/munged.log", f"--seed-file={rootp}/munge/lib/seed"],
                     user="munge")
            c._wait(lambda: (rootp / "munge/run/munge.socket").exists(), timeout, "munged socket")
            c._spawn("slurmctld", [_exe("slurmctld"), "-D", "-i", "-f", str(conf)])
            c._spawn("slurmd", [_exe("slurmd"), "-D", "-f", str(conf)])
            c._wait(c._node_idle, timeout, "node idle in sinfo")
        except BaseException:
            c.stop()
            raise
        return c

    def _spawn(self, name: str, argv: list[str], user: str | None = None) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, user=user,
                                            start_new_session=True)
        log.close()

    def _wait(self, ok, timeout: float, what: str) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode} while waiting for {what}:\n{self.logs()}")
            if ok():
                return
            time.sleep(0.2)
        raise TimeoutError(f"local Slurm: no {what} after {timeout:.0f} s:\n{self.logs()}")

    def _node_idle(self) -> bool:
        p = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env(), capture_output=True, text=True)
        return p.returncode == 0 and p.stdout.strip() == "idle"

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf), **extra}

    def logs(self, tail: int = 30) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")) + [self.root / "munge/lib/munged.log"]:
            if f.exists():
                out.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-tail:]))
        return "\n".join(out)

    def stop(self) -> None:
        """Cancel what is left, stop the daemons this object started (their PIDs only), remove the folder."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--user", "root"], env=self.env(), capture_output=True, timeout=30)
        for name in DAEMONS:  # controller first, munge last (the others need it to shut down cleanly)
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        if self.owns_root:
            shutil.rmtree(self.root, ignore_errors=True)


if __name__ == "__main__":
    c = LocalSlurm.start(cpus=int(os.environ.get("CPUS", "2")))
    print(f"export SLURM_CONF={c.conf}\n# daemons: " + " ".join(f"{n}={p.pid}" for n, p in c.procs.items())
          + f"\n# Ctrl-C or kill {os.getpid()} stops them", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: c.stop() or os._exit(0))
    try:
        signal.pause()
    except KeyboardInterrupt:
        c.stop()
