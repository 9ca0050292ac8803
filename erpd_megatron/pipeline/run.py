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
import logging
import os
import subprocess
import sys
from pathlib import Path

from erpd_megatron.config import ConfigError, RunConfig, load_config, save_config, to_dict

log = logging.getLogger("erpd")


def parse(argv: list[str], prog: str, base: dict | None = None) -> RunConfig:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML preset (see erpd_megatron/presets/)")
    p.add_argument("overrides", nargs="*", help="section.field=value (CLI > file > defaults)")
    ns = p.parse_args(argv)
    return load_config(ns.config, ns.overrides, base=base)


def _check_same_config(cfg: RunConfig) -> None:
    """A run dir belongs to one config: resuming with a different one would mix incompatible results."""
    import yaml

    path = Path(cfg.run_dir) / "config.yaml"
    if path.exists():
        old = yaml.safe_load(path.read_text())
        if old != to_dict(cfg):
            diff = sorted(k for k in set(old) | set(to_dict(cfg)) if old.get(k) != to_dict(cfg).get(k))
            raise ConfigError(f"{path}: the run directory was created with another config (differs in {diff}); "
                              f"use another run_dir or delete it")
    else:
        save_config(cfg, path)


def _maybe_torchrun(cfg: RunConfig, argv: list[str], sub: str) -> int | None:
    world = cfg.model.tp * cfg.model.pp * cfg.model.dp
    if world == 1 or "RANK" in os.environ:
        return None
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           "-m", "erpd_megatron.cli", sub, *argv]
    log.info("re-launching under torchrun: %s", " ".join(cmd))
    return subprocess.call(cmd)


def _pipeline(cfg: RunConfig, stages: tuple[str, ...]) -> dict:
    from erpd_megatron.pipeline import stages as st
    from erpd_megatron.pipeline.collect import collect
    from erpd_megatron.pipeline.context import Timer, build_context

    ctx = build_context(cfg)
    bookkeeping: dict[str, dict] = {}
    rollouts = cfg.data.prompts_per_batch * cfg.rollout.n_samples
    try:
        for it in range(cfg.iterations):
            if "collect" in stages:
                collect(ctx, it)
                st.evaluate_base(ctx, it)
            if "teacher" in stages:
                for name in cfg.teachers:
                    timer = Timer(ctx.run, st.method_name(name, it))
                    st.train_teachers(ctx, it, only=name)
                    timer.save()
                    bookkeeping[st.method_name(name, it)] = {"kind": f"teacher ({cfg.teachers[name].loss})",
                                                             "rollouts": rollouts * (it + 1), "wall_s": timer.total()}
            if "signals" in stages:
                st.compute_signals(ctx, it)
            if "distill" in stages:
                for name, s in cfg.students.items():
                    timer = Timer(ctx.run, st.method_name(name, it))
                    st.train_students(ctx, it, only=name)
                    timer.save()
                    strat = "+".join(str(k) for k in s.strategies)
                    bookkeeping[st.method_name(name, it)] = {"kind": f"student (strategy {strat}, {s.teacher})",
                                                             "rollouts": rollouts * (it + 1), "wall_s": timer.total()}
                if it + 1 < cfg.iterations:
                    info = st.promote_student(ctx, it)
                    if "online" in info:
                        bookkeeping[info["online"]] = {"kind": f"online phase ({cfg.onpolicy.loss})",
                                                       "rollouts": cfg.iterate.online_steps
                                                       * cfg.onpolicy.prompts_per_step * cfg.rollout.n_samples}
        if "onpolicy" in stages and cfg.onpolicy is not None:
            name = f"onpolicy_{cfg.onpolicy.loss}"
            timer = Timer(ctx.run, name)
            st.train_onpolicy(ctx, 0)
            timer.save()
            steps = st.onpolicy_steps(ctx)
            bookkeeping[name] = {"kind": f"on-policy {cfg.onpolicy.loss}",
                                 "rollouts": steps * cfg.onpolicy.prompts_per_step * cfg.rollout.n_samples,
                                 "wall_s": timer.total()}
        if ctx.is_main and "report" in stages:
            from erpd_megatron.pipeline.report import build_summary, write_report

            summary = build_summary(ctx.run, _all_methods(ctx, bookkeeping))
            path = write_report(ctx.run, summary, title=f"ERPD run `{cfg.run_dir}`")
            print(f"report: {path}")
            return summary
        return {}
    finally:
        ctx.close()


def _all_methods(ctx, bookkeeping: dict) -> dict:
    """Methods with wall times from this or earlier (resumed) invocations."""
    import json

    out = dict(bookkeeping)
    for p in sorted((ctx.run.root / "metrics").glob("*.wall.json")):
        name = p.name[: -len(".wall.json")]
        out.setdefault(name, {"kind": None, "rollouts": None})
        out[name]["wall_s"] = json.loads(p.read_text())["wall_s"]
    return out


ALL = ("collect", "teacher", "signals", "distill", "onpolicy", "report")


def _main(argv, sub: str, stages: tuple[str, ...]) -> int:
    from erpd_megatron.data.prompts import PromptDataError
    from erpd_megatron.pipeline.context import setup_logging

    setup_logging()
    try:
        cfg = parse(argv, f"erpd {sub}")
        rc = _maybe_torchrun(cfg, argv, sub)
        if rc is not None:
            return rc
        _check_same_config(cfg)
        _pipeline(cfg, stages)
    except (ConfigError, PromptDataError, FileNotFoundError) as e:  # bad input: one clear line, no traceback
        print(f"erpd {sub}: error: {e}", file=sys.stderr)
        return 2
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
