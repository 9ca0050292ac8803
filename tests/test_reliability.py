"""Issue 25, end to end through `erpd` in a child process: what a refused, damaged, disk-full or stopped run leaves
behind and prints. The unit-level halves live beside the code they test (test_lock, test_config, test_io,
test_checkpoint_integrity, test_prompts, test_data_checks, test_cli)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_pipeline import clean_env

SMALL = ["--config", "micro", "data.prompts_per_batch=4", "rollout.n_samples=2", "rollout.max_new_tokens=8",
         "students={}", "onpolicy=null", "eval.every=0", "data.eval_prompts=2", "eval.k=1",
         "teachers={ce: {loss: ce, steps: 2, mini_batch_size: 8, save_every: 2}}"]


def erpd(*args, env=None, umask=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "erpd_megatron.cli", *map(str, args)], capture_output=True, text=True,
                          env=clean_env(**(env or {})), timeout=timeout,
                          preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def one_line_exit_2(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, the error is the last line of stderr (progress headers may come before it)."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert "Traceback" not in r.stderr and ": error: " in lines[-1], r.stderr[-3000:]
    assert sum(": error: " in x for x in lines) == 1, r.stderr[-3000:]
    for n in needles:
        assert n in lines[-1], lines[-1]
    return lines[-1]


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory, toy_base) -> Path:
    """An ERPD_CACHE whose entry for the demo base (`model.base: toy`) is the short test base, its files 0600 as
    a teammate's umask 077 left them: a run with `model.base=toy` copies it into `hf_base/` instead of warming
    up for minutes."""
    from erpd_megatron.toy.warmup import DEMO_BASE, WARMUP_JSON, cache_key, config_dict

    root = tmp_path_factory.mktemp("erpd_cache")
    entry = root / f"toy_base-{cache_key(DEMO_BASE)}"
    shutil.copytree(toy_base, entry)
    meta = json.loads((entry / WARMUP_JSON).read_text())
    meta["config"] = config_dict(DEMO_BASE)  # what the cache lookup compares (a mismatch warms up for minutes)
    (entry / WARMUP_JSON).write_text(json.dumps(meta))
    for f in entry.iterdir():
        f.chmod(0o600)
    return root


def test_refused_runs_leave_nothing_behind(tmp_path, demo_cache):
    """Rows 5 and 8: refusals after the toy data (data/) or the toy base (hf_base/) were written remove them; a
    run dir that existed keeps what it had. The toy data's size limit is refused like a JSONL file's (exit 2; more
    cases in tests/test_data_checks.py::test_toy_data_larger_than_the_task_is_refused_like_a_jsonl)."""
    run = tmp_path / "r"
    env = {"ERPD_CACHE": str(demo_cache)}
    one_line_exit_2(erpd("run", *SMALL, f"run_dir={run}", "iterations=20000", "iterate.promote=ce"),
                    "data.train: toy has 56704 prompts, fewer than data.prompts_per_batch * iterations = 4 * 20000")
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps({"problem": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(64)))
    one_line_exit_2(erpd("run", *SMALL, f"run_dir={run}", f"data.train={short}", "data.prompts_per_batch=16",
                         "iterations=5", "iterate.promote=ce"), f"data.train: {short} has 64 prompts, fewer than")  # after data/toy_eval
    assert not run.exists()
    one_line_exit_2(erpd("run", *SMALL, f"run_dir={run}", "rollout.max_new_tokens=64", env=env),  # after hf_base/
                    "rollout.max_new_tokens=64 leaves no room for a prompt in the model's 64 positions")
    long_ = tmp_path / "long.jsonl"
    long_.write_text("".join(json.dumps({"id": f"p{i}", "problem": "1+" * (30 if i == 3 else 1) + "1=",
                                         "answer": "1"}) + "\n" for i in range(8)))
    one_line_exit_2(erpd("run", *SMALL, f"run_dir={run}", f"data.train={long_}", env=env),
                    "prompt 'p3' has 65 tokens, more than 56 (the model's 64 positions")
    assert not run.exists()
    run.mkdir()
    (run / "notes.txt").write_text("mine\n")
    one_line_exit_2(erpd("run", *SMALL, f"run_dir={run}", "rollout.max_new_tokens=64", env=env), "leaves no room")
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def _store_with_batch(run: Path) -> Path:
    from erpd_megatron.data.rollout_store import RolloutRecord, RolloutStore

    store = RolloutStore(run / "rollouts")
    store.write_batch(0, [RolloutRecord(prompt_ids=[1, 2], response_ids=[3, 4], behaviour_logprobs=[-0.1, -0.2],
                                        reward=float(i % 2), group_id=i // 2) for i in range(8)])
    return run / "rollouts"


def test_integrity_failures_are_one_line_exit_2(tmp_path, toy_base):
    """Row 3: a damaged rollout manifest or batch file, or a damaged checkpoint, stops the command with one line
    naming the file, exit 2 (it was a traceback, exit 1)."""
    run = tmp_path / "r1"
    store = _store_with_batch(run)
    (store / "manifest.json").write_bytes(b'{"format": "erpd-rollout-store/1", "files": {\xff')
    one_line_exit_2(erpd("collect", *SMALL, f"run_dir={run}", f"model.base={toy_base}"),
                    f"{store / 'manifest.json'} is not a valid rollout-store manifest")
    run = tmp_path / "r2"
    store = _store_with_batch(run)
    data = bytearray((store / "batch_0.parquet").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (store / "batch_0.parquet").write_bytes(bytes(data))
    one_line_exit_2(erpd("collect", *SMALL, f"run_dir={run}", f"model.base={toy_base}"),
                    f"{store / 'batch_0.parquet'} is corrupt: sha256")
    ck = tmp_path / "ck" / "iter_0000001"
    ck.mkdir(parents=True)
    (ck / "shard.distcp").write_bytes(b"x" * 10)
    (ck / "erpd_checkpoint.json").write_text(json.dumps({"files": {"shard.distcp": {"size": 100, "sha256": "0"}}}))
    r = subprocess.run([sys.executable, "-m", "checkpoints_conv", "verify", "--hf", str(toy_base), "--mcore", str(ck)],
                       capture_output=True, text=True, env=clean_env(), timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == f"error: checkpoint {ck} is cut short or damaged: shard.distcp has " \
                                                "10 bytes, expected 100"


def _mount_tmpfs_cmd(size: str, where: Path, cmd: list[str]) -> list[str] | None:
    """`cmd` run in a private mount namespace with a tmpfs of `size` at `where`, or None where that is not
    possible (no unshare, no privilege for a user namespace)."""
    import shlex

    if shutil.which("unshare") is None:
        return None
    script = f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(where))} && exec {shlex.join(cmd)}"
    for flags in (["-m"], ["-r", "-m"]):  # root: a mount namespace; otherwise a user namespace mapped to root
        probe = subprocess.run(["unshare", *flags, "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {where} && true"],
                               capture_output=True)
        if probe.returncode == 0:
            return ["unshare", *flags, "sh", "-c", script]
    return None


def test_disk_full_during_the_base_import_on_a_small_tmpfs(tmp_path, toy_base):
    """Row 4: the run dir on a 256 KiB tmpfs (the base checkpoint is ~0.4 MB): one line naming the base directory
    and "No space left on device", exit 2, and no partial base a rerun would trust (torch's zip writer said only
    "unexpected pos 704 vs 598" in a 60-line traceback). Injected ENOSPC: tests/test_reliability.py::
    test_disk_full_during_the_base_import_injected."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    inner = [sys.executable, "-c", "import sys, os; from erpd_megatron.cli import main; rc = main(sys.argv[1:]); "
             f"print('LEFT', sorted(os.listdir({str(mnt / 'run')!r}))); sys.exit(rc)",
             "collect", *SMALL, f"run_dir={mnt / 'run'}", f"model.base={toy_base}"]
    cmd = _mount_tmpfs_cmd("256k", mnt, inner)
    if cmd is None:
        pytest.skip("cannot mount a tmpfs here (no unshare / user namespaces); the injected test covers the logic")
    r = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=600)
    line = one_line_exit_2(r, f"'{mnt / 'run' / 'base'}'", "No space left on device", "importing the base policy")
    assert line.startswith("erpd collect: error: [Errno 28]")
    (left,) = [x for x in r.stdout.splitlines() if x.startswith("LEFT")]
    assert "base" not in left and "incomplete" not in left, left  # no partial import left


