"""`erpd run` and the per-stage subcommands. The main loop reads like a script (slime style):

    for each iteration (batch):
        collect the fixed batch with the base policy   -> rollouts/batch_<i>.parquet (+ Megatron old log-probs)
        evaluate the base                              -> eval/base/
        stage 1: train every configured teacher        -> ckpt/<teacher>/iter_*, eval/<teacher>/
        signals: teacher / unlearned / weak log-probs  -> per-token columns in the rollout store
        stage 2: distill every configured student      -> ckpt/<student>/iter_*, eval/<student>/
        the chosen student becomes the next base
    on-policy baseline with the same rollout budget    -> ckpt/onpolicy_*/, eval/onpolicy_*/
    summary.json, report.md, accuracy_vs_kl.png

With TP*PP*DP > 1 outside torchrun, the command re-launches itself under torchrun on this machine.
Every stage skips finished work, so rerunning the same command after a crash (even SIGKILL) resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
from pathlib import Path

from erpd_megatron.config import ConfigError, RunConfig, load_config, save_config, to_dict

log = logging.getLogger("erpd")


PRESETS = Path(__file__).resolve().parent.parent / "presets"


def _epilog(prog: str) -> str:
    """Presets, config sections (with their keys) and two examples, built from the files and dataclasses."""
    import dataclasses
    import textwrap
    import typing

    lines = ["presets (--config NAME):"]
    for f in sorted(PRESETS.glob("*.yaml")):
        first = next((x.lstrip("# ").strip() for x in f.read_text().splitlines() if x.startswith("#")), "")
        lines.append(f"  {f.stem:<11} {first[:90]}")
    lines.append("\nconfig sections (override any key as section.key=value; --print-config shows every value):")
    for name, tp in typing.get_type_hints(RunConfig).items():
        args = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        sub = args[-1] if args else tp
        if dataclasses.is_dataclass(sub):
            label = f"{name}.NAME" if typing.get_origin(tp) is dict else name
            keys = " ".join(f.name for f in dataclasses.fields(sub))
            lines += textwrap.wrap(keys, 100, initial_indent=f"  {label:<14} ", subsequent_indent=" " * 17)
        else:
            lines.append(f"  {name:<14} (top level)")
    lines += ["\nexamples:",
              f"  {prog} --config micro run_dir=runs/try teachers.ce.lr=3e-4 eval.k=2",
              f"  {prog} --config micro 'students.s1_ce.strategies=[1,2]' students.s1_ce.unlearned_step=2 --print-config"]
    return "\n".join(lines)


def build_parser(prog: str, stages: tuple[str, ...] = (), config: str = "none, the built-in defaults"
                 ) -> argparse.ArgumentParser:
    what = " -> ".join(stages) if stages else "all stages"
    p = argparse.ArgumentParser(prog=prog, epilog=_epilog(prog),
                                description=f"{what} of one config; finished work is skipped, so rerunning resumes.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="PRESET|FILE",
                   help=f"a preset name (listed below) or a YAML file (default: {config})")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML and exit without building anything (default: off)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="overrides, each value parsed as YAML; CLI > file > defaults (default: none)")
    return p


def config_path(spec: str | None) -> str | None:
    """A YAML path as given, or the preset of that name ("micro" -> presets/micro.yaml)."""
    if spec and not Path(spec).exists():
        if (PRESETS / f"{spec}.yaml").exists():
            return str(PRESETS / f"{spec}.yaml")
        names = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
        raise ConfigError(f"--config {spec}: no such file and no such preset (presets: {names})")
    return spec


def parse(argv: list[str], prog: str, base: dict | None = None,
          stages: tuple[str, ...] = ()) -> tuple[RunConfig, argparse.Namespace]:
    ns = build_parser(prog, stages).parse_args(argv)
    return load_config(config_path(ns.config), ns.overrides, base=base), ns


def print_config(cfg: RunConfig) -> None:
    import yaml

    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")


# Resuming may change these without altering any finished result; the rest of a run dir's config is locked.
# Steps may only grow: training continues from the last checkpoint and the mini-batch of a step is a pure
# function of (seed, step), so the finished steps are the ones an uninterrupted longer run would have made.
GROWABLE = ("iterations", "teachers.*.steps", "students.*.steps", "onpolicy.steps")
FREE = ("eval.every", "rollout.sglang_urls", "checkpoint.keep_last",  # what is evaluated / served / kept
        "model.reuse_engines",  # how policies are built (same results)
        "rollout.verify_weights", "rollout.verify_weights_seqs", "rollout.verify_weights_tol")  # a check only


def _leaf_changes(old, new, path: str = "") -> list[tuple[str, object, object]]:
    """(path, old, new) of every differing value; added or removed teachers / students are not changes."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            if path in ("teachers", "students") and (k not in old or k not in new):
                continue
            out += _leaf_changes(old.get(k), new.get(k), f"{path}.{k}" if path else str(k))
        return out
    return [] if old == new else [(path, old, new)]


