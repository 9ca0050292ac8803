"""nemo-run path: LocalExecutor (torchrun on this machine) and SlurmExecutor (a pyxis container per task, or
the repository and a Python environment on the shared file system when `slurm.container_image` is empty;
one heterogeneous group per role), sbatch scripts via `Experiment.dryrun` without a cluster.

nemo-run is an optional extra (`pip install 'erpd-megatron[launch]'`: nemo-run==0.11.1 needs
leptonai==0.27.3) and is imported only inside these functions.

On Slurm each task runs the very command the plain sbatch path writes (launchers/slurm.py:
`bash -c 'cd CODE && exec torchrun --nnodes ... --node-rank=$SLURM_PROCID ...'`) instead of nemo-run's
own Torchrun launcher: in a heterogeneous job that launcher would wrap every group (the SGLang servers
too) in one torchrun with the first group's sizes. MASTER_ADDR comes from nemo-run's head-node variables.
Requeue: `--requeue` on the allocation plus nemo-run's retry block (`scontrol requeue` on a non-zero exit
while SLURM_RESTART_COUNT < retries); the rerun resumes from the run directory's last checkpoint. Before
the time limit `--signal=USR1@T` stops the trainer, which is such a non-zero exit.
"""

from __future__ import annotations

import glob
import os
import shlex
import shutil

from launchers import slurm as plain
from launchers.recipes import Recipe


def import_nemo_run():
    try:
        import nemo_run
    except ImportError as e:
        raise RuntimeError(
            "nemo-run is not installed. Install the launch extra: pip install 'erpd-megatron[launch]' "
            "(nemo-run==0.11.1 with leptonai==0.27.3), or use --executor sbatch, which needs nothing extra."
        ) from e
    return nemo_run


def _job_root(recipe: Recipe) -> str:
    # not ".../nemo_run": without a container nemo-run rewrites every "/nemo_run" in the script to the job dir
    return os.path.join(os.path.abspath(recipe.run_dir), "nemo")


def _tunnel_dir(recipe: Recipe) -> str:
    # where Experiment(base_dir=_job_root) writes its experiments: the local tunnel must point there, or
    # sbatch is handed a script path that does not exist
    return os.path.join(_job_root(recipe), "experiments")


def _slurm_executor(run, recipe: Recipe, nodes: int, gpus: int, env: dict[str, str], het: bool, tasks: int = 1):
    s = recipe.slurm
    # USR1 to the tasks, not the batch shell (B:): nemo-run's shell runs srun in the foreground, so a trap
    # there would only run after the time-limit kill, and without one USR1 kills the shell before its retry
    # block. The trainer dies of USR1, srun exits non-zero, the retry block requeues while retries remain.
    extra = {"requeue": True, "signal": f"USR1@{s.requeue_signal_s}", **s.extra_sbatch}
    container = plain.uses_container(recipe)
    ex = run.SlurmExecutor(
        account=s.account or None, partition=s.partition or None, time=s.time, nodes=nodes, ntasks_per_node=tasks,
        gpus_per_node=gpus or None, exclusive=s.exclusive or None,
        container_image=s.container_image if container else None,
        container_mounts=plain.container_mounts(recipe) if container else [], env_vars=env,
        additional_parameters=extra, job_name_prefix="erpd.", tunnel=run.LocalTunnel(job_dir=_tunnel_dir(recipe)),
        packager=run.Packager(), setup_lines="\n".join(s.setup) or None,
        # without a container nemo-run passes --chdir JOB_DIR/code, which its base Packager never creates
        srun_args=None if container else ["--chdir", plain.task_code_dir(recipe)],
    )
    ex.retries = s.max_retries
    ex.poll_estimated_start_time = False
    ex.heterogeneous = het
    return ex


def _bash_task(run, command: str):
    # srun ... bash -c '<command>': expanded inside each task, so $SLURM_NODEID is per node
    return run.Script(path="-c", entrypoint="bash", args=[shlex.quote(command)])


