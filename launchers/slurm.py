"""Plain sbatch path (no nemo-run): render a recipe into one batch script, submit it, ask scontrol / sacct.

The script is what the nemo-run path produces, written out by hand: one `srun` job step per group
(training, and the SGLang servers of a disaggregated recipe as a second heterogeneous group), each task
a pyxis container (or, with `slurm.container_image` empty, the shared-FS checkout and `slurm.python`)
running `torchrun --nnodes N --nproc-per-node G --node-rank $SLURM_PROCID --rdzv-endpoint
$MASTER_ADDR:$MASTER_PORT` (one task per node: the task rank is the node index). The rank and the host
lists are expanded inside each task (`bash -c '...'`), not in the batch shell, so every node gets its own.

Quoting: every argument is one shell word (`shell_word`): literal text in single quotes, and only
`$NAME` references to RUNTIME_VARS expanded by the task; `#SBATCH` values and env names are validated
(`validate`). So a trainer override like `data.instruction=$(touch X)` reaches the trainer as that text.

Requeue and resume: `#SBATCH --requeue` lets Slurm requeue on preemption / node failure; the script
requeues itself on a non-zero exit and, through `--signal=B:USR1@T`, shortly before the time limit, up
to MAX_RETRIES times (SLURM_RESTART_COUNT counts them). The rerun executes the same trainer command with
the same run_dir, and the trainer resumes from its last checkpoint there.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

from launchers.recipes import Recipe, code_root

#: variables the batch script (or Slurm) sets for each task: a `$NAME` / `${NAME}` of these inside an
#: argument is expanded in the task; nothing else of an argument ever is ($(...), backticks, other $VARS)
RUNTIME_VARS = ("MASTER_ADDR", "MASTER_PORT", "ROLLOUT_URLS", "ERPD_SGLANG_API_KEY", "SLURM_JOB_ID", "SLURM_NODEID", "SLURM_PROCID",
                "SLURM_LOCALID", "SLURM_NNODES", "SLURM_NTASKS", "SLURM_RESTART_COUNT")
_NAMES = "|".join(RUNTIME_VARS)
_VAR_REF = re.compile(r"\$(?:\{(" + _NAMES + r")\}|(" + _NAMES + r")(?![A-Za-z0-9_]))")


def shell_word(a: str) -> str:
    """`a` as one shell word: literal text single-quoted (shlex), RUNTIME_VARS references double-quoted so
    that the task expands them. `data.instruction=$(touch X)` stays the literal text it is."""
    parts, pos = [], 0
    for m in _VAR_REF.finditer(a):
        if m.start() > pos:
            parts.append(shlex.quote(a[pos:m.start()]))
        parts.append('"${%s}"' % (m.group(1) or m.group(2)))
        pos = m.end()
    if pos < len(a) or not parts:
        parts.append(shlex.quote(a[pos:]))
    return "".join(parts)


# what may follow `#SBATCH --flag=` (sbatch does its own, partial, quote handling there: allow no quoting)
_SBATCH_VALUE = re.compile(r"[\w.,:@%+=/\[\]-]+")
_SBATCH_KEY = re.compile(r"[a-z][a-z0-9-]*")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_sbatch_value(where: str, value) -> str:
    v = str(value)
    if not _SBATCH_VALUE.fullmatch(v):
        raise ValueError(f"{where}={v!r}: not allowed on an #SBATCH line (letters, digits and . , : @ % + = / [ ] - "
                         f"_ only; no spaces, quotes or shell characters)")
    return v


def validate(recipe: Recipe) -> None:
    """Refuse settings that cannot be written safely into a batch script (ValueError naming the field)."""
    s = recipe.slurm
    for name in ("account", "partition", "time", "job_name"):
        if getattr(s, name):
            check_sbatch_value(f"slurm.{name}", getattr(s, name))
    if not re.fullmatch(r"[\w.-]+", recipe.name):
        raise ValueError(f"name={recipe.name!r}: letters, digits, '.', '-', '_' only (it names the run directory)")
    check_sbatch_value("run_dir", os.path.abspath(recipe.run_dir))  # in #SBATCH --output
    for k, v in s.extra_sbatch.items():
        if not _SBATCH_KEY.fullmatch(str(k)):
            raise ValueError(f"slurm.extra_sbatch key {k!r}: expected an sbatch long option name like 'qos'")
        check_sbatch_value(f"slurm.extra_sbatch.{k}", v)
    for k in s.env:
        if not _ENV_KEY.fullmatch(k):
            raise ValueError(f"slurm.env.{k}: not a shell variable name")
    for name in ("nodes", "tasks_per_node"):
        if getattr(recipe, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(recipe, name)}")
    if recipe.gpus_per_node < 0 or (recipe.gpus_per_node and recipe.gpus_per_node % recipe.tasks_per_node):
        raise ValueError(f"gpus_per_node={recipe.gpus_per_node} must be >= 0 and divisible by "
                         f"tasks_per_node={recipe.tasks_per_node}")
    if any(c in s.container_image for c in ",\n") or any("," in m or "\n" in m for m in s.container_mounts):
        raise ValueError("slurm.container_image / container_mounts: no commas or newlines (pyxis lists)")


def uses_container(recipe: Recipe) -> bool:
    return bool(recipe.slurm.container_image)


def task_code_dir(recipe: Recipe) -> str:
    """Working directory of every task: the mounted checkout in a container, else the shared-FS checkout."""
    s = recipe.slurm
    return s.code_dir if uses_container(recipe) else os.path.abspath(s.host_code_dir or code_root())


def task_python(recipe: Recipe) -> str:
    s = recipe.slurm
    return s.python or ("python" if uses_container(recipe) else sys.executable)


def trainer_task_command(recipe: Recipe, nnodes: int) -> str:
    """Shell command one task runs: torchrun over the task's share of the node (node rank = Slurm task rank,
    which is the node index with one task per node), or the plain command."""
    argv = recipe.trainer_argv()
    py = task_python(recipe)
    if argv[0] == "erpd":  # the `erpd` console script == python -m erpd_megatron.cli
        argv = ["-m", "erpd_megatron.cli"] + argv[1:]
        if not recipe.torchrun:
            argv = [py] + argv
    if recipe.torchrun:
        # in a container, its torchrun; otherwise the launcher's environment's (no PATH assumptions)
        launcher = ["torchrun"] if uses_container(recipe) and not recipe.slurm.python else \
            [py, "-m", "torch.distributed.run"]
        argv = launcher + [f"--nnodes={nnodes * recipe.tasks_per_node}", f"--nproc-per-node={recipe.procs_per_task}",
                           "--node-rank=$SLURM_PROCID", "--rdzv-backend=c10d",
                           "--rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT", "--rdzv-id=$SLURM_JOB_ID"] + argv
    return f"cd {shlex.quote(task_code_dir(recipe))} && exec " + " ".join(shell_word(a) for a in argv)


def rollout_task_command(recipe: Recipe) -> str:
    """One rollout node: its SGLang servers (one per TP group) in the background; the task ends with them."""
    assert recipe.rollout_servers is not None
    cmds = [" ".join(shell_word(a) for a in argv) for argv in recipe.rollout_servers.commands()]
    return f"cd {shlex.quote(task_code_dir(recipe))} && {{ " + " & ".join(cmds) + " & wait; }"


def container_mounts(recipe: Recipe) -> list[str]:
    s = recipe.slurm
    host_code = os.path.abspath(s.host_code_dir or code_root())
    run_root = os.path.abspath(recipe.run_root)
    return [f"{host_code}:{s.code_dir}", f"{run_root}:{run_root}"] + list(s.container_mounts)


def container_flags(recipe: Recipe) -> list[str]:
    """pyxis flags of every srun; none without a container image."""
    s = recipe.slurm
    if not uses_container(recipe):
        return []
    return [f"--container-image={s.container_image}", f"--container-mounts={','.join(container_mounts(recipe))}",
            f"--container-workdir={s.code_dir}"]


def job_env(recipe: Recipe) -> dict[str, str]:
    env = dict(recipe.slurm.env)
    env["PYTHONPATH"] = task_code_dir(recipe)
    env["ERPD_RUN_DIR"] = os.path.abspath(recipe.run_dir)
    return env


def rollout_urls_line(recipe: Recipe, group: int = 1) -> str:
    """Batch-shell lines exporting ROLLOUT_URLS=[http://host:port,...] (every server of every node of the
    SGLang group) and a fresh random ERPD_SGLANG_API_KEY (servers require it, the trainer sends it; it is
    never written to a file)."""
    rs = recipe.rollout_servers
    port, n = (rs.port, rs.servers_per_node) if rs else (30000, 1)
    return (f'export ROLLOUT_URLS="[$(scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_{group}" '
            f"| awk '{{for (p = {port}; p < {port + n}; p++) print \"http://\" $0 \":\" p}}' | paste -sd, -)]\"\n"
            "export ERPD_SGLANG_API_KEY=\"$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \\n')\"")


def rollout_ready_lines(timeout_s: int) -> list[str]:
    """Batch-shell lines: wait until every server of ROLLOUT_URLS answers /health (open without the API key),
    at most `timeout_s` seconds; stop (requeue while retries are left) if the servers exit or time out first.
    The trainer attaches only afterwards (its own wait, rollout.sglang_startup_timeout, is the second guard)."""
    return ["# the trainer starts once every rollout server answers /health",
            "rollout_ready() {",
            f"    local deadline=$((SECONDS + {int(timeout_s)})) url",
            '    for url in $(echo "$ROLLOUT_URLS" | tr -d "[]" | tr "," " "); do',
            '        until curl -sf -o /dev/null --max-time 10 "$url/health"; do',
            '            if ! kill -0 "$rollout_pid" 2>/dev/null; then echo "rollout servers exited before $url was ready"; return 1; fi',
            f'            if [ "$SECONDS" -ge "$deadline" ]; then echo "$url not ready after {int(timeout_s)} s"; return 1; fi',
            "            sleep 5",
            "        done",
            "    done",
            '    echo "rollout servers ready after $SECONDS s"',
            "}",
            'if ! rollout_ready; then kill -TERM "${pids[@]}" 2>/dev/null; requeue; exit 1; fi', ""]


def _sbatch_group(recipe: Recipe, nodes: int, gpus: int, job_name: str, tasks: int = 1) -> list[str]:
    s = recipe.slurm
    flags = {"job-name": job_name, "account": s.account, "partition": s.partition, "time": s.time,
             "nodes": nodes, "ntasks-per-node": tasks, "gpus-per-node": gpus}
    # no account / partition: the cluster's defaults; no GPUs: no gres request (a CPU cluster refuses it)
    lines = [f"#SBATCH --{k}={v}" for k, v in flags.items() if v not in ("", 0, None)]
    if s.exclusive:
        lines.append("#SBATCH --exclusive")
    lines += [f"#SBATCH --{k}={v}" for k, v in s.extra_sbatch.items()]
    return lines


def render_sbatch(recipe: Recipe) -> str:
    """The whole batch script for `recipe` (homogeneous, or heterogeneous with a rollout group)."""
    validate(recipe)
    s = recipe.slurm
    run_dir = os.path.abspath(recipe.run_dir)
    job = s.job_name or f"erpd-{recipe.name}"
    het = recipe.rollout_servers is not None
    lines = ["#!/bin/bash",
             f"# erpd-megatron launcher: recipe {recipe.name} -- {recipe.description}",
             f"# submit: sbatch {os.path.join(run_dir, 'slurm', recipe.name + '.sbatch')}",
             f"#SBATCH --output={run_dir}/slurm/%x_%j.out", "#SBATCH --open-mode=append", "#SBATCH --requeue",
             f"#SBATCH --signal=B:USR1@{s.requeue_signal_s}"]
    lines += _sbatch_group(recipe, recipe.nodes, recipe.gpus_per_node, job, recipe.tasks_per_node)
    if het:
        rs = recipe.rollout_servers
        lines.append("#SBATCH hetjob")
        lines += _sbatch_group(recipe, rs.nodes, rs.gpus_per_node, job + "-rollout")
    nodelist = "$SLURM_JOB_NODELIST_HET_GROUP_0" if het else "$SLURM_JOB_NODELIST"
    lines += ["", "set -uo pipefail", f"MAX_RETRIES={s.max_retries}", f"RUN_DIR={shlex.quote(run_dir)}",
              'mkdir -p "$RUN_DIR/slurm"',
              "requeue() {",
              '    if [ "${SLURM_RESTART_COUNT:-0}" -lt "$MAX_RETRIES" ]; then',
              '        echo "requeueing job $SLURM_JOB_ID: the rerun resumes from the last checkpoint in $RUN_DIR"',
              '        scontrol requeue "$SLURM_JOB_ID"',
              "    else",
              '        echo "no retries left ($MAX_RETRIES)"',
              "    fi",
              "}",
              # first thing the shell does: Slurm may send the signal up to ~60 s before the asked time, and
              # an untrapped USR1 kills the batch shell
              "# USR1 arrives before the time limit (--signal=B:USR1@...): requeue instead of being killed",
              "pids=()",
              "trap 'echo \"USR1: time limit near\"; requeue; kill -TERM \"${pids[@]}\" 2>/dev/null' USR1", ""]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in job_env(recipe).items()]
    lines += [f'export MASTER_ADDR=$(scontrol show hostnames "{nodelist}" | head -n1)',
              f"export MASTER_PORT={s.rdzv_port}"]
    if het:
        lines.append(rollout_urls_line(recipe))
    lines += list(s.setup)
    lines += [
        "",
        'echo "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}/$MAX_RETRIES on $(hostname) at $(date)"',
        "",
    ]
    cflags = "".join(shlex.quote(f) + " " for f in container_flags(recipe))
    if het:
        rs = recipe.rollout_servers
        lines += ["# rollout servers (SGLang), heterogeneous group 1",
                  f"srun --het-group=1 --nodes={rs.nodes} --ntasks-per-node=1 {cflags}--kill-on-bad-exit=1 "
                  f"--output={shlex.quote(run_dir)}/slurm/rollout_%j_%t.out bash -c {shlex.quote(rollout_task_command(recipe))} &",
                  "rollout_pid=$!", "pids+=($rollout_pid)", ""] + rollout_ready_lines(rs.ready_timeout_s)
    group = "--het-group=0 " if het else ""
    lines += ["# trainer: one torchrun per node" if recipe.torchrun else "# trainer",
              f"srun {group}--nodes={recipe.nodes} --ntasks-per-node={recipe.tasks_per_node} {cflags}--kill-on-bad-exit=1 "
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


def _scontrol_job(job_id: str) -> dict[str, str] | None:
    """`scontrol show job -o ID` as a dict (live and recently finished jobs, no accounting needed)."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return None
    if out.returncode != 0:
        return None
    fields = dict(tok.split("=", 1) for tok in out.stdout.split() if "=" in tok)
    return fields if fields.get("JobId") == job_id and "JobState" in fields else None