def locked_changes(old: dict, new: dict, started: set[str]) -> list[str]:
    """Changes from a run dir's config `old` to `new` that would alter results already there, as text.

    `started`: methods with a checkpoint directory ("promoted" once an iteration promoted a student). A teacher's
    steps are locked once a student reading its last checkpoint has started, a student's once a promotion
    happened, a sequential ensemble's (its steps are split between the signals) and one with mini_batch_size 0
    (its mini-batch is batch // steps) always."""
    import re

    def students_of(teacher: str) -> list[str]:
        return [n for n, s in new.get("students", {}).items() if s.get("teacher") == teacher
                and s.get("teacher_step", -1) <= 0 and {1, 2} & set(s.get("strategies", []))]

    bad = []
    for path, a, b in _leaf_changes(old, new):
        generic = re.sub(r"^(teachers|students)\.[^.]+\.", r"\1.*.", path)
        if generic in FREE or path.startswith("logging."):  # console / tracking only
            continue
        if path == "onpolicy.steps" and a == 0:  # 0 meant the ERPD budget: compare the steps it stood for
            a = -(-old["data"]["prompts_per_batch"] // old["onpolicy"]["prompts_per_step"])
        grows = generic in GROWABLE and isinstance(a, int) and isinstance(b, int) and b >= a
        name = path.split(".")[1] if generic.startswith(("teachers.", "students.")) else ""
        used = (generic == "teachers.*.steps" and any(
                    m == s or m.endswith(f"_{s}") for s in students_of(name) for m in started)) or \
               (generic == "students.*.steps" and ("promoted" in started
                                                   or new["students"][name].get("ensemble") == "sequential"
                                                   or not new["students"][name].get("mini_batch_size")))
        if not grows or used:
            bad.append(f"{path}: {a!r} -> {b!r}")
    return bad


def check_resumable(cfg: RunConfig) -> None:
    """Refuse a run dir whose config.yaml differs from `cfg` in a way that would mix incompatible results.
    Read-only: the config is recorded only once the data has been validated (`_pipeline`)."""
    import yaml

    root = Path(cfg.run_dir)
    path = root / "config.yaml"
    if not path.exists():
        return
    started = {p.name for p in (root / "ckpt").glob("*") if p.is_dir()}
    if any(root.glob("iter_*/promoted.json")):
        started.add("promoted")
    bad = locked_changes(yaml.safe_load(path.read_text()), to_dict(cfg), started)
    if bad:
        raise ConfigError(f"{path}: the run directory was created with another config ({'; '.join(bad)}); "
                          f"only steps (growing), iterations, eval.every, rollout.sglang_urls and new teachers / "
                          f"students may change on resume; use another run_dir or delete it")


def _maybe_torchrun(cfg: RunConfig, argv: list[str], sub: str) -> int | None:
    world = cfg.model.tp * cfg.model.pp * cfg.model.dp
    if world == 1 or "RANK" in os.environ:
        return None
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           "-m", "erpd_megatron.cli", sub, *argv]
    log.info("re-launching under torchrun: %s", " ".join(cmd))
    with subprocess.Popen(cmd) as p:
        try:
            return p.wait()
        except KeyboardInterrupt:  # SIGTERM / SIGINT here (pipeline/stop.py): torchrun stops its ranks on SIGTERM
            p.terminate()
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
            raise


