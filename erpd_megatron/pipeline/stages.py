"""The ERPD stages over one fixed batch: teachers (stage 1), signals, students (stage 2), and the
on-policy baseline with the same rollout budget. Each is resumable (see train.py / rundir.py).

Names: a method's checkpoints live in ckpt/<method>/, its metrics in metrics/<method>.jsonl, its evals
in eval/<method>/. Iteration i > 0 prefixes methods with "it<i>_".
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from erpd_megatron.algorithms import signals as S
from erpd_megatron.algorithms.advantages import grpo_advantages
from erpd_megatron.config import student_mini_batch
from erpd_megatron.data.rollout_store import RolloutStore
from erpd_megatron.pipeline import objectives
from erpd_megatron.pipeline.collect import add_policy_logprobs, batch_prompts, sample_batch
from erpd_megatron.pipeline.evaluate import evaluate_policy
from erpd_megatron.pipeline.rundir import minibatch_indices
from erpd_megatron.pipeline.train import final_step, finished, open_metric_log, slice_batch, train_loop

log = logging.getLogger("erpd.stages")


def method_name(name: str, iteration: int) -> str:
    return name if iteration == 0 else f"it{iteration}_{name}"


def ckpt_at(ctx, method: str, step: int):
    from erpd_megatron.megatron.checkpoint import iter_dirname

    return ctx.run.ckpt(method) / iter_dirname(step)


def load_batch(ctx, store: RolloutStore, batch: int, columns=()) -> dict:
    t = store.load_tensors(batch, columns=["old_logprobs", *columns], pad_id=ctx.tokenizer.pad_token_id or 0)
    t["rewards"] = t["rewards"].float()
    return t


def _eval_fn(ctx, method: str, iteration: int, init_is_base: bool):
    def fn(policy, step):
        if step == 0 and init_is_base:  # the base itself: reuse its evaluation
            base = ctx.run.eval_results(method_name("base", iteration)).get(0)
            if base is not None:
                ctx.run.write_eval(method, 0, {**base, "method": method}) if ctx.is_main else None
                return
        evaluate_policy(ctx, method, step, policy)

    return fn


def evaluate_base(ctx, iteration: int) -> None:
    name = method_name("base", iteration)
    if 0 not in ctx.run.eval_results(name):
        policy = ctx.new_policy(init=ctx.base_ckpt(iteration))
        evaluate_policy(ctx, name, 0, policy)
        ctx.release(policy)


# ----------------------------------------------------------------------------- no learning signal

GROUP_NORMALISED = ("grpo", "sapo", "cispo")  # advantages = rewards normalised within each prompt's group


def no_signal_reason(rewards: torch.Tensor, group_ids: torch.Tensor | None = None, loss: str = "") -> str | None:
    """Why a batch teaches nothing, or None: every reward equal (no method can tell good from bad), or, for
    the group-normalised losses, every prompt's samples sharing one reward (all advantages exactly 0)."""
    r = rewards.float()
    if r.numel() == 0:
        return "the batch is empty"
    if bool((r == r[0]).all()):
        return f"every reward equals {float(r[0]):g} ({r.numel()} samples)"
    if loss in GROUP_NORMALISED and group_ids is not None:
        g = torch.as_tensor(group_ids)
        if all(bool((r[g == k] == r[g == k][0]).all()) for k in torch.unique(g)):
            return f"every prompt's samples share one reward: all {loss} advantages are 0"
    return None


def warn_if_no_signal(batch: dict, what: str, method: str, loss: str = "") -> str | None:
    """Logs a warning naming the batch and the method when `no_signal_reason` finds one; returns the reason."""
    reason = no_signal_reason(batch["rewards"], batch.get("group_ids"), loss)
    if reason is not None:
        log.warning("%s carries no learning signal for %s: %s", what, method, reason)
    return reason


# ----------------------------------------------------------------------------- stage 1


