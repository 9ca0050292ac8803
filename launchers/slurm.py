"""Plain sbatch path (no nemo-run): render a recipe into one batch script, submit it, ask sacct.

The script is what the nemo-run path produces, written out by hand: one `srun` job step per group
(training, and the SGLang servers of a disaggregated recipe as a second heterogeneous group), each task
a container (pyxis flags) running `torchrun --nnodes N --nproc-per-node G --node-rank $SLURM_NODEID
--rdzv-endpoint $MASTER_ADDR:$MASTER_PORT` on its node. The node rank and the host lists are expanded
inside each task (`bash -c '...'`), not in the batch shell, so every node gets its own.

Requeue and resume: `#SBATCH --requeue` lets Slurm requeue on preemption / node failure; the script
requeues itself on a non-zero exit and, through `--signal=B:USR1@T`, shortly before the time limit, up
to MAX_RETRIES times (SLURM_RESTART_COUNT counts them). The rerun executes the same trainer command with
the same run_dir, and the trainer resumes from its last checkpoint there.
"""

from __future__ import annotations

import os
import shlex
import subprocess

from launchers.recipes import Recipe


def _arg(a: str) -> str:
    # keep $VARS expandable inside the task (double quotes), quote everything else
    if "$" in a:
        return '"' + a.replace('"', '\\"') + '"'
    return shlex.quote(a)


def trainer_task_command(recipe: Recipe, nnodes: int) -> str:
    """Shell command one task (one node) runs: torchrun over the node's GPUs, or the plain command."""
    argv = recipe.trainer_argv()
    if recipe.torchrun:
        if argv[0] == "erpd":  # the `erpd` console script == python -m erpd_megatron.cli
            argv = ["-m", "erpd_megatron.cli"] + argv[1:]
        argv = ["torchrun", f"--nnodes={nnodes}", f"--nproc-per-node={recipe.gpus_per_node}",
                "--node-rank=$SLURM_NODEID", "--rdzv-backend=c10d", "--rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT",
                "--rdzv-id=$SLURM_JOB_ID"] + argv
    return f"cd {shlex.quote(recipe.slurm.code_dir)} && exec " + " ".join(_arg(a) for a in argv)


def rollout_task_command(recipe: Recipe) -> str:
    assert recipe.rollout_servers is not None
    argv = recipe.rollout_servers.command()
    return f"cd {shlex.quote(recipe.slurm.code_dir)} && exec " + " ".join(_arg(a) for a in argv)


def container_mounts(recipe: Recipe) -> list[str]:
    s = recipe.slurm
    host_code = os.path.abspath(s.host_code_dir or os.getcwd())
    run_root = os.path.abspath(recipe.run_root)
    return [f"{host_code}:{s.code_dir}", f"{run_root}:{run_root}"] + list(s.container_mounts)


def container_flags(recipe: Recipe) -> list[str]:
    s = recipe.slurm
    return [f"--container-image={s.container_image}", f"--container-mounts={','.join(container_mounts(recipe))}",
            f"--container-workdir={s.code_dir}"]


def job_env(recipe: Recipe) -> dict[str, str]:
    env = dict(recipe.slurm.env)
    env["PYTHONPATH"] = recipe.slurm.code_dir
    env["ERPD_RUN_DIR"] = os.path.abspath(recipe.run_dir)
    return env


def rollout_urls_line(recipe: Recipe, group: int = 1) -> str:
    """Batch-shell line exporting ROLLOUT_URLS=[http://host:port,...] of the SGLang group's nodes."""
    port = recipe.rollout_servers.port if recipe.rollout_servers else 30000
    return (f'export ROLLOUT_URLS="[$(scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_{group}" '
            f"| sed 's|.*|http://&:{port}|' | paste -sd, -)]\"")


def _sbatch_group(recipe: Recipe, nodes: int, gpus: int, job_name: str) -> list[str]:
    s = recipe.slurm
    flags = {"job-name": job_name, "account": s.account, "partition": s.partition, "time": s.time,
             "nodes": nodes, "ntasks-per-node": 1, "gpus-per-node": gpus}
    lines = [f"#SBATCH --{k}={v}" for k, v in flags.items()]
    if s.exclusive:
        lines.append("#SBATCH --exclusive")
    lines += [f"#SBATCH --{k}={v}" for k, v in s.extra_sbatch.items()]
    return lines