def test_disk_full_during_the_base_import_injected(tmp_path, toy_base, monkeypatch):
    """Row 4 without a tmpfs: the converter's writer fails (an OSError without a file name, or torch's zip-writer
    RuntimeError that drops the errno while the disk is full): an OSError naming the directory."""
    import errno

    from checkpoints_conv import mcore_io
    from erpd_megatron.pipeline import context
    from erpd_megatron.utils import io

    out = tmp_path / "run" / "base"
    out.parent.mkdir()

    def partial_then(exc):
        def save_lazy(model, ckpt_dir, full_tensor):
            Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
            (Path(ckpt_dir) / "__0_0.distcp").write_bytes(b"x" * 100)
            raise exc
        return save_lazy

    Usage = type(shutil.disk_usage(tmp_path))
    for exc, free in ((OSError(errno.ENOSPC, "No space left on device"), None),
                      (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"), 4096)):
        monkeypatch.setattr(mcore_io, "save_lazy", partial_then(exc))
        if free is not None:
            monkeypatch.setattr(io.shutil, "disk_usage", lambda p, free=free: Usage(2**20, 2**20 - free, free))
        with pytest.raises(OSError) as e:
            context._import_in_process(toy_base, out)
        assert e.value.errno == errno.ENOSPC and e.value.filename == str(out), e.value
        assert "importing the base policy needs ~" in str(e.value) and "No space left on device" in str(e.value)
        assert sorted(p.name for p in out.parent.iterdir()) == []  # the partial import is gone
    monkeypatch.setattr(mcore_io, "save_lazy", partial_then(RuntimeError("a bug")))
    monkeypatch.setattr(io.shutil, "disk_usage", lambda p: Usage(2**40, 0, 2**40))
    with pytest.raises(RuntimeError, match="a bug"):  # not a full disk: the error stays what it was
        context._import_in_process(toy_base, out)


def _wait_for(proc: subprocess.Popen, cond, what: str, timeout: float = 600) -> None:
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"erpd ended ({proc.returncode}) before {what}:\n{proc.stderr.read()[-4000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"no {what} after {timeout} s")
        time.sleep(0.05)


def test_sigterm_and_sigint_stop_cleanly_and_the_run_resumes(tmp_path, demo_cache):
    """Rows 14 and 12: `erpd teacher` stopped by SIGTERM after its first checkpoint, rerun, stopped by SIGINT after a
    later one: each stop exits 128 + signal with one line, no traceback, releases the lock and leaves only complete
    checkpoints (or unfinished .tmp ones, as a kill does); the rerun resumes. Under umask 022 every file of the run
    dir is then 0644, hf_base/ included although the cache's files are 0600, and the RNG safetensors too."""
    from erpd_megatron.megatron import checkpoint as C
    from erpd_megatron.pipeline.lock import LOCK_NAME

    run = tmp_path / "run"
    ck = run / "ckpt" / "ce"
    argv = [sys.executable, "-m", "erpd_megatron.cli", "teacher", *SMALL, f"run_dir={run}",
            "teachers={ce: {loss: ce, steps: 400, mini_batch_size: 8, save_every: 2}}"]
    stops = ((signal.SIGTERM, 2), (signal.SIGINT, None))
    for sig, at in stops:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=clean_env(ERPD_CACHE=str(demo_cache)), preexec_fn=lambda: os.umask(0o022))
        n_before = len(C.list_checkpoints(str(ck)))
        newer = (lambda n=n_before: len(C.list_checkpoints(str(ck))) > n) if at is None else \
            (lambda at=at: (ck / C.iter_dirname(at)).is_dir() and bool(C.list_checkpoints(str(ck))))
        _wait_for(proc, newer, "a new checkpoint")
        proc.send_signal(sig)
        err = proc.communicate(timeout=120)[1]
        assert proc.returncode == 128 + sig, (proc.returncode, err[-4000:])
        # erpd's own output has no traceback (a math-reward worker killed at teardown was once seen starting one)
        assert "Traceback" not in err.replace("Process erpd-math-reward:\nTraceback", ""), err[-4000:]
        assert err.strip().splitlines()[-1] == f"erpd teacher: stopped by {sig.name}; the run dir is as after a kill: " \
                                               "rerun the same command to resume"
        assert not (run / LOCK_NAME).exists()
        if at is None:
            assert "resuming from step" in err, err[-4000:]
        else:  # the base came from demo_cache (a miss would warm the demo base up for minutes)
            assert "copied cached base" in err, err[-4000:]
        done = C.list_checkpoints(str(ck))
        assert done and all(C.verify_checkpoint_content(p) for p in done)
        assert C.resolve_checkpoint_dir(str(ck)) == done[-1]
        assert all(p.name.endswith(".tmp") or p.name == C.LATEST or str(p) in done for p in ck.iterdir())
    modes = {str(p.relative_to(run)): oct(stat.S_IMODE(p.stat().st_mode)) for p in run.rglob("*") if p.is_file()}
    assert any(k.startswith("hf_base/") for k in modes) and any(k.endswith("rank_00000.safetensors") for k in modes)
    assert {k: v for k, v in modes.items() if v != "0o644"} == {}
