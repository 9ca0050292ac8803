"""Benchmark 3: ERPD vs on-policy GRPO on the toy task, through the real pipeline, over several seeds.

For each seed, `erpd_megatron.pipeline.run._pipeline(cfg, ALL)` runs the preset
`erpd_megatron/presets/bench.yaml` in a fresh run dir: iterated ERPD (3 fixed batches; a SAPO teacher and a
strategy-1 student per batch, the student promoted to the next batch's base), an RFT control (SFT on each batch's
correct samples, from the same policy as that batch's teacher) and on-policy GRPO with the same total rollouts.
All seeds share one warmed-up base model (the toy warm-up is seed-fixed); the seed changes sampling, training and
the eval problems.

What is reported (the paper's Table 4 comparison, at toy scale):
- accuracy (AVG@K on held-out problems) along each method's path, against rollouts consumed: ERPD
  consumes each fixed batch before its first update on it (batch i counts (i + 1) batches), on-policy GRPO
  `step * prompts_per_step * n`;
- accuracy gain over the base per 1k rollouts and per unit of reverse KL to the base (final point);
- compute seconds to reach the on-policy baseline's final accuracy: for ERPD the collect + teacher +
  signals + student time up to its first evaluated step at or above that accuracy, for on-policy its
  own time up to its first such step. Evaluation time is excluded on both sides (the benchmark wraps
  the pipeline's evaluator and stops the clock while it runs); checkpoint writes are included.
- every number per seed and as median/min/max over seeds; paired per-seed differences ERPD - on-policy and
  ERPD - RFT.
Noise: +-1 to 3 points at this eval size; a difference within the seed spread is not a result.

    python -m erpd_megatron.bench.erpd_vs_onpolicy [--seeds 1 2 3] [--out docs/benchmarks] [--preset bench_long]
        [overrides ...]
    python -m erpd_megatron.bench.erpd_vs_onpolicy --merge A.json B.json ... --out DIR   (one JSON of their seeds)
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from erpd_megatron.bench.common import REPO_ROOT, Recorder, spread

NAME = "erpd_vs_onpolicy"
PRESET = Path(__file__).resolve().parents[1] / "presets" / "bench.yaml"
DEFAULT_WORK = REPO_ROOT / "runs" / "bench" / NAME


class _ComputeClock:
    """Wall clock minus the time spent inside evaluations; stage boundaries recorded as events."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.eval_s = 0.0
        self.stages: list[dict] = []

    def now(self) -> float:
        return time.perf_counter() - self.t0 - self.eval_s


def _instrument(clock: _ComputeClock):
    """Wrap the pipeline's evaluator and stage entry points; returns an undo function."""
    from erpd_megatron.pipeline import collect as collect_mod
    from erpd_megatron.pipeline import evaluate as evaluate_mod
    from erpd_megatron.pipeline import stages as st

    saved = []

    def patch(mod, attr, wrapper):
        orig = getattr(mod, attr)
        saved.append((mod, attr, orig))
        setattr(mod, attr, wrapper(orig))

    def timed_eval(orig):
        def f(ctx):
            stamp, t = clock.now(), time.perf_counter()
            res = orig(ctx)
            dur = time.perf_counter() - t
            clock.eval_s += dur
            res["bench_compute_clock_s"] = stamp  # compute seconds since the pipeline started, at this eval
            res["bench_eval_s"] = dur
            return res
        return f

    def timed_stage(label):
        def wrap(orig):
            def f(*a, **k):
                start = clock.now()
                try:
                    return orig(*a, **k)
                finally:
                    # every stage entry point is f(ctx, iteration, ...): the iteration separates repeated stages
                    it = a[1] if len(a) > 1 and isinstance(a[1], int) else k.get("iteration", 0)
                    clock.stages.append({"stage": label, "only": k.get("only"), "iteration": it, "start_s": start,
                                         "end_s": clock.now()})
            return f
        return wrap

    patch(evaluate_mod, "_evaluate_engine", timed_eval)
    patch(collect_mod, "collect", timed_stage("collect"))
    for attr in ("train_teachers", "compute_signals", "train_students", "train_onpolicy"):
        patch(st, attr, timed_stage(attr))

    def undo():
        for mod, attr, orig in reversed(saved):
            setattr(mod, attr, orig)
    return undo


def _match(s: dict, stage: str, only: str | None, iteration: int | None) -> bool:
    return s["stage"] == stage and (only is None or s["only"] == only) and \
        (iteration is None or s.get("iteration", 0) == iteration)