def train_teachers(ctx, iteration: int = 0, only: str | None = None) -> None:
    store = RolloutStore(ctx.run.rollouts)
    batch = load_batch(ctx, store, iteration)
    for name, t in ctx.cfg.teachers.items():
        if only is not None and name != only:
            continue
        method = method_name(name, iteration)
        if finished(ctx.run.ckpt(method), t.steps):  # its completion marker: no critic, no model built
            log.info("%s: finished in an earlier invocation, skipped", method)
            continue
        if t.init == "base":
            init = ctx.base_ckpt(iteration)
        else:
            src, step = t.init.split("@")
            init = ckpt_at(ctx, method_name(src, iteration), int(step))
        warn_if_no_signal(batch, f"fixed batch {iteration}", method, t.loss)
        b = dict(batch)
        if t.loss in GROUP_NORMALISED:
            b["advantages"] = grpo_advantages(batch["rewards"], batch["group_ids"])
        elif t.loss == "ppo":
            b["advantages"] = critic_advantages(ctx, method, t, batch, iteration)
        loss_fn = objectives.teacher_objective(t, ctx.cfg.rollout.max_new_tokens)
        policy = train_loop(ctx, method, batch=b, loss_fn=loss_fn, steps=t.steps, mini_batch_size=t.mini_batch_size,
                            lr=t.lr, warmup_steps=t.warmup_steps, save_every=t.save_every, init=init, eval_fn=_eval_fn(ctx, method, iteration,
                                                                                 t.init == "base"),
                            step_metrics=_teacher_metrics, early_stop_patience=t.early_stop_patience,
                            keep_steps=teacher_keep_steps(ctx.cfg, name))
        ctx.release(policy)  # saved and evaluated; later stages load its checkpoints


def teacher_keep_steps(cfg, name: str) -> set[int] | None:
    """Checkpoint steps of teacher `name` that later stages read, which `checkpoint.keep_last` must keep: the
    unlearned step and an explicit teacher_step of its students, `init: name@step` of other teachers. None (keep
    all) when a strategy-2 student picks its unlearned checkpoint from the dip among every saved one."""
    from erpd_megatron.config import checkpoint_ref

    keep = set()
    for s in cfg.students.values():
        if s.unlearned and checkpoint_ref(s.unlearned)[0] == name and checkpoint_ref(s.unlearned)[1] > 0:
            keep.add(checkpoint_ref(s.unlearned)[1])  # a named unlearned checkpoint (-1, the last, is kept anyway)
        if s.teacher != name or not {1, 2} & set(s.strategies):
            continue
        if 2 in s.strategies and not s.unlearned:
            if s.unlearned_step <= 0:
                return None
            keep.add(s.unlearned_step)
        if s.teacher_step > 0:
            keep.add(s.teacher_step)
    for t in cfg.teachers.values():
        if t.init != "base" and t.init.split("@")[0] == name:
            keep.add(int(t.init.split("@")[1]))
    promoted, step = checkpoint_ref(cfg.iterate.promote) if cfg.iterate.promote else ("", -1)
    if promoted == name and step > 0:  # a promoted teacher checkpoint is the next iteration's base
        keep.add(step)
    return keep


def critic_advantages(ctx, method: str, t, batch: dict, iteration: int):
    """PPO teacher: pre-train a value model of the policy's architecture on the fixed batch (lambda_critic = 1),
    then per-token advantages by decoupled GAE with the length-adaptive policy lambda (VAPO, paper Sec. 4.1).
    The critic is not updated while the policy trains (the batch is fixed; the paper does not say)."""
    from erpd_megatron.megatron.engine import OptimConfig
    from erpd_megatron.megatron.value import ValueEngine
    from erpd_megatron.pipeline.critic import ppo_advantages, pretrain_critic

    ck = ctx.run.ckpt(method + "_critic")
    ctx.drop_idle()  # peak memory: the critic alone, as without engine reuse (the pool keeps idle policies)
    critic = ValueEngine(ctx.model_cfg, ctx.par, OptimConfig(lr=t.critic_lr, min_lr=t.critic_lr,
                         micro_batch_size=ctx.cfg.model.micro_batch_size), ctx.build_opts(), seed=ctx.cfg.seed)
    if (ck / "latest").exists():
        critic.load(str(ck))
    else:
        critic.load_policy_weights(str(ctx.base_ckpt(iteration)))
    metrics_log = open_metric_log(ctx, method + "_critic", critic.step) if ctx.is_main else None

    from erpd_megatron.utils import console

    console.header(f"critic of {method}", f"{t.critic_steps} value pre-training steps, lambda = 1")

    def on_step(step, m):
        if metrics_log is not None:
            metrics_log.log(step, m)
            console.print_step(method + "_critic", step, t.critic_steps, m)
        if step % t.save_every == 0:
            critic.save(str(ck))

    pretrain_critic(critic, batch, t.critic_steps, t.mini_batch_size, ctx.cfg.seed, on_step=on_step)
    if critic.step % t.save_every:
        critic.save(str(ck))
    adv, m = ppo_advantages(critic, batch, alpha=t.gae_alpha)
    if metrics_log is not None:
        metrics_log.log(t.critic_steps + 1, m)
        metrics_log.close()
    return adv