def _sacct_job(job_id: str) -> dict[str, str] | None:
    try:
        out = subprocess.run(["sacct", "-j", job_id, "--format=JobID,State,ExitCode,Elapsed", "--parsable2",
                              "--noheader"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return None
    for line in out.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 4 and parts[0] == job_id:
            return dict(zip(["job_id", "state", "exit_code", "elapsed"], parts[:4]))
    return None


def job_state(job_id: str) -> dict[str, str]:
    """State of a job: from `scontrol show job` while slurmctld remembers it (running, pending, and
    finished within MinJobAge), else from `sacct` (needs accounting). `source` says which answered."""
    j = _scontrol_job(job_id)
    if j is not None:
        return {"job_id": job_id, "state": j["JobState"], "exit_code": j.get("ExitCode", ""),
                "elapsed": j.get("RunTime", ""), "restarts": j.get("Restarts", "0"), "reason": j.get("Reason", ""),
                "nodes": j.get("NodeList", ""), "source": "scontrol"}
    a = _sacct_job(job_id)
    if a is not None:
        return {**a, "source": "sacct"}
    if shutil.which("scontrol") is None and shutil.which("sacct") is None:
        raise RuntimeError("neither scontrol nor sacct found: run this on a Slurm login node")
    return {"job_id": job_id, "state": "UNKNOWN", "exit_code": "", "elapsed": "", "source": "none"}