def _stage_s(stages: list[dict], stage: str, only: str | None = None, iteration: int | None = None) -> float:
    return sum(s["end_s"] - s["start_s"] for s in stages if _match(s, stage, only, iteration))


def _stage_start(stages: list[dict], stage: str, only: str | None = None, iteration: int | None = None) -> float:
    return min(s["start_s"] for s in stages if _match(s, stage, only, iteration))


def _eval_points(run_root: Path, method: str) -> list[dict]:
    import json

    pts = []
    for p in sorted((run_root / "eval" / method).glob("step_*.json")):
        r = json.loads(p.read_text())
        # KL per response (the eval's) and per token (/ mean response length over the same samples, as report.py)
        kl_tok = r["kl"] / r["mean_length"] if r.get("kl") is not None and r.get("mean_length") else None
        pts.append({"step": int(r.get("step", int(p.stem.split("_")[1]))), "accuracy": r["avg_at_k"],
                    "kl": r.get("kl"), "kl_token": kl_tok, "clock_s": r.get("bench_compute_clock_s")})
    return pts


def _since(point: dict, start: float) -> float:
    """Compute seconds of a method's own stage up to an eval point. Step 0 is the base policy (its
    eval is the base eval, taken before the stage started): 0 seconds into the stage."""
    return 0.0 if point["step"] == 0 else point["clock_s"] - start


def _promoted(cfg) -> str:
    return cfg.iterate.promote or next(iter(cfg.students))


def teacher_chain(cfg, run_root: Path, stages: list[dict], teacher: str) -> dict:
    """The curve of a teacher promoted ITSELF over the iterations (no distillation; the paper's Table 2 (a) / (b)
    control), from its own run: iteration i's points count (i + 1) fixed batches; compute seconds = the collects and
    teacher runs so far (the step-0 point of a later iteration, the promoted teacher itself, is left out)."""
    from erpd_megatron.pipeline.stages import method_name

    per_batch = cfg.data.prompts_per_batch * cfg.rollout.n_samples
    steps = cfg.teachers[teacher].steps
    pts = []
    for i in range(cfg.iterations):
        before = sum(_stage_s(stages, "collect", iteration=j) + _stage_s(stages, "train_teachers", teacher, j)
                     for j in range(i)) + _stage_s(stages, "collect", iteration=i)
        start = _stage_start(stages, "train_teachers", teacher, i)
        for p in _eval_points(run_root, method_name(teacher, i)):
            if i > 0 and p["step"] == 0:
                continue
            pts.append({**p, "iteration": i, "step": i * steps + p["step"], "rollouts": per_batch * (i + 1),
                        "compute_s": before + _since(p, start)})
    for p in pts:
        p.pop("clock_s", None)
    return {"kind": "teacher_only", "points": pts}


def teacher_only_config(cfg, run_dir: Path):
    """The same preset reduced to the teacher of the promoted ERPD student, promoted itself each iteration (no
    student, no on-policy baseline, no RFT control): same base, same seed, so the same fixed batches as long as the
    chains agree (batch 0 is identical; later batches are sampled by each chain's own base)."""
    import copy

    from erpd_megatron.config import validate

    t = copy.deepcopy(cfg)
    teacher = cfg.students[_promoted(cfg)].teacher
    t.teachers = {teacher: t.teachers[teacher]}
    t.students, t.onpolicy, t.run_dir = {}, None, str(run_dir)
    t.iterate.promote, t.iterate.fallback, t.iterate.online_steps = teacher, "", 0
    validate(t)
    return t, teacher