def _teacher_metrics(policy, mb) -> dict:
    """Share of positive samples in the mini-batch (the log-prob / KL / entropy diagnostics come from
    objectives.with_policy_metrics, computed on the step's own forward)."""
    r = mb["rewards"]
    return {"batch/positive_frac": float((r > 0.5).float().mean())}


# ----------------------------------------------------------------------------- signals


def _teacher_step(ctx, student, iteration: int) -> int:
    tm = method_name(student.teacher, iteration)
    return student.teacher_step if student.teacher_step > 0 else \
        final_step(ctx.run.ckpt(tm), ctx.cfg.teachers[student.teacher].steps)


def _lp_column(method: str, step: int) -> str:
    return f"lp_{method}_s{step}".lower()


def dip_step(pos_logprob: dict[int, float]) -> int:
    """The bottom of the unlearning dip: the step with the lowest mean token log-prob of positive samples
    (ties: the earliest). `pos_logprob` maps candidate checkpoint steps (before the teacher's own) to it."""
    if not pos_logprob:
        raise ValueError("no candidate checkpoint for the unlearned policy")
    return min(sorted(pos_logprob), key=lambda s: pos_logprob[s])


def unlearned_ref(ctx, student, iteration: int) -> tuple[str, int]:
    """Strategy 2's pi_U as (method, step): the checkpoint `student.unlearned` names ("<teacher>@<step>", a run of its
    own; no step = that run's last), or else `unlearned_step` of the student's own teacher run."""
    if student.unlearned:
        from erpd_megatron.config import checkpoint_ref

        name, step = checkpoint_ref(student.unlearned)
        um = method_name(name, iteration)
        return um, step if step > 0 else final_step(ctx.run.ckpt(um), ctx.cfg.teachers[name].steps)
    return method_name(student.teacher, iteration), unlearned_step(ctx, student, iteration)


def unlearned_step(ctx, student, iteration: int) -> int:
    """pi_U's step: `student.unlearned_step`, or for -1 the dip (`dip_step`) over the teacher's saved checkpoints
    before its own step, measured on the fixed batch's positive samples. The curve and the choice are written to
    iter_<i>/unlearned_<teacher>.json once (all ranks compute the log-prob columns, which stay in the store)."""
    if student.unlearned_step > 0:
        return student.unlearned_step
    import json

    from erpd_megatron.algorithms.metrics import logprob_by_outcome
    from erpd_megatron.utils.io import atomic_write_json

    tm = method_name(student.teacher, iteration)
    record = ctx.run.root / f"iter_{iteration}" / f"unlearned_{tm}.json"
    if record.exists():
        return json.loads(record.read_text())["step"]
    top = _teacher_step(ctx, student, iteration)
    every = ctx.cfg.teachers[student.teacher].save_every
    candidates = list(range(every, top, every))
    store = RolloutStore(ctx.run.rollouts)
    for step in candidates:
        if _lp_column(tm, step) not in store.per_token_columns(iteration):
            policy = ctx.new_policy(init=ckpt_at(ctx, tm, step))
            add_policy_logprobs(ctx, store, iteration, _lp_column(tm, step), policy)
            ctx.release(policy)
    batch = load_batch(ctx, store, iteration, [_lp_column(tm, s) for s in candidates])
    curve = {s: logprob_by_outcome(batch[_lp_column(tm, s)], batch["response_mask"], batch["rewards"])["pos_logprob"]
             for s in candidates}
    curve[0] = logprob_by_outcome(batch["old_logprobs"], batch["response_mask"], batch["rewards"])["pos_logprob"]
    if curve[0] != curve[0]:  # NaN: no positive sample in the batch, so no dip to find
        chosen = candidates[0]
        log.warning("%s: the fixed batch has no positive sample; unlearned checkpoint = step %d (the first saved)",
                    tm, chosen)
    else:
        chosen = dip_step({s: v for s, v in curve.items() if s > 0})
    if chosen == candidates[-1] and len(candidates) > 1:
        log.warning("%s: the positives' log-prob is lowest at step %d, the last saved before the teacher's (%d): "
                    "no recovery seen, pi_U may be past the dip's bottom or the dip not over", tm, chosen, top)
    log.info("%s: unlearned checkpoint = step %d (positives' mean log-prob by step: %s)", tm, chosen,
             ", ".join(f"{s}: {v:.4f}" for s, v in sorted(curve.items())))
    if ctx.is_main:
        atomic_write_json(record, {"step": chosen, "teacher_step": top, "pos_logprob": {str(k): v for k, v in
                                                                                        sorted(curve.items())}})
    ctx.barrier()
    return chosen


