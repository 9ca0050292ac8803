"""The Transformer Engine half of the GPU smoke test (scripts/gpu_smoke.sh, run by bench/gpu_smoke.py after its own
checks; issue 21 items 1, 2, 3 and 6): what only breaks with TE installed. Each check returns a dict with "pass", or
"skipped" (pass None) with the reason when CUDA or TE is missing.

- optimizer_resume (item 1): an engine trained 2 steps is saved with its optimizer and a fresh build loads it (with TE
  megatron's Adam is TE's FusedAdam, whose state_dict has no dtype for a per-parameter 'step': this load raised
  KeyError); the next update equals the uninterrupted engine's (relative error of the update vectors). Control: a
  model-only load (fresh Adam moments) must give a clearly different update. Runs without TE too (torch Adam).
- reuse_vs_fresh (item 2): an engine used 3 steps at 5x the LR, `reset` and reloaded, then 2 steps, against a fresh
  build from the same checkpoint. Control, where the optimizer keeps its step in the param group (FusedAdam): the
  same with the group step put back (what `reset` left before the fix) must differ.
- fp8_pipeline (item 3): `model.fp8=true` through `Context.new_policy` (the pipeline's own build) gives a TE FP8
  engine; at an odd length (37, padded to 16) its log-probs are near the bf16 engine's and a train step applies.
- sp_fp8_rows (item 6): one GPU cannot run TP > 1, so the rows each TP rank holds before the sequence all-gather under
  SP, (s / tp) * b with s from `seq_multiple` / `padded_length`, b = 1, odd lengths, tp 2 / 4 / 8, go through one
  FP8 te.Linear forward and backward; the rows of the former rule lcm(16, tp) are tried too (reported only).

Updates are compared on the model parameters (bf16 on GPU), at LR 1e-2 so that one update is far above bf16's
resolution of the small model's weights; tolerance 5 % (the GPU kernels need not be bit-reproducible).
"""

from __future__ import annotations

import gc
import math
import os

import torch

UPDATE_TOL = 0.05  # relative error of an update vector against the reference engine's
FP8_LOGPROB_MEAN_TOL = 0.5  # FP8 (first steps of delayed scaling) against bf16 log-probs, mean |diff|: sanity only


def _loss(lp, mb, ent):
    from erpd_megatron.bench.gpu_smoke import loss_fn

    return loss_fn(lp, mb, ent)


def _params(e) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in e.named_parameters_global()}


def _update(before: dict, e) -> torch.Tensor:
    return torch.cat([(p.detach().float() - before[n]).flatten() for n, p in e.named_parameters_global()])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _inner(e) -> list:
    return [o.optimizer for o in e.optimizer.chained_optimizers]


def _group_steps(e) -> list:
    return sorted({g.get("step") for o in _inner(e) for g in o.param_groups if g["params"]}, key=str)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _te_missing(cuda: bool) -> str | None:
    from erpd_megatron.megatron.model import have_te

    if not cuda:
        return "no CUDA device"
    if not have_te():
        return "Transformer Engine not installed (pip install transformer-engine[pytorch])"
    return None


def check_optimizer_resume(build, batch, other, tmp: str) -> dict:
    a = build(1e-2)
    for _ in range(2):
        a.train_step(other, _loss)
    a.save(os.path.join(tmp, "resume"))
    b, c = build(1e-2), build(1e-2)
    b.load(os.path.join(tmp, "resume"))  # KeyError: 'step' with TE's FusedAdam before the fix
    c.load(os.path.join(tmp, "resume"), model_only=True)  # control: the same weights, fresh Adam state
    res = {"optimizer": sorted({type(o).__name__ for o in _inner(a)}), "loaded_step": b.step,
           "group_steps_loaded": _group_steps(b)}
    before = _params(a)
    for e in (a, b, c):
        e.train_step(batch, _loss)
    ua = _update(before, a)
    res.update(update_rel_err=_rel(_update(before, b), ua), control_rel_err=_rel(_update(before, c), ua),
               group_steps_after=(_group_steps(a), _group_steps(b)), tolerance=UPDATE_TOL)
    res["pass"] = (res["loaded_step"] == 2 and res["update_rel_err"] < UPDATE_TOL
                   and res["control_rel_err"] > 2 * UPDATE_TOL)
    return res


def check_reuse_vs_fresh(build, batch, other, tmp: str) -> dict:
    from erpd_megatron.megatron.engine import OptimConfig

    src = build(1e-2)
    src.train_step(other, _loss)
    ck = os.path.join(tmp, "reuse")
    src.save(ck)
    del src
    new = OptimConfig(lr=1e-2, min_lr=1e-2, micro_batch_size=4)

    def reused(keep_group_step: bool):
        e = build(5e-2)
        for _ in range(3):
            e.train_step(other, _loss)
        kept = [(g, g["step"]) for o in _inner(e) for g in o.param_groups if "step" in g]
        e.reset(new)
        if keep_group_step:  # what reset left behind before it cleared FusedAdam's group step
            for g, s in kept:
                g["step"] = s
        e.load(ck, model_only=True)
        return e, bool(kept)

    used, group_step = reused(False)
    fresh = build(1e-2)
    fresh.load(ck, model_only=True)
    before = _params(fresh)
    for _ in range(2):
        used.train_step(batch, _loss)
        fresh.train_step(batch, _loss)
    uf = _update(before, fresh)
    res = {"optimizer": sorted({type(o).__name__ for o in _inner(fresh)}), "optimizer_keeps_group_step": group_step,
           "update_rel_err": _rel(_update(before, used), uf), "tolerance": UPDATE_TOL}
    res["pass"] = res["update_rel_err"] < UPDATE_TOL
    del used
    if group_step:  # the control can only differ where the step lives in the group
        stale, _ = reused(True)
        for _ in range(2):
            stale.train_step(batch, _loss)
        res["control_rel_err"] = _rel(_update(before, stale), uf)
        res["pass"] = res["pass"] and res["control_rel_err"] > 2 * UPDATE_TOL
    return res