def _pipeline(cfg: RunConfig, stages: tuple[str, ...]) -> dict:
    from erpd_megatron.pipeline import stages as st
    from erpd_megatron.pipeline.collect import collect
    from erpd_megatron.pipeline.context import Timer, build_context
    from erpd_megatron.utils import console, timing

    console.configure(cfg.logging.progress, cfg.logging.log_every)  # before the warm-up's bar
    timing.reset()  # this invocation's stage times (summary.json "stage_times", utils/timing.py)
    ctx = build_context(cfg)  # validates the data (sizes, prompt lengths) before anything is recorded
    if ctx.is_main:
        from erpd_megatron.utils.tracking import record_invocation

        save_config(cfg, ctx.run.root / "config.yaml")
        record_invocation(cfg)  # git commit + command line of this invocation (run_info.json)
    try:
        for it in range(cfg.iterations):
            if "collect" in stages:
                console.header(f"collect batch {it}", f"{cfg.data.prompts_per_batch} prompts x "
                               f"{cfg.rollout.n_samples} samples, then the base's evaluation")
                with _timed(ctx, "collect"):
                    collect(ctx, it)
                with _timed(ctx, "eval"):
                    st.evaluate_base(ctx, it)
            if "teacher" in stages:
                for name, t in cfg.teachers.items():
                    console.header(f"stage 1: teacher {st.method_name(name, it)}", f"loss {t.loss}, {t.steps} steps")
                    timer = Timer(ctx.run, st.method_name(name, it))
                    with _timed(ctx, "train"):
                        st.train_teachers(ctx, it, only=name)
                    timer.save()
            if "signals" in stages:
                console.header(f"signals of batch {it}", "teacher / unlearned / weak log-probs per token")
                with _timed(ctx, "signals"):
                    st.compute_signals(ctx, it)
            if "distill" in stages:
                for name, s in cfg.students.items():
                    strat = "+".join(str(k) for k in s.strategies)
                    console.header(f"stage 2: student {st.method_name(name, it)}",
                                   f"strategy {strat} from teacher {s.teacher}, {s.steps} steps")
                    timer = Timer(ctx.run, st.method_name(name, it))
                    with _timed(ctx, "train"):
                        st.train_students(ctx, it, only=name)
                    timer.save()
                if it + 1 < cfg.iterations:
                    console.header(f"promote a student of batch {it} to the next base",
                                   f"then {cfg.iterate.online_steps} online steps" if cfg.iterate.online_steps else "")
                    with _timed(ctx, "train"):  # the optional online phase trains
                        st.promote_student(ctx, it)
        if "onpolicy" in stages and cfg.onpolicy is not None:
            name = f"onpolicy_{cfg.onpolicy.loss}"
            console.header(f"on-policy baseline {name}", f"{st.onpolicy_steps(ctx)} steps of "
                           f"{cfg.onpolicy.prompts_per_step} prompts, same rollout budget")
            timer = Timer(ctx.run, name)
            with _timed(ctx, "train"):  # its per-step sampling is "collect" (pipeline/collect.py)
                st.train_onpolicy(ctx, 0)
            timer.save()
        if ctx.is_main and "report" in stages:
            from erpd_megatron.pipeline.report import build_summary, methods_from_run, write_report

            console.header("report", str(ctx.run.root / "report.md"))
            timing.save(ctx.run.root)  # this invocation's times so far, read back by build_summary
            summary = build_summary(ctx.run, methods_from_run(ctx.run, cfg), cfg)
            path = write_report(ctx.run, summary, title=f"ERPD run `{cfg.run_dir}`", kl=cfg.logging.report_kl)
            print(f"report: {path}")
            return summary
        return {}
    finally:
        if ctx.is_main:
            with contextlib.suppress(OSError):  # never mask the error that ended the run (a full disk)
                timing.save(ctx.run.root)
        ctx.close()


@contextlib.contextmanager
def _timed(ctx, name: str):
    """A pipeline stage on the process clock; rank 0 rewrites the invocation's record after it (a crash later
    keeps the stages that finished)."""
    from erpd_megatron.utils import timing

    with timing.stage(name):
        yield
    if ctx.is_main:
        timing.save(ctx.run.root)


ALL = ("collect", "teacher", "signals", "distill", "onpolicy", "report")


def _main(argv, sub: str, stages: tuple[str, ...]) -> int:
    from erpd_megatron.utils.cli import error_exit, is_user_error

    try:  # before any heavy import (the data package pulls in pyarrow): --help / --print-config answer at once
        cfg, ns = parse(argv, f"erpd {sub}", stages=stages)
    except ConfigError as e:
        return error_exit(f"erpd {sub}", e)
    if ns.print_config:
        print_config(cfg)
        return 0
    from erpd_megatron.pipeline.stop import Stopped, stop_on_signals

    try:
        from erpd_megatron.pipeline.checks import check_environment

        check_environment(cfg)  # model.fp8 on a machine without CUDA / TE: refused before anything starts
        from erpd_megatron.pipeline.context import setup_logging

        setup_logging()
        from erpd_megatron.pipeline.lock import run_dir_lock

        # SIGTERM / SIGINT unwind like an error: the lock is released, the files are as after a kill (stop.py)
        with stop_on_signals(), run_dir_lock(cfg.run_dir):  # one erpd per run dir (torchrun's ranks: the launcher's)
            rc = _maybe_torchrun(cfg, argv, sub)
            if rc is not None:
                return rc
            check_resumable(cfg)
            _pipeline(cfg, stages)
    except Stopped as e:
        print(f"erpd {sub}: stopped by {e}; the run dir is as after a kill: rerun the same command to resume",
              file=sys.stderr)
        return e.exit_code
    except Exception as e:  # bad input, damaged files, a full disk, an unreachable server: one line (utils/cli.py)
        if not is_user_error(e):
            raise
        return error_exit(f"erpd {sub}", e)
    return 0


def main_run(argv):
    return _main(argv, "run", ALL)


def main_collect(argv):
    return _main(argv, "collect", ("collect",))


def main_teacher(argv):
    return _main(argv, "teacher", ("collect", "teacher"))


def main_signals(argv):
    return _main(argv, "signals", ("collect", "teacher", "signals"))


def main_distill(argv):
    return _main(argv, "distill", ("collect", "teacher", "signals", "distill", "report"))


def main_onpolicy(argv):
    return _main(argv, "onpolicy", ("collect", "onpolicy", "report"))


def main_iterate(argv):
    return _main(argv, "iterate", ALL)
