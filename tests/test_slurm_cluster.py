"""The launchers against a real one-node Slurm (tests/slurm_local.py): both executors, requeue + resume,
the pre-timeout USR1 path, retries of a failing trainer, and a two-task torchrun rendezvous.

Every job is submitted at once by one module fixture and runs concurrently on the node (declared with 8
CPUs; the jobs are small), so the module costs about as long as its longest job. The real trainer runs
the micro preset shrunk to one CE teacher of 3 steps; the USR1 and failure jobs run a stand-in trainer
(a shell line), since what they test is the batch script and Slurm, not training.

Skipped where Slurm is not installed, unless ERPD_REQUIRE_SLURM=1 (set by .ci/run), where it fails.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launchers import slurm
from launchers.cli import main as launch_main
from launchers.recipes import apply_overrides, get_recipe

sys.path.insert(0, str(Path(__file__).resolve().parent))
import slurm_local  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
HAS_NEMO = __import__("importlib").util.find_spec("nemo_run") is not None

# the micro preset, one CE teacher, no students / on-policy baseline: one checkpoint per step
MICRO = ["teachers={ce: {loss: ce, steps: 3, mini_batch_size: 32, lr: 1.0e-4, save_every: 1}}", "students={}",
         "onpolicy=null", "eval.k=1", "eval.every=3", "data.eval_prompts=8", "data.prompts_per_batch=8",
         "rollout.max_new_tokens=16"]

# stand-in trainers: what the batch script does around them is the subject
FAKE = {
    # first run sleeps into the time limit's USR1; the requeued run finishes at once
    "usr1": 'echo "fake trainer restart ${SLURM_RESTART_COUNT:-0}"; '
            'if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then sleep 300; fi; echo done',
    "fail": 'echo "fake trainer restart ${SLURM_RESTART_COUNT:-0} fails"; exit 3',
}


@pytest.fixture(scope="module")
def cluster():
    why = slurm_local.missing()
    if why:
        if os.environ.get("ERPD_REQUIRE_SLURM") == "1":
            pytest.fail(f"ERPD_REQUIRE_SLURM=1 but no local Slurm: {why}")
        pytest.skip(f"no local Slurm: {why}")
    c = slurm_local.LocalSlurm.start(cpus=8)
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(c.conf)  # sbatch / scontrol of the launchers and of nemo-run read it
    yield c
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old
    c.stop()


def _recipe(root: Path, name: str, *items: str, trainer: str | None = None):
    r = apply_overrides(get_recipe("cpu_micro"), [f"run_root={root}", f"name={name}", f"slurm.host_code_dir={REPO}",
                                                  f"slurm.python={sys.executable}", "slurm.container_image=",
                                                  "slurm.account=", "slurm.partition=", *items])
    if trainer is not None:
        r.trainer = ["bash", "-c", FAKE[trainer]]
    return r


def _submit(r, executor: str) -> str:
    if executor == "sbatch":
        return slurm.submit(slurm.write_sbatch(r), r)
    from launchers import nemo

    _, job = nemo.run_slurm(r, dryrun=False)
    assert job, "nemo-run returned no job id"
    return job


@pytest.fixture(scope="module")
def jobs(cluster, toy_base, tmp_path_factory):
    """Submit every job of the module at once; name -> (recipe, job id)."""
    root = tmp_path_factory.mktemp("slurm_runs")
    old_home = os.environ.get("NEMORUN_HOME")
    os.environ["NEMORUN_HOME"] = str(root / "nemo_home")  # nemo-run's experiment index: not ~/.nemo_run
    stdin, sys.stdin = sys.stdin, open(os.devnull)  # nemo-run's submission (invoke) reads stdin
    base = f"model.base={toy_base}"
    plan = {  # name: (executor, recipe)
        "ref": ("sbatch", _recipe(root, "ref", base, *MICRO)),
        "dp2": ("sbatch", _recipe(root, "dp2", base, *MICRO, "torchrun=true", "tasks_per_node=2", "layout.dp=2")),
        "usr1_sbatch": ("sbatch", _recipe(root, "usr1_sbatch", "slurm.time=2", "slurm.requeue_signal_s=40",
                                          trainer="usr1")),
        "fail_sbatch": ("sbatch", _recipe(root, "fail_sbatch", "slurm.max_retries=1", trainer="fail")),
    }
    if HAS_NEMO:
        plan["requeue_nemo"] = ("nemo", _recipe(root, "requeue_nemo", base, *MICRO))
        plan["usr1_nemo"] = ("nemo", _recipe(root, "usr1_nemo", "slurm.time=2", "slurm.requeue_signal_s=40",
                                             trainer="usr1"))
        plan["fail_nemo"] = ("nemo", _recipe(root, "fail_nemo", "slurm.max_retries=1", trainer="fail"))
    else:  # the requeue test still runs, through the plain path
        plan["requeue_sbatch"] = ("sbatch", _recipe(root, "requeue_sbatch", base, *MICRO))
    try:
        out = {name: (r, _submit(r, ex)) for name, (ex, r) in plan.items()}
        out["anywhere"] = _submit_from_elsewhere(root / "elsewhere", base)
    finally:
        sys.stdin.close()
        sys.stdin = stdin
    yield out
    if old_home is None:
        os.environ.pop("NEMORUN_HOME", None)
    else:
        os.environ["NEMORUN_HOME"] = old_home


def _submit_from_elsewhere(cwd: Path, base: str) -> tuple[Path, str]:
    """`python -m launchers run cpu_micro --executor sbatch` as a user types it in a folder outside the checkout:
    no code dir, no interpreter, a relative run_root. Returns (run dir, job id)."""
    cwd.mkdir()
    cmd = [sys.executable, "-m", "launchers", "run", "cpu_micro", "--executor", "sbatch", "run_root=runs",
           "name=anywhere", "slurm.container_image=", "slurm.account=", "slurm.partition=", base, *MICRO]
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "SLURM_CONF": os.environ[
        "SLURM_CONF"]})
    assert out.returncode == 0, out.stderr[-3000:]
    return cwd / "runs" / "anywhere", json.loads(out.stderr.strip().splitlines()[-1])["job_id"]


def _state(job: str) -> dict:
    return slurm.job_state(job)


def _wait(cluster, job: str, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=600.0,
          restarts: int | None = None) -> dict:
    t0, done_since = time.monotonic(), None
    while time.monotonic() - t0 < timeout:
        s = _state(job)
        if s["state"] in states and (restarts is None or int(s["restarts"]) >= restarts):
            return s
        # finished without the restarts asked for: give a pending requeue 30 s, then report it
        done_since = (done_since or time.monotonic()) if s["state"] in ("COMPLETED", "FAILED", "TIMEOUT") else None
        if done_since and time.monotonic() - done_since > 30:
            return s
        time.sleep(1.0)
    raise TimeoutError(f"job {job}: {s} after {timeout:.0f} s\n{cluster.logs()}")


def _logs(r) -> str:
    run = Path(r.run_dir)
    return "\n".join(p.read_text(errors="replace") for p in sorted(run.rglob("*.out")))


def _same(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return a == b


def _untimed(x):
    # wall-clock fields (wall_s, stage_times, ...) are the only ones a resumed run may change
    if isinstance(x, dict):
        return {k: _untimed(v) for k, v in x.items() if not (k.endswith("_s") or "time" in k)}
    return [_untimed(v) for v in x] if isinstance(x, list) else x


def _summary(r) -> dict:
    return _untimed(json.loads((Path(r.run_dir) / "summary.json").read_text()))


def test_requeued_job_resumes_with_the_same_summary(cluster, jobs, capsys):
    """`scontrol requeue` after the first checkpoint: the rerun resumes from it and the run ends with the
    summary of the uninterrupted run (same config, other run dir). Both executors' jobs complete, and
    `python -m launchers status` reports them from scontrol (there is no accounting)."""
    name = "requeue_nemo" if "requeue_nemo" in jobs else "requeue_sbatch"
    r, job = jobs[name]
    ckpt = Path(r.run_dir) / "ckpt" / "ce" / "iter_0000001"
    t0 = time.monotonic()
    while not ckpt.exists():
        assert time.monotonic() - t0 < 600, f"no checkpoint after 600 s: {_state(job)}\n{_logs(r)[-3000:]}"
        assert _state(job)["state"] in ("PENDING", "RUNNING", "CONFIGURING"), f"{_state(job)}\n{_logs(r)[-3000:]}"
        time.sleep(0.2)
    subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True)
    s = _wait(cluster, job, states=("COMPLETED", "FAILED"), restarts=1)
    assert s["state"] == "COMPLETED" and s["restarts"] == "1", f"{s}\n{_logs(r)[-3000:]}"
    assert "ce: resuming from step" in _logs(r)
    ref, ref_job = jobs["ref"]
    s_ref = _wait(cluster, ref_job)
    assert s_ref["state"] == "COMPLETED" and s_ref["restarts"] == "0", f"{s_ref}\n{_logs(ref)[-3000:]}"
    assert _same(_summary(r), _summary(ref))
    assert launch_main(["status", job]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["state"] == "COMPLETED" and st["source"] == "scontrol" and st["exit_code"] == "0:0"


@pytest.mark.parametrize("executor", ["sbatch", "nemo"])
def test_usr1_before_time_limit_requeues(cluster, jobs, executor):
    """--time=2 with the signal 40 s before it: slurmctld checks every 30 s and sends it once the time left is
    under 40 + 30 s, so it lands 50-80 s in, after the trainer step started (nemo-run signals the steps
    that exist then; earlier it would be lost). The first run (sleeping) is signalled, the job requeues
    itself and the rerun finishes. Plain script: USR1 to the batch shell's trap; nemo-run: USR1 to the
    task, whose non-zero exit goes through its retry block."""
    if f"usr1_{executor}" not in jobs:
        pytest.skip("nemo-run not installed (optional extra `launch`)")
    r, job = jobs[f"usr1_{executor}"]
    s = _wait(cluster, job, restarts=1, timeout=300)
    log = _logs(r)
    assert s["state"] == "COMPLETED" and s["restarts"] == "1", f"{s}\n{log[-3000:]}"
    assert "fake trainer restart 1" in log and "done" in log
    if executor == "sbatch":
        assert "USR1: time limit near" in log


@pytest.mark.parametrize("executor", ["sbatch", "nemo"])
def test_failing_trainer_exits_nonzero_and_retries_only_while_allowed(cluster, jobs, executor):
    """max_retries=1: the failing trainer runs twice (restart 0 requeues, restart 1 has none left), and the
    job ends FAILED with the trainer's exit code."""
    if f"fail_{executor}" not in jobs:
        pytest.skip("nemo-run not installed (optional extra `launch`)")
    r, job = jobs[f"fail_{executor}"]
    s = _wait(cluster, job, states=("FAILED",), restarts=1, timeout=300)
    time.sleep(3)  # a third run would have been requeued by now
    s = _state(job)
    log = _logs(r)
    assert s["state"] == "FAILED" and s["restarts"] == "1" and s["exit_code"] == "3:0", f"{s}\n{log[-3000:]}"
    assert "fake trainer restart 1 fails" in log and "fake trainer restart 2" not in log