def signal_columns(ctx, student, iteration: int) -> dict[str, tuple]:
    """Per-token log-prob columns a student needs: column -> (kind, checkpoint path)."""
    cols = {}
    if 1 in student.strategies or 2 in student.strategies:
        tm = method_name(student.teacher, iteration)
        step = _teacher_step(ctx, student, iteration)
        cols[_lp_column(tm, step)] = ("teacher", ckpt_at(ctx, tm, step))
    if 2 in student.strategies:
        um, u = unlearned_ref(ctx, student, iteration)
        cols[_lp_column(um, u)] = ("unlearned", ckpt_at(ctx, um, u))
    if 3 in student.strategies:
        import hashlib

        cols["lp_weak_" + hashlib.sha1(student.weak.encode()).hexdigest()[:8]] = ("weak", student.weak)
    return cols


def compute_signals(ctx, iteration: int = 0) -> None:
    """Precompute every needed log-prob column once (stage 2 never loads a teacher), and for strategy 2 the
    positives' / negatives' log-prob at every checkpoint of both ends' runs (`logprob_curves`)."""
    store = RolloutStore(ctx.run.rollouts)
    for student in ctx.cfg.students.values():
        for col, (_, path) in signal_columns(ctx, student, iteration).items():
            if col not in store.per_token_columns(iteration):
                policy = ctx.new_policy(init=path)
                add_policy_logprobs(ctx, store, iteration, col, policy)
                ctx.release(policy)
    from erpd_megatron.config import checkpoint_ref

    runs = {}  # method -> teacher config name, for every run at either end of a strategy-2 ratio
    for student in ctx.cfg.students.values():
        if 2 in student.strategies:
            runs[method_name(student.teacher, iteration)] = student.teacher
            u = checkpoint_ref(student.unlearned)[0] if student.unlearned else student.teacher
            runs[method_name(u, iteration)] = u
    for method, teacher in runs.items():
        logprob_curve(ctx, method, teacher, iteration)


def logprob_curve(ctx, method: str, teacher: str, iteration: int) -> dict:
    """Paper Fig. 5 / Fig. 9 view of a stage-1 run: the mean token log-prob of the fixed batch's positive and
    negative samples at each saved checkpoint (step 0 = the base), computed on the whole batch (not a training
    mini-batch) and written to iter_<i>/logprobs_<method>.json once. The columns stay in the store."""
    import json

    from erpd_megatron.algorithms.metrics import logprob_by_outcome
    from erpd_megatron.utils.io import atomic_write_json

    record = ctx.run.root / f"iter_{iteration}" / f"logprobs_{method}.json"
    if record.exists():
        return json.loads(record.read_text())
    t = ctx.cfg.teachers[teacher]
    top = final_step(ctx.run.ckpt(method), t.steps)
    store = RolloutStore(ctx.run.rollouts)
    have = store.per_token_columns(iteration)
    # checkpoint.keep_last may have pruned some: the curve covers the steps still on disk (or already computed)
    steps = [st for st in sorted({*range(t.save_every, top + 1, t.save_every), top})
             if _lp_column(method, st) in have or ckpt_at(ctx, method, st).exists()]
    for step in steps:
        if _lp_column(method, step) not in store.per_token_columns(iteration):
            policy = ctx.new_policy(init=ckpt_at(ctx, method, step))
            add_policy_logprobs(ctx, store, iteration, _lp_column(method, step), policy)
            ctx.release(policy)
    batch = load_batch(ctx, store, iteration, [_lp_column(method, s) for s in steps])
    cols = {0: batch["old_logprobs"], **{s: batch[_lp_column(method, s)] for s in steps}}
    curve = {}
    for s, lp in cols.items():
        by = logprob_by_outcome(lp, batch["response_mask"], batch["rewards"])
        curve[str(s)] = {"pos": by["pos_logprob"], "neg": by["neg_logprob"]}
    out = {"method": method, "loss": t.loss, "lr": t.lr, "negative_weight": t.negative_weight, "curve": curve}
    if ctx.is_main:
        atomic_write_json(record, out)
    ctx.barrier()
    return out


