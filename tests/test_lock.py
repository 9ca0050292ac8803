"""Run-dir lock (pipeline/lock.py): a second erpd on the same run dir is refused; stale locks are taken over."""

import json
import os
import socket
import subprocess
import sys

import pytest

from erpd_megatron.pipeline import lock as L


def _write(run, **owner):
    run.mkdir(parents=True, exist_ok=True)
    (run / L.LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "time": 0, **owner}))


def test_live_owner_refused_and_released(tmp_path):
    run = tmp_path / "run"
    path = L.acquire(run)
    owner = json.loads(path.read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    with pytest.raises(L.RunDirLocked, match=f"in use by pid {os.getpid()} on host"):
        L.acquire(run)
    L.release(path)
    assert not path.exists()
    L.release(L.acquire(run))  # free again


def test_stale_locks_are_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for i, owner in enumerate([{"pid": dead.pid},  # process gone
                               {"pid": os.getpid(), "start_ticks": -1}]):  # pid reused by a later process
        run = tmp_path / f"r{i}"
        _write(run, **owner)
        with caplog.at_level("WARNING", logger="erpd.lock"):
            path = L.acquire(run)
        assert json.loads(path.read_text())["pid"] == os.getpid()
        assert "stale lock" in caplog.text
        L.release(path)
    run = tmp_path / "torn"
    run.mkdir()
    (run / L.LOCK_NAME).write_text('{"pid": 12')  # an older erpd killed while writing its lock
    with pytest.raises(L.RunDirLocked, match="being locked by another process"):  # young: maybe being written
        L.acquire(run)
    old = os.path.getmtime(run / L.LOCK_NAME) - L.UNREADABLE_GRACE_S - 1
    os.utime(run / L.LOCK_NAME, (old, old))
    L.release(L.acquire(run))  # old and unreadable: stale


def test_other_host_refused_with_how_to_remove(tmp_path):
    run = tmp_path / "run"
    _write(run, pid=1, host="node-b")
    with pytest.raises(L.RunDirLocked, match=f"node-b.*delete {run / L.LOCK_NAME}"):
        L.acquire(run)


def test_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _write(run, pid=1, host="node-b", slurm_job="4242", slurm_restart="0")  # the first attempt, on another node
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    with pytest.raises(L.RunDirLocked, match="node-b"):  # another job: refused
        L.acquire(run)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    with pytest.raises(L.RunDirLocked, match="node-b"):  # a second step of the same attempt: refused
        L.acquire(run)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    L.release(L.acquire(run))  # the same job requeued: its earlier attempt is over


def test_context_removes_only_what_it_created(tmp_path, monkeypatch):
    monkeypatch.delenv(L.ENV, raising=False)
    monkeypatch.delenv("RANK", raising=False)
    run = tmp_path / "new"
    with L.run_dir_lock(run) as path:
        assert path.exists() and os.environ[L.ENV] == str(run.resolve())
        with L.run_dir_lock(run) as inner:  # a torchrun rank under the launcher: no second lock
            assert inner is None
    assert not run.exists() and L.ENV not in os.environ  # nothing written: no empty run dir left behind


def test_second_erpd_run_refused(tmp_path):
    run = tmp_path / "run"
    _write(run, pid=os.getpid(), cmd="erpd run")  # this test process plays the first run
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", L.ENV)}
    r = subprocess.run([sys.executable, "-m", "erpd_megatron.cli", "run", f"run_dir={run}"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"is in use by pid {os.getpid()}" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in run.iterdir()) == [L.LOCK_NAME]  # refused before anything was written


def _racer(barrier, results, trials, root):
    """One of several processes: at each trial all are released at one instant onto the same run dir."""
    for t in range(trials):
        barrier.wait()
        try:
            path = L.acquire(f"{root}/t{t}")
            results.put((t, os.getpid(), True))
        except L.RunDirLocked:
            path = None
            results.put((t, os.getpid(), False))
        barrier.wait()  # every racer has tried: the winner lets go only now
        if path is not None:
            L.release(path)


@pytest.mark.parametrize("stale", [False, True], ids=["empty_dir", "stale_lock"])
def test_simultaneous_acquire_has_one_winner(tmp_path, stale):
    """Issue 25 row 1: racers released by a barrier at one instant, many trials; exactly one wins each, also when
    they all find a stale lock to take over (read-decide-remove-create under the run dir's flock)."""
    import multiprocessing as mp

    racers, trials = 4, 100
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for t in range(trials):
        (tmp_path / f"t{t}").mkdir()
        if stale:
            _write(tmp_path / f"t{t}", pid=dead.pid)
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(racers), ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(barrier, results, trials, str(tmp_path))) for _ in range(racers)]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in range(racers * trials)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    winners = {t: sum(ok for tt, _, ok in got if tt == t) for t in range(trials)}
    assert all(n == 1 for n in winners.values()), {t: n for t, n in winners.items() if n != 1}
    assert not any(p.name != L.LOCK_NAME for t in range(trials) for p in (tmp_path / f"t{t}").iterdir())


def test_file_system_without_hard_links_falls_back_to_o_excl(tmp_path, monkeypatch):
    import errno

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(L.os, "link", no_links)
    run = tmp_path / "run"
    path = L.acquire(run)
    assert json.loads(path.read_text())["pid"] == os.getpid()
    assert sorted(p.name for p in run.iterdir()) == [L.LOCK_NAME]  # no temp file left
    with pytest.raises(L.RunDirLocked, match="in use by"):
        L.acquire(run)
    L.release(path)