def render_sbatch(recipe: Recipe) -> str:
    """The whole batch script for `recipe` (homogeneous, or heterogeneous with a rollout group)."""
    s = recipe.slurm
    run_dir = os.path.abspath(recipe.run_dir)
    job = s.job_name or f"erpd-{recipe.name}"
    het = recipe.rollout_servers is not None
    lines = ["#!/bin/bash",
             f"# erpd-megatron launcher: recipe {recipe.name} -- {recipe.description}",
             f"# submit: sbatch {os.path.join(run_dir, 'slurm', recipe.name + '.sbatch')}",
             f"#SBATCH --output={run_dir}/slurm/%x_%j.out", "#SBATCH --open-mode=append", "#SBATCH --requeue",
             f"#SBATCH --signal=B:USR1@{s.requeue_signal_s}"]
    lines += _sbatch_group(recipe, recipe.nodes, recipe.gpus_per_node, job)
    if het:
        rs = recipe.rollout_servers
        lines.append("#SBATCH hetjob")
        lines += _sbatch_group(recipe, rs.nodes, rs.gpus_per_node, job + "-rollout")
    nodelist = "$SLURM_JOB_NODELIST_HET_GROUP_0" if het else "$SLURM_JOB_NODELIST"
    lines += ["", "set -uo pipefail", f"MAX_RETRIES={s.max_retries}", f"RUN_DIR={shlex.quote(run_dir)}",
              'mkdir -p "$RUN_DIR/slurm"', ""]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in job_env(recipe).items()]
    lines += [f'export MASTER_ADDR=$(scontrol show hostnames "{nodelist}" | head -n1)',
              f"export MASTER_PORT={s.rdzv_port}"]
    if het:
        lines.append(rollout_urls_line(recipe))
    lines += list(s.setup)
    lines += [
        "",
        'echo "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}/$MAX_RETRIES on $(hostname) at $(date)"',
        "requeue() {",
        '    if [ "${SLURM_RESTART_COUNT:-0}" -lt "$MAX_RETRIES" ]; then',
        '        echo "requeueing job $SLURM_JOB_ID: the rerun resumes from the last checkpoint in $RUN_DIR"',
        '        scontrol requeue "$SLURM_JOB_ID"',
        "    else",
        '        echo "no retries left ($MAX_RETRIES)"',
        "    fi",
        "}",
        "# USR1 arrives before the time limit (--signal=B:USR1@...): requeue instead of being killed",
        "trap 'echo \"USR1: time limit near\"; requeue; kill -TERM \"${pids[@]}\" 2>/dev/null' USR1",
        "pids=()",
        "",
    ]
    cflags = " ".join(shlex.quote(f) for f in container_flags(recipe))
    if het:
        rs = recipe.rollout_servers
        lines += ["# rollout servers (SGLang), heterogeneous group 1",
                  f"srun --het-group=1 --nodes={rs.nodes} --ntasks-per-node=1 {cflags} --kill-on-bad-exit=1 "
                  f"--output={run_dir}/slurm/rollout_%j_%t.out bash -c {shlex.quote(rollout_task_command(recipe))} &",
                  "pids+=($!)", ""]
    group = "--het-group=0 " if het else ""
    lines += ["# trainer: one torchrun per node" if recipe.torchrun else "# trainer",
              f"srun {group}--nodes={recipe.nodes} --ntasks-per-node=1 {cflags} --kill-on-bad-exit=1 "
              f"bash -c {shlex.quote(trainer_task_command(recipe, recipe.nodes))} &",
              "train_pid=$!", "pids+=($train_pid)",
              # wait returns early when a trap runs; wait again until the trainer step is really gone
              'wait "$train_pid"; rc=$?',
              'while kill -0 "$train_pid" 2>/dev/null; do wait "$train_pid"; rc=$?; done',
              'kill -TERM "${pids[@]}" 2>/dev/null  # stop the rollout servers with the trainer',
              'echo "trainer exited with code $rc"',
              'if [ "$rc" -ne 0 ]; then requeue; fi',
              'exit "$rc"', ""]
    return "\n".join(lines)


def write_sbatch(recipe: Recipe, path: str | None = None) -> str:
    path = path or os.path.join(os.path.abspath(recipe.run_dir), "slurm", recipe.name + ".sbatch")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(render_sbatch(recipe))
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return path


def submit(script: str, recipe: Recipe | None = None) -> str:
    """`sbatch --parsable SCRIPT` -> job id (also appended to RUN_DIR/slurm/jobs.txt)."""
    try:
        out = subprocess.run(["sbatch", "--parsable", script], check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise RuntimeError("sbatch not found: run this on a Slurm login node (or use --dryrun)") from None
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"sbatch failed ({e.returncode}): {e.stderr.strip()}") from None
    job_id = out.stdout.strip().split(";")[0]
    if not job_id:
        raise RuntimeError(f"sbatch printed no job id (stdout {out.stdout!r})")
    if recipe is not None:
        with open(os.path.join(os.path.abspath(recipe.run_dir), "slurm", "jobs.txt"), "a") as f:
            f.write(f"{job_id} {script}\n")
    return job_id


def job_state(job_id: str) -> dict[str, str]:
    """State of a job from `sacct` (JobID, State, ExitCode, Elapsed of the job allocation)."""
    try:
        out = subprocess.run(["sacct", "-j", job_id, "--format=JobID,State,ExitCode,Elapsed", "--parsable2",
                              "--noheader"], check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise RuntimeError("sacct not found: run this on a Slurm login node") from None
    for line in out.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 4 and parts[0] == job_id:
            return dict(zip(["job_id", "state", "exit_code", "elapsed"], parts[:4]))
    return {"job_id": job_id, "state": "UNKNOWN", "exit_code": "", "elapsed": ""}