def check_fp8_pipeline(cfg, batch, tmp: str, cuda: bool) -> dict:
    missing = _te_missing(cuda)
    if missing:
        return {"pass": None, "skipped": missing}
    from pathlib import Path

    from erpd_megatron.config import load_config
    from erpd_megatron.megatron.engine import OptimConfig, PolicyEngine
    from erpd_megatron.megatron.model import BuildOptions
    from erpd_megatron.megatron.parallel import ParallelConfig
    from erpd_megatron.pipeline.checks import check_environment
    from erpd_megatron.pipeline.context import Context

    base = PolicyEngine(cfg, ParallelConfig(), OptimConfig(micro_batch_size=4), BuildOptions(spec="te"), seed=0)
    ck = os.path.join(tmp, "fp8_base")
    base.save(ck)
    lp_bf16 = base.forward_logprobs(batch).float()
    del base
    _free()
    run_cfg = load_config(None, ["model.fp8=true", "model.micro_batch_size=4"])
    check_environment(run_cfg)  # what the CLI checks first: passes with CUDA + TE
    ctx = Context(cfg=run_cfg, run=None, base_hf=None, tokenizer=None, model_cfg=cfg, _par=ParallelConfig())
    eng = ctx.new_policy(lr=1e-4, init=Path(ck))
    am = batch["attention_mask"].float()
    lp = eng.forward_logprobs(batch).float()
    step = eng.train_step(batch, _loss)
    res = {"tcfg_fp8": eng.tcfg.fp8, "fp8_recipe": getattr(eng.tcfg, "fp8_recipe", None),
           "seq_len": int(am.sum(1).max()), "seq_multiple": eng.seq_multiple,
           "logprob_mean_abs_vs_bf16": float(((lp - lp_bf16).abs() * am).sum() / am.sum()),
           "loss": step.get("loss"), "grad_norm": step.get("train/grad_norm"), "update_ok": step.get("train/update_ok"),
           "tolerance": {"logprob_mean_abs": FP8_LOGPROB_MEAN_TOL}}
    res["pass"] = (res["tcfg_fp8"] == "hybrid" and math.isfinite(res["loss"]) and res["update_ok"] == 1.0
                   and res["logprob_mean_abs_vs_bf16"] < FP8_LOGPROB_MEAN_TOL)
    return res


def check_sp_fp8_rows(hidden: int, cuda: bool, lengths=(37, 1001)) -> dict:
    missing = _te_missing(cuda)
    if missing:
        return {"pass": None, "skipped": missing}
    import transformer_engine.pytorch as te
    from transformer_engine.common.recipe import DelayedScaling, Format

    from erpd_megatron.megatron.engine import padded_length, seq_multiple
    from erpd_megatron.megatron.parallel import ParallelConfig

    autocast = getattr(te, "fp8_autocast", None) or te.autocast
    recipe = DelayedScaling(fp8_format=Format.HYBRID)
    layer = te.Linear(hidden, hidden, params_dtype=torch.bfloat16, device="cuda")

    def runs(rows: int) -> str | None:
        x = torch.randn(rows, 1, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        try:
            with autocast(enabled=True, fp8_recipe=recipe):
                y = layer(x)
            y.float().sum().backward()
            return None
        except Exception as e:  # noqa: BLE001 - TE's refusal is the result
            return f"{type(e).__name__}: {str(e)[:200]}"

    cases = []
    for tp in (2, 4, 8):
        for t in lengths:
            s = padded_length(t, seq_multiple(ParallelConfig(tp=tp, sp=True), fp8=True))
            old = padded_length(t, math.lcm(16, tp))
            cases.append({"tp": tp, "t": t, "s": s, "local_rows": s // tp, "error": runs(s // tp),
                          "old_rule_local_rows": old // tp, "old_rule_error": runs(old // tp)})
    return {"cases": cases, "pass": all(c["error"] is None for c in cases),
            "old_rule_refused": sum(c["old_rule_error"] is not None for c in cases)}


def run_checks(cfg, device, dtype, timed, checks: dict, tmp: str) -> None:
    """Run every check above through gpu_smoke's `timed` wrapper into `checks`."""
    from erpd_megatron.bench.gpu_smoke import _batch
    from erpd_megatron.megatron.engine import OptimConfig, PolicyEngine
    from erpd_megatron.megatron.model import BuildOptions
    from erpd_megatron.megatron.parallel import ParallelConfig

    cuda = device.type == "cuda"

    def build(lr: float):  # spec auto: the TE spec (and TE's FusedAdam) wherever TE is installed
        return PolicyEngine(cfg, ParallelConfig(), OptimConfig(lr=lr, min_lr=lr, micro_batch_size=4),
                            BuildOptions(spec="auto", dtype=dtype), seed=0)

    batch, other = _batch(cfg, device, T=37), _batch(cfg, device, T=37, seed=2)
    for name, fn, args in (("optimizer_resume", check_optimizer_resume, (build, batch, other, tmp)),
                           ("reuse_vs_fresh", check_reuse_vs_fresh, (build, batch, other, tmp)),
                           ("fp8_pipeline", check_fp8_pipeline, (cfg, batch, tmp, cuda)),
                           ("sp_fp8_rows", check_sp_fp8_rows, (cfg.hidden_size, cuda))):
        r = timed(name, fn, *args)
        if r is not None:
            checks[name] = r
        _free()
