"""`python -m launchers`: plan, dry-run or submit a recipe.

    python -m launchers list
    python -m launchers plan RECIPE [--nodes N] [overrides]
    python -m launchers run RECIPE --executor local|slurm|sbatch [--nodes N] [--dryrun] [key=value ...]
    python -m launchers status JOB_ID

Overrides: `layout.tp=8`, `slurm.account=abc`, `slurm.env.NCCL_DEBUG=INFO`, `nodes=8`, ... change the
recipe; any other `key=value` goes to the trainer (`erpd run ... key=value`). Every `run` first asks
the planner and refuses a layout that cannot work (exit code 2) before anything is written or submitted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from erpd_megatron.planner import LayoutError, Plan, check_or_raise
from launchers.recipes import RECIPES, Recipe, apply_overrides, get_recipe


def model_config(recipe: Recipe) -> tuple[dict, str]:
    """(HF config, name) the planner checks: `model.base`'s config.json when that directory is readable here (the
    model the job will train), else the recipe's `model` (an embedded model's name, or a config.json / model dir
    path given as `model=...`). ValueError / KeyError in one line."""
    from erpd_megatron.model_shapes import load_hf_config, resolve_model_config

    base = recipe.overrides.get("model.base", "")
    if base and base != "toy" and os.path.isfile(os.path.join(base, "config.json")):
        return load_hf_config(base), base
    return resolve_model_config(recipe.model), recipe.model


def plan_recipe(recipe: Recipe) -> Plan:
    """The planner's verdict on the recipe's layout (nodes / GPUs per node taken from the recipe)."""
    L = recipe.layout
    L.gpus_per_node = recipe.tasks_per_node * recipe.procs_per_task  # trainer processes per node
    L.nodes = recipe.nodes if recipe.torchrun else None
    if recipe.rollout_servers is not None:
        L.rollout_tp = recipe.rollout_servers.tp
        L.rollout_nodes = recipe.rollout_servers.nodes
        L.rollout_mem_fraction = recipe.rollout_servers.mem_fraction
    config, name = model_config(recipe)
    return check_or_raise(config, L, recipe.hardware, name=name)


def check_trainer_config(recipe: Recipe) -> None:
    """The trainer command's config (its preset + every trainer override) through the trainer's own loader, so a
    bad value (`teachers.ce.lr=-1`, an unknown key) is refused here, before a job waits in the queue for it.
    Raises ConfigError (a ValueError) naming the field. Presets are named (`--config micro`): the trainer finds
    them in its own package, from any working directory."""
    from erpd_megatron.pipeline.demo import PRESET
    from erpd_megatron.pipeline.run import parse

    argv = recipe.trainer_argv()
    rest = argv[2:] if argv[:2] != ["erpd", "demo"] else ["--config", str(PRESET), *argv[2:]]
    parse(rest, " ".join(argv[:2]))


def launch(recipe: Recipe, executor: str, dryrun: bool) -> dict:
    """Plan (raises LayoutError), then run / write / submit. Returns what happened."""
    p = plan_recipe(recipe)
    out = {"recipe": recipe.name, "executor": executor, "dryrun": dryrun, "run_dir": recipe.run_dir,
           "peak_gib_per_gpu": round(p.peak_stage.peak / 2**30, 2), "step_time_s": round(p.step_time_s, 1)}
    if executor == "sbatch":
        from launchers import slurm

        path = slurm.write_sbatch(recipe)
        out["script"] = path
        if not dryrun:
            out["job_id"] = slurm.submit(path, recipe)
    elif executor == "slurm":
        from launchers import nemo

        path, job_id = nemo.run_slurm(recipe, dryrun)
        out["script"] = path
        if job_id:
            out["job_id"] = job_id
    elif executor == "local":
        from launchers import nemo

        if recipe.nodes > 1:
            raise ValueError(f"recipe {recipe.name} needs {recipe.nodes} nodes: use --executor slurm or sbatch")
        out["command"] = nemo.run_local(recipe, dryrun)
    else:
        raise ValueError(f"unknown executor {executor!r} (local, slurm, sbatch)")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launchers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list recipes")
    for name in ("plan", "run"):
        sp = sub.add_parser(name, help=f"{name} a recipe")
        sp.add_argument("recipe", choices=sorted(RECIPES))
        sp.add_argument("--nodes", type=int, default=None, help="training nodes (DP grows to fill them)")
        sp.add_argument("overrides", nargs="*", help="key=value (layout.*, slurm.*, recipe fields, or trainer keys)")
        if name == "run":
            sp.add_argument("--executor", choices=["local", "slurm", "sbatch"], default="local")
            sp.add_argument("--dryrun", action="store_true", help="write the sbatch script / print the command only")
        else:
            sp.add_argument("--json", action="store_true")
    st = sub.add_parser("status", help="state of a submitted job (scontrol / squeue, else sacct)")
    st.add_argument("job_id")
    # key=value items may come before or after the options
    args, extra = ap.parse_known_args(argv)
    bad = [x for x in extra if "=" not in x or x.startswith("-")]
    if bad:
        ap.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = list(args.overrides) + extra

    if args.cmd == "list":
        for name, fn in RECIPES.items():
            print(f"{name:<20} {fn().description}")
        return 0
    if args.cmd == "status":
        from launchers import slurm

        print(json.dumps(slurm.job_state(args.job_id)))
        return 0
    from launchers import slurm

    try:
        recipe = apply_overrides(get_recipe(args.recipe), args.overrides, nodes=args.nodes)
        slurm.validate(recipe)  # #SBATCH values, env names: refused before anything is written
        check_trainer_config(recipe)  # trainer keys and ranges, likewise
    except (KeyError, ValueError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    if args.cmd == "plan":
        try:
            p = plan_recipe(recipe)
        except LayoutError as e:
            print(str(e), file=sys.stderr)
            return 2
        except (KeyError, ValueError) as e:  # an unknown model name, an unreadable config.json
            print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
            return 2
        print(json.dumps(p.to_dict(), indent=2) if args.json else p.table())
        return 0
    try:
        out = launch(recipe, args.executor, args.dryrun)
    except LayoutError as e:
        print(f"refusing to launch {recipe.name}: {e}", file=sys.stderr)
        return 2
    except (KeyError, ValueError) as e:  # the user's choice cannot work (executor, nodes, model): a user error
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # the submission itself failed (sbatch, nemo-run)
        print(f"error: {e}", file=sys.stderr)
        return 1
    if "script" in out:
        print(out["script"])  # the path first, alone on its line: scripts can capture it
    print(json.dumps(out), file=sys.stderr)
    return 0