def build_signals(ctx, student, batch: dict, iteration: int) -> list[torch.Tensor]:
    """Whitened [B,T] signal per strategy, in the order of `student.strategies`."""
    cols = {kind: col for col, (kind, _) in signal_columns(ctx, student, iteration).items()}
    mask = batch["response_mask"]
    positive = batch["rewards"] > 0.5
    raw = {
        1: lambda: batch[cols["teacher"]] - batch["old_logprobs"],
        2: lambda: batch[cols["teacher"]] - batch[cols["unlearned"]],
        3: lambda: batch["old_logprobs"] - batch[cols["weak"]],
    }
    keep = {"none": "both", "pos": "positive", "neg": "negative"}[student.sign_mask]
    out = []
    for k in student.strategies:
        out.append(S.make_signal(raw[k]() * mask, mask, positive_samples=positive, keep=keep,
                                 clip_whitened=student.signal_clip or None))
    return out


# ----------------------------------------------------------------------------- stage 2


def train_students(ctx, iteration: int = 0, only: str | None = None) -> None:
    store = RolloutStore(ctx.run.rollouts)
    for name, s in ctx.cfg.students.items():
        if only is not None and name != only:
            continue
        method = method_name(name, iteration)
        if finished(ctx.run.ckpt(method), s.steps):
            log.info("%s: finished in an earlier invocation, skipped", method)
            continue
        cols = list(signal_columns(ctx, s, iteration))
        batch = load_batch(ctx, store, iteration, cols)
        warn_if_no_signal(batch, f"fixed batch {iteration}", method)
        sigs = build_signals(ctx, s, batch, iteration)
        mbs = student_mini_batch(ctx.cfg, s)  # 0 in the config = one epoch over the fixed batch
        next_batch = None
        if s.ensemble == "sum" or len(sigs) == 1:
            batch["signal"] = S.ensemble(sigs, batch["response_mask"]) if len(sigs) > 1 else sigs[0]
        else:  # sequential: steps split evenly between the signals, in the configured order
            per = [s.steps // len(sigs)] * len(sigs)
            per[-1] += s.steps - sum(per)
            n = batch["input_ids"].shape[0]

            def next_batch(step, policy, batch=batch, sigs=sigs, per=per, n=n, mbs=mbs):
                b = slice_batch(batch, minibatch_indices(n, mbs, step, ctx.cfg.seed))
                b["signal"] = slice_batch({"x": sigs[S.sequential_index(step, per)]},
                                          minibatch_indices(n, mbs, step, ctx.cfg.seed))["x"]
                return b

        policy = train_loop(ctx, method, batch=None if next_batch else batch, next_batch=next_batch,
                            loss_fn=objectives.distill_objective(s), steps=s.steps, mini_batch_size=mbs,
                            lr=s.lr, save_every=_save_every(ctx, s.steps), init=ctx.base_ckpt(iteration),
                            eval_fn=_eval_fn(ctx, method, iteration, True))
        ctx.release(policy)


def promote_student(ctx, iteration: int) -> dict:
    """Choose the next iteration's base: `iterate.promote` (default: the first student; a teacher "<name>[@<step>]"
    promotes the teacher itself, without distillation, the paper's Table 2 (a) / (b) control), or
    `iterate.fallback` when that student's teacher gained less than `iterate.min_teacher_gain` over the base; then
    optionally `iterate.online_steps` on-policy steps from it (online / offline switching). Returns the bookkeeping."""
    it = ctx.cfg.iterate
    name = it.promote or next(iter(ctx.cfg.students))
    reason = "configured"
    if name in ctx.cfg.students and it.fallback and it.min_teacher_gain > 0:
        base = ctx.run.eval_results(method_name("base", iteration))[0]["avg_at_k"]
        teacher = ctx.run.eval_results(method_name(ctx.cfg.students[name].teacher, iteration))
        gain = max(r["avg_at_k"] for r in teacher.values()) - base
        if gain < it.min_teacher_gain:
            name, reason = it.fallback, f"teacher gain {gain:+.3f} < {it.min_teacher_gain}: fallback"
    if name in ctx.cfg.students:
        method = method_name(name, iteration)
        path = ckpt_at(ctx, method, final_step(ctx.run.ckpt(method), ctx.cfg.students[name].steps))
        return _promote(ctx, iteration, {"student": method, "reason": reason, "checkpoint": str(path)})
    from erpd_megatron.config import checkpoint_ref

    run, step = checkpoint_ref(name)  # the teacher itself (validated: a configured teacher, a saved step)
    method = method_name(run, iteration)
    step = step if step > 0 else final_step(ctx.run.ckpt(method), ctx.cfg.teachers[run].steps)
    return _promote(ctx, iteration, {"teacher": method, "step": step, "reason": reason + " (teacher itself)",
                                     "checkpoint": str(ckpt_at(ctx, method, step))})


def _promote(ctx, iteration: int, info: dict) -> dict:
    """Record the next base (`info["checkpoint"]`), after the optional online phase from it."""
    from erpd_megatron.utils.io import atomic_write_json

    it = ctx.cfg.iterate
    path = Path(info["checkpoint"])
    if it.online_steps:
        online = method_name(f"online_{iteration}", iteration)
        train_onpolicy(ctx, iteration, init=path, steps=it.online_steps, method=online)
        path = ckpt_at(ctx, online, it.online_steps)
        info.update(online=online, checkpoint=str(path))
    if ctx.is_main:
        atomic_write_json(ctx.run.root / f"iter_{iteration}" / "promoted.json", info)
    ctx.barrier()
    return info


def _save_every(ctx, steps: int) -> int:
    """Students and the on-policy baseline checkpoint at eval points (every `eval.every`, at least once)."""
    return min(ctx.cfg.eval.every or steps, steps) or 1


# ----------------------------------------------------------------------------- on-policy baseline


def onpolicy_steps(ctx) -> int:
    o = ctx.cfg.onpolicy
    return o.steps or -(-ctx.cfg.data.prompts_per_batch // o.prompts_per_step)


def train_onpolicy(ctx, iteration: int = 0, init=None, steps: int | None = None, method: str | None = None) -> None:
    """Fully on-policy: sample with the current weights, one update, repeat (same rollout budget as ERPD)."""
    o = ctx.cfg.onpolicy
    method = method or method_name(f"onpolicy_{o.loss}", iteration)
    store = RolloutStore(ctx.run.root / "rollouts_onpolicy" / method)

    def next_batch(step, policy):
        if step not in store.batches():
            ctx.push_weights(policy, version=step)
            if ctx.is_main:
                # the baseline sees the same prompts as the fixed batch, in prompts_per_step slices
                prompts = batch_prompts(ctx, iteration, ctx.cfg.data.prompts_per_batch)
                k = step * o.prompts_per_step % len(prompts)
                chunk = (prompts + prompts)[k : k + o.prompts_per_step]
                sample_batch(ctx, store, step, chunk, version=step, seed=ctx.cfg.seed + 1000 * (iteration + 1) + step)
            ctx.barrier()
        if "old_logprobs" not in store.per_token_columns(step):
            add_policy_logprobs(ctx, store, step, "old_logprobs", policy)
        b = load_batch(ctx, store, step)
        warn_if_no_signal(b, f"on-policy batch {step}", method, "grpo")  # its advantages are GRPO's for every loss
        b["advantages"] = grpo_advantages(b["rewards"], b["group_ids"])
        return b

    steps = steps or onpolicy_steps(ctx)
    from erpd_megatron.config import TeacherConfig

    t = TeacherConfig(loss=o.loss)  # agg "auto": sapo seq-mean-token-mean, grpo / ppo / cispo token-mean
    loss_fn = objectives.onpolicy_objective(o, t, ctx.cfg.rollout.max_new_tokens)
    policy = train_loop(ctx, method, batch=None, next_batch=next_batch, loss_fn=loss_fn,
                        steps=steps, mini_batch_size=o.prompts_per_step * ctx.cfg.rollout.n_samples, lr=o.lr,
                        save_every=1, eval_every=max(1, steps // 4), init=init or ctx.base_ckpt(iteration),
                        eval_fn=_eval_fn(ctx, method, iteration, True))
    ctx.release(policy)