def analyse_seed(cfg, run_root: Path, stages: list[dict], extra_curves: dict | None = None) -> dict:
    """Per-seed curves (rollouts, compute seconds) and the Table-4 style numbers.

    With `iterations` > 1 a method's curve chains its runs over the batches: iteration i's points count
    (i + 1) fixed batches of rollouts, their `step` is cumulative, and the step-0 point of a later iteration
    (the promoted policy itself, already the previous iteration's last point) is left out. Compute seconds
    of the ERPD chain: the collect, the promoted student's teacher, the signals and that student of every
    iteration so far (other teachers / students, e.g. the RFT control, are not ERPD's cost)."""
    from erpd_megatron.pipeline.stages import method_name

    per_batch = cfg.data.prompts_per_batch * cfg.rollout.n_samples
    base = _eval_points(run_root, "base")
    base_acc = base[0]["accuracy"] if base else None
    collect_s = _stage_s(stages, "collect")
    signals_s = _stage_s(stages, "compute_signals")
    promoted = _promoted(cfg)
    chain_teacher = cfg.students[promoted].teacher

    def upstream(i: int) -> float:
        """ERPD's compute before iteration i's own stages: every earlier iteration of the chain."""
        return sum(_stage_s(stages, "collect", iteration=j) + _stage_s(stages, "train_teachers", chain_teacher, j)
                   + _stage_s(stages, "compute_signals", iteration=j) + _stage_s(stages, "train_students", promoted, j)
                   for j in range(i))

    def chained(name: str, stage: str, steps: int, cost_before) -> list[dict]:
        pts = []
        for i in range(cfg.iterations):
            start = _stage_start(stages, stage, name, i)
            for p in _eval_points(run_root, method_name(name, i)):
                if i > 0 and p["step"] == 0:
                    continue
                pts.append({**p, "iteration": i, "step": i * steps + p["step"], "rollouts": per_batch * (i + 1),
                            "compute_s": cost_before(i) + _since(p, start)})
        return pts

    curves = {}
    for t, tc in cfg.teachers.items():
        kind = "rft" if tc.loss == "sft" else "teacher"  # SFT on the policy's own correct samples: the RFT control
        curves[t] = {"kind": kind, "points": chained(
            t, "train_teachers", tc.steps,
            lambda i: upstream(i) + _stage_s(stages, "collect", iteration=i))}
    for s, sc in cfg.students.items():
        curves[s] = {"kind": "erpd", "points": chained(
            s, "train_students", sc.steps,
            lambda i, sc=sc: upstream(i) + _stage_s(stages, "collect", iteration=i)
            + _stage_s(stages, "train_teachers", sc.teacher, i) + _stage_s(stages, "compute_signals", iteration=i))}
    op_name = f"onpolicy_{cfg.onpolicy.loss}"
    op_start = _stage_start(stages, "train_onpolicy")
    op_rollouts_per_step = cfg.onpolicy.prompts_per_step * cfg.rollout.n_samples
    curves[op_name] = {"kind": "onpolicy", "points": [
        {**p, "rollouts": p["step"] * op_rollouts_per_step, "compute_s": _since(p, op_start)}
        for p in _eval_points(run_root, op_name)]}
    for c in curves.values():
        for p in c["points"]:
            p.pop("clock_s", None)

    curves.update(extra_curves or {})
    op_pts = curves[op_name]["points"]
    target = op_pts[-1]["accuracy"]

    def first_reaching(pts):
        # step 0 is the base policy itself: only trained points count as reaching the target
        return next((p for p in pts if p["step"] > 0 and p["accuracy"] >= target - 1e-12), None)

    def summary(c):
        pts = c["points"]
        last, best = pts[-1], max(pts, key=lambda p: p["accuracy"])
        hit = first_reaching(pts)
        gain = last["accuracy"] - base_acc if base_acc is not None else None
        return {
            "final_accuracy": last["accuracy"], "final_kl": last["kl"], "final_kl_token": last.get("kl_token"),
            "final_rollouts": last["rollouts"],
            "best_accuracy": best["accuracy"], "best_step": best["step"], "best_kl": best["kl"],
            "gain_over_base": gain,
            "gain_per_1k_rollouts": gain / last["rollouts"] * 1000 if gain is not None and last["rollouts"] else None,
            "gain_per_unit_kl": gain / last["kl"] if gain is not None and last["kl"] and last["kl"] > 0 else None,
            "reaches_onpolicy_final": hit is not None,
            "rollouts_to_onpolicy_final": hit["rollouts"] if hit else None,
            "compute_s_to_onpolicy_final": hit["compute_s"] if hit else None,
            "compute_s_total": last["compute_s"],
        }

    return {"base_accuracy": base_acc, "onpolicy_final_accuracy": target,
            # when the baseline did not improve on the base, "reaching its final accuracy" says little
            "onpolicy_improved_over_base": base_acc is not None and target > base_acc,
            "stage_compute_s": {"collect": collect_s, "signals": signals_s,
                                **{f"teacher:{t}": _stage_s(stages, "train_teachers", t) for t in cfg.teachers},
                                **{f"student:{s}": _stage_s(stages, "train_students", s) for s in cfg.students},
                                "onpolicy": _stage_s(stages, "train_onpolicy")},
            "methods": {n: {"kind": c["kind"], **summary(c)} for n, c in curves.items()},
            "curves": curves}