def slurm_experiment(recipe: Recipe, base_dir: str | None = None):
    """(Experiment, [tasks], [executors]) for the recipe; the caller adds them and dryruns / runs."""
    run = import_nemo_run()
    plain.validate(recipe)
    # nemo-run writes `export KEY=VALUE` unquoted: quote the values here (MASTER_ADDR is meant to expand)
    env = {k: shlex.quote(v) for k, v in plain.job_env(recipe).items()}
    het = recipe.rollout_servers is not None
    env["MASTER_ADDR"] = "$het_group_host_0" if het else "$head_node_ip"
    env["MASTER_PORT"] = str(recipe.slurm.rdzv_port)
    train_ex = _slurm_executor(run, recipe, recipe.nodes, recipe.gpus_per_node, env, het, recipe.tasks_per_node)
    tasks = [_bash_task(run, plain.trainer_task_command(recipe, recipe.nodes))]
    executors = [train_ex]
    if het:
        rs = recipe.rollout_servers
        # ROLLOUT_URLS must exist before the trainer's srun: nemo-run's setup lines run after the exports
        train_ex.setup_lines = "\n".join(filter(None, [train_ex.setup_lines, plain.rollout_urls_line(recipe)]))
        executors.append(_slurm_executor(run, recipe, rs.nodes, rs.gpus_per_node, env, het))
        tasks.append(_bash_task(run, plain.rollout_task_command(recipe)))
    base = base_dir or _job_root(recipe)
    exp = run.Experiment(f"erpd-{recipe.name}", executor=train_ex, base_dir=base, log_level="WARN")
    return exp, tasks, executors


def run_slurm(recipe: Recipe, dryrun: bool) -> tuple[str, str | None]:
    """Dry run: write the sbatch script, return (path, None). Otherwise submit (detached) and return
    (path, job id) -- nemo-run calls `sbatch --requeue --parsable` through its local tunnel."""
    exp, tasks, executors = slurm_experiment(recipe)
    out_dir = os.path.join(os.path.abspath(recipe.run_dir), "slurm")
    os.makedirs(out_dir, exist_ok=True)
    with exp:
        if len(tasks) == 1:
            exp.add(tasks[0], executor=executors[0], name=recipe.name)
        else:
            exp.add(tasks, executor=executors, name=recipe.name)
        exp.dryrun(log=False, delete_exp_dir=False)
        scripts = sorted(glob.glob(os.path.join(exp._exp_dir, "*_sbatch.sh")))
        if not scripts:
            raise RuntimeError(f"nemo-run wrote no sbatch script under {exp._exp_dir}")
        path = os.path.join(out_dir, f"{recipe.name}.nemo.sbatch")
        shutil.copyfile(scripts[0], path)
        if dryrun:
            return path, None
    # a fresh experiment for the real submission (dryrun() left its directory behind on purpose)
    exp, tasks, executors = slurm_experiment(recipe)
    with exp:
        if len(tasks) == 1:
            exp.add(tasks[0], executor=executors[0], name=recipe.name)
        else:
            exp.add(tasks, executor=executors, name=recipe.name)
        exp.run(detach=True)
        job_id = None
        for job in exp.jobs:
            handle = getattr(job, "handle", "") or ""
            if handle:
                job_id = handle.rsplit("/", 1)[-1]
    return path, job_id


def run_local(recipe: Recipe, dryrun: bool) -> str:
    """LocalExecutor on this machine: torchrun over layout.world processes, or the plain command."""
    run = import_nemo_run()
    argv = recipe.trainer_argv()
    env = {**{k: v for k, v in recipe.slurm.env.items() if not k.startswith("NCCL")}, "ERPD_RUN_DIR": recipe.run_dir}
    if recipe.torchrun:
        nproc = recipe.layout.world
        if argv[0] == "erpd":
            task = run.Script(path="erpd_megatron.cli", m=True, entrypoint="python", args=argv[1:])
        else:
            task = run.Script(path=argv[0], entrypoint="bash", args=argv[1:])
        ex = run.LocalExecutor(ntasks_per_node=nproc, launcher="torchrun", env_vars=env)
        shown = f"torchrun --nproc-per-node {nproc} " + " ".join(shlex.quote(a) for a in argv)
    else:
        task = run.Script(inline=" ".join(shlex.quote(a) for a in argv))
        ex = run.LocalExecutor(env_vars=env)
        shown = " ".join(shlex.quote(a) for a in argv)
    if dryrun:
        return shown
    base = os.path.join(os.path.abspath(recipe.run_dir), "nemo_run", "experiments")
    with run.Experiment(f"erpd-{recipe.name}", executor=ex, base_dir=base, log_level="WARN") as exp:
        exp.add(task, name="train")
        exp.run(sequential=True, tail_logs=True)
    return shown