def test_two_tasks_rendezvous_over_torchrun(cluster, jobs):
    """2 Slurm tasks x 1 process on the node: srun starts two torchrun agents (node ranks from
    SLURM_PROCID) that meet at MASTER_ADDR (scontrol's first host):MASTER_PORT with the job id as
    rendezvous id, and the micro pipeline trains at DP=2 over gloo to the end."""
    r, job = jobs["dp2"]
    s = _wait(cluster, job)
    log = _logs(r)
    assert s["state"] == "COMPLETED", f"{s}\n{log[-4000:]}"
    script = (Path(r.run_dir) / "slurm" / "dp2.sbatch").read_text()
    assert "--ntasks-per-node=2" in script and "--nnodes=2 --nproc-per-node=1" in script
    assert "dp=2" in log  # the trainer's parallel layout line
    assert "ce" in json.loads((Path(r.run_dir) / "summary.json").read_text())["methods"]


# Last in the module: it waits for its own job to finish, and the requeue test must catch its job mid-teacher (run
# before it, this test let that job finish first, and the requeue then restarted a completed job).
def test_launched_from_outside_the_checkout(cluster, jobs):
    """The job submitted from a temporary folder runs the launcher's own code (cd + PYTHONPATH to it), finds its
    preset by name and writes its run under the caller's folder: the micro run completes."""
    run, job = jobs["anywhere"]
    s = _wait(cluster, job)
    log = "\n".join(p.read_text(errors="replace") for p in sorted(run.rglob("*.out")))
    assert s["state"] == "COMPLETED", f"{s}\n{log[-4000:]}"
    script = (run / "slurm" / "anywhere.sbatch").read_text()
    assert f"cd {REPO} && exec" in script and "--config micro " in script
    assert "ce" in json.loads((run / "summary.json").read_text())["methods"]