def rft_name(lr: float) -> str:
    """rft_lr3e-4, rft_lr1p5e-4: no dot (a dot would split the override key)."""
    m, e = f"{lr:e}".split("e")
    return f"rft_lr{float(m):g}e{int(e)}".replace(".", "p")


def rft_lr_overrides(cfg, lrs) -> list[str]:
    """Overrides adding one RFT control per learning rate (`rft_lr<lr>`: the preset's `rft` teacher at that lr), so
    a run on the validation split (data.eval=toy_val / long_val) can choose the RFT lr (issue 22, C4)."""
    r = cfg.teachers["rft"]
    return [f"teachers.{rft_name(lr)}.{k}={v}" for lr in lrs
            for k, v in (("loss", "sft"), ("steps", r.steps), ("mini_batch_size", r.mini_batch_size),
                         ("save_every", r.save_every), ("lr", lr))]


def preset_path(preset: str | Path | None) -> Path:
    """A preset name of erpd_megatron/presets ("bench", "bench_long") or a YAML path; None = bench.yaml."""
    if preset is None:
        return PRESET
    p = Path(preset)
    return p if p.suffix in (".yaml", ".yml") else PRESET.with_name(f"{preset}.yaml")


def _run_pipeline(cfg) -> tuple[float, _ComputeClock]:
    from erpd_megatron.pipeline.run import ALL, _pipeline

    clock = _ComputeClock()
    undo = _instrument(clock)
    t = time.perf_counter()
    try:
        _pipeline(cfg, ALL)
    finally:
        undo()
    return time.perf_counter() - t, clock


def run_seed(seed: int, work: Path, base_dir: Path, overrides: list[str], log=print, preset: Path = PRESET,
             teacher_only: bool = True) -> dict:
    from erpd_megatron.config import load_config, save_config
    from erpd_megatron.pipeline.context import TOY_BASES

    run_dir = work / f"seed_{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # the pipeline resumes finished work: a stale dir would skip the measurement
    cfg = load_config(str(preset), [*overrides, f"seed={seed}", f"run_dir={run_dir}"])
    if cfg.model.base in TOY_BASES:
        shutil.copytree(base_dir, run_dir / "hf_base")
    save_config(cfg, run_dir / "config.yaml")
    wall, clock = _run_pipeline(cfg)
    extra, eval_s = {}, clock.eval_s
    if teacher_only and cfg.iterations > 1:  # the teacher promoted itself: its own run dir beside
        tdir = work / f"seed_{seed}_teacher_only"
        if tdir.exists():
            shutil.rmtree(tdir)
        tcfg, teacher = teacher_only_config(cfg, tdir)
        if tcfg.model.base in TOY_BASES:
            shutil.copytree(base_dir, tdir / "hf_base")
        save_config(tcfg, tdir / "config.yaml")
        twall, tclock = _run_pipeline(tcfg)
        wall, eval_s = wall + twall, eval_s + tclock.eval_s
        extra[f"{teacher}_promoted"] = teacher_chain(tcfg, tdir, tclock.stages, teacher)
    res = analyse_seed(cfg, run_dir, clock.stages, extra)
    res.update(seed=seed, wall_s=wall, eval_s=eval_s, run_dir=str(run_dir))
    m = res["methods"]
    log(f"[{NAME}] seed {seed}: base {res['base_accuracy']:.3f}; " + "; ".join(
        f"{n} {v['final_accuracy']:.3f} (KL/seq {v['final_kl'] or 0:.4f}, KL/token {v['final_kl_token'] or 0:.5f}, "
        f"{v['final_rollouts']} rollouts)"
        for n, v in m.items()) + f"; wall {wall:.0f} s (eval {clock.eval_s:.0f} s)")
    return res


def aggregate(per_seed: list[dict]) -> dict:
    """median/min/max over seeds of every per-method number, plus paired ERPD - on-policy differences."""
    methods = per_seed[0]["methods"].keys()
    keys = ["final_accuracy", "final_kl", "final_kl_token", "best_accuracy", "gain_over_base", "gain_per_1k_rollouts",
            "gain_per_unit_kl", "compute_s_to_onpolicy_final", "compute_s_total"]
    out: dict = {"base_accuracy": spread([s["base_accuracy"] for s in per_seed]),
                 "seeds_where_onpolicy_improved_over_base": sum(s["onpolicy_improved_over_base"] for s in per_seed),
                 "methods": {}}
    for n in methods:
        row = {"kind": per_seed[0]["methods"][n]["kind"]}
        for k in keys:
            vals = [s["methods"][n][k] for s in per_seed if s["methods"][n][k] is not None]
            row[k] = spread(vals)
        row["seeds_reaching_onpolicy_final"] = sum(s["methods"][n]["reaches_onpolicy_final"] for s in per_seed)
        row["rollouts_to_onpolicy_final"] = [s["methods"][n]["rollouts_to_onpolicy_final"] for s in per_seed]
        out["methods"][n] = row
    op = next(n for n in methods if per_seed[0]["methods"][n]["kind"] == "onpolicy")
    paired = {}
    for n in methods:
        if per_seed[0]["methods"][n]["kind"] != "erpd":
            continue
        paired[n] = {
            "accuracy_diff_vs_onpolicy": spread([s["methods"][n]["final_accuracy"] - s["methods"][op]["final_accuracy"]
                                                 for s in per_seed]),
            "kl_ratio_vs_onpolicy": spread([s["methods"][n]["final_kl"] / s["methods"][op]["final_kl"]
                                            for s in per_seed if s["methods"][op]["final_kl"]]),
            "compute_s_ratio_vs_onpolicy_to_target": spread([
                s["methods"][n]["compute_s_to_onpolicy_final"] / s["methods"][op]["compute_s_to_onpolicy_final"]
                for s in per_seed if s["methods"][n]["compute_s_to_onpolicy_final"] is not None
                and s["methods"][op]["compute_s_to_onpolicy_final"]]),
        }
    out["paired_erpd_minus_onpolicy"] = paired
    # ERPD against the RFT control (SFT on the same batches' correct samples): what distillation adds
    rfts = [n for n in methods if per_seed[0]["methods"][n]["kind"] == "rft"]
    out["paired_erpd_minus_rft"] = {
        f"{n} - {r}": {"accuracy_diff": spread([s["methods"][n]["final_accuracy"] - s["methods"][r]["final_accuracy"]
                                                for s in per_seed])}
        for n in paired for r in rfts}
    # ERPD against iterating its teacher itself (no distillation; paper Table 2 (a) / (b)): accuracy and KL
    solo = [n for n in methods if per_seed[0]["methods"][n]["kind"] == "teacher_only"]
    out["paired_erpd_minus_teacher_only"] = {
        f"{n} - {t}": {
            "accuracy_diff": spread([s["methods"][n]["final_accuracy"] - s["methods"][t]["final_accuracy"]
                                     for s in per_seed]),
            "kl_ratio": spread([s["methods"][n]["final_kl"] / s["methods"][t]["final_kl"]
                                for s in per_seed if s["methods"][t]["final_kl"]])}
        for n in paired for t in solo}
    return out


def _results(per_seed: list[dict], warmup_s: float) -> dict:
    """The JSON's `results`: the aggregate over seeds, each seed's numbers and every curve (seed, method)."""
    return {"seeds": [s["seed"] for s in per_seed], "base_warmup_s": warmup_s, **aggregate(per_seed),
            "per_seed": [{k: v for k, v in s.items() if k != "curves"} for s in per_seed],
            "curves": [{"seed": s["seed"], "method": n, "kind": c["kind"], "points": c["points"]}
                       for s in per_seed for n, c in s["curves"].items()]}


def merge(paths, out_dir=None, log=print) -> dict:
    """One JSON from several runs of the same preset and overrides on different seeds (e.g. one process per seed, so
    a run stopped by a deadline keeps the seeds that finished): the aggregate is recomputed over all their seeds; the
    config records each part's command, start, wall time and machine load."""
    import json

    docs = [json.loads(Path(p).read_text()) for p in paths]
    key = [(d["benchmark"], d["config"]["preset"], d["config"]["overrides"]) for d in docs]
    if len(set(map(repr, key))) != 1:
        raise ValueError(f"merge: the parts differ in benchmark / preset / overrides: {key}")
    per_seed = [{**ps, "curves": {c["method"]: {"kind": c["kind"], "points": c["points"]}
                                  for c in d["results"]["curves"] if c["seed"] == ps["seed"]}}
                for d in docs for ps in d["results"]["per_seed"]]
    seeds = [s["seed"] for s in per_seed]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"merge: a seed appears twice: {seeds}")
    parts = [{"path": str(p), "command": d["command"], "started": d["started"], "wall_s": d["wall_s"],
              "seeds": d["results"]["seeds"], "loadavg_start": d["machine"].get("loadavg_start"),
              "loadavg_end": d["machine"].get("loadavg_end")} for p, d in zip(paths, docs)]
    rec = Recorder(docs[0]["benchmark"], {**docs[0]["config"], "seeds": seeds, "merged_from": parts})
    results = _results(per_seed, docs[0]["results"].get("base_warmup_s", 0.0))
    path = rec.write(results, out_dir)
    log(f"[{NAME}] merged seeds {seeds} -> {path}")
    return results


def run(out_dir=None, *, seeds=(1, 2, 3), overrides: list[str] = (), work_dir: str | Path | None = None,
        log=print, preset: str | Path | None = None, teacher_only: bool = True, rft_lrs=()) -> dict:
    import torch

    from erpd_megatron.config import load_config
    from erpd_megatron.pipeline.context import TOY_BASES

    torch.set_num_threads(1)
    preset = preset_path(preset)
    name = NAME if preset == PRESET else f"{NAME}_{preset.stem}"  # bench_long writes its own JSON
    work = Path(work_dir) if work_dir is not None else DEFAULT_WORK.with_name(name)
    work.mkdir(parents=True, exist_ok=True)
    cfg0 = load_config(str(preset), list(overrides))
    if rft_lrs:
        overrides = [*overrides, *rft_lr_overrides(cfg0, rft_lrs)]
        cfg0 = load_config(str(preset), overrides)
    rec = Recorder(name, {"preset": str(preset.relative_to(REPO_ROOT)) if preset.is_relative_to(REPO_ROOT)
                          else str(preset), "overrides": list(overrides),
                          "seeds": list(seeds), "work_dir": str(work),
                          "rollouts_per_fixed_batch": cfg0.data.prompts_per_batch * cfg0.rollout.n_samples,
                          "eval": {"prompts": cfg0.data.eval_prompts, "k": cfg0.eval.k, "every": cfg0.eval.every}})
    base_dir = work / "hf_base"
    t = time.perf_counter()
    if cfg0.model.base in TOY_BASES:  # one warm-up shared by all seeds (copied into each run dir)
        from erpd_megatron.toy import warmup

        warmup.ensure_base_model(base_dir, getattr(warmup, TOY_BASES[cfg0.model.base]), log=lambda m: None)
    warmup_s = time.perf_counter() - t
    per_seed = [run_seed(s, work, base_dir, list(overrides), log=log, preset=preset, teacher_only=teacher_only)
                for s in seeds]
    results = _results(per_seed, warmup_s)
    path = rec.write(results, out_dir)
    for n, m in results["methods"].items():
        fa = m["final_accuracy"]
        log(f"[{NAME}] {n}: final acc median {fa['median']:.3f} [{fa['min']:.3f}, {fa['max']:.3f}], KL median "
            f"{m['final_kl']['median']}, reaches on-policy final in {m['seeds_reaching_onpolicy_final']}/"
            f"{len(seeds)} seeds")
    log(f"[{NAME}] -> {path}")
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--work", default=None, help=f"run dirs (default {DEFAULT_WORK}[_<preset>])")
    ap.add_argument("--preset", default=None, help="bench (default: the toy task) | bench_long (the long task) | a "
                                                   "YAML path")
    ap.add_argument("--no-teacher-only", action="store_true",
                    help="skip the control that promotes the teacher itself (no distillation; Table 2 (a) / (b))")
    ap.add_argument("--rft-lrs", type=float, nargs="*", default=(),
                    help="add one RFT control per lr (choose the RFT lr on the validation split: data.eval=toy_val)")
    ap.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                    help="write one JSON (to --out) from these JSONs of the same preset on different seeds; runs "
                         "nothing")
    ap.add_argument("overrides", nargs="*", help="section.field=value on top of the preset")
    a = ap.parse_args(argv)
    if a.merge:
        merge(a.merge, a.out)
        return
    run(a.out, seeds=a.seeds, overrides=a.overrides, work_dir=a.work, preset=a.preset,
        teacher_only=not a.no_teacher_only, rft_lrs=a.rft_lrs)


if __name__ == "__main__":
    main()
