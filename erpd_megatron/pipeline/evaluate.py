"""Evaluation inside a run: push the policy's weights to the rollout engine, AVG@K on the held-out set,
and the reported reverse KL to the base policy on the policy's own samples (paper Sec. 4.1):

    KL = E_{y ~ pi}[ sum_t log pi(y_t|.) - log pi_base(y_t|.) ]     (both at the eval temperature)

Every evaluation of a run uses the same sampling seed (common random numbers): differences between
methods are then less noisy than independent draws would make them.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("erpd.eval")


def evaluate_policy(ctx, method: str, step: int, policy=None) -> dict | None:
    """Evaluate the rollout engine's weights (after pushing `policy`'s, if given); writes eval/<method>/step."""
    if policy is not None:
        ctx.push_weights(policy, version=f"{method}@{step}")
    result = None
    if ctx.is_main:
        from erpd_megatron.utils.timing import stage

        with stage("eval"):  # generation, rewards, the reference KL (the push above is "weight_sync")
            result = _evaluate_engine(ctx)
        result.update(method=method, step=step)
        ctx.run.write_eval(method, step, result)
        from erpd_megatron.utils.console import kl_note

        log.info("eval %s@%d: AVG@%d %.1f%%  pass@%d %.1f%%  KL/seq %.4f  len %.1f%s", method, step, result["k"],
                 100 * result["avg_at_k"], result["k"], 100 * result["pass_at_k"], result["kl"],
                 result["mean_length"], kl_note(result["kl"]))
    ctx.barrier()
    return result


def _evaluate_engine(ctx) -> dict:
    from erpd_megatron.rollout.engine import SamplingParams
    from erpd_megatron.rollout.eval import pass_at_k

    e = ctx.cfg.eval
    prompts = ctx.eval_prompts
    prompt_ids = ctx.encode(prompts)
    sp = SamplingParams(n=e.k, temperature=e.temperature, top_p=e.top_p,
                        max_new_tokens=ctx.cfg.rollout.max_new_tokens, seed=ctx.cfg.seed + 10_007)
    samples = ctx.engine.generate(prompt_ids, sp)
    texts = [ctx.tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples]
    rewards = ctx.reward.score_batch(texts, [prompts[s.prompt_index] for s in samples])
    reward_stats = ctx.reward.last_stats.as_dict()
    kl = _reverse_kl(ctx, prompt_ids, samples, e.temperature)
    per_problem: dict[int, list[float]] = {}
    for s, r in zip(samples, rewards):
        per_problem.setdefault(s.prompt_index, []).append(float(r))
    n = len(prompts)
    return {
        "k": e.k,
        "problems": n,
        "avg_at_k": sum(rewards) / max(len(rewards), 1),
        "pass_at_k": sum(pass_at_k(len(v), int(sum(v)), e.k) for v in per_problem.values()) / max(n, 1),
        "kl": kl,
        "mean_length": sum(len(s.response_ids) for s in samples) / max(len(samples), 1),
        "per_problem": {str(prompts[i].id): v for i, v in sorted(per_problem.items())},
        "reward_stats": reward_stats,  # items per reward kind, every sample's reason counted
    }


def _reverse_kl(ctx, prompt_ids, samples, temperature: float, batch: int = 256) -> float:
    """Mean over samples of sum_t (log pi - log pi_base) on the sampled response tokens."""
    total, count = 0.0, 0
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        seqs = [prompt_ids[s.prompt_index] + s.response_ids for s in chunk]
        width = max(len(x) for x in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for j, x in enumerate(seqs):
            ids[j, : len(x)] = torch.tensor(x)
            attn[j, : len(x)] = 1
        ref = ctx.ref_engine.compute_logprobs(ids, attn, temperature=temperature)
        for j, s in enumerate(chunk):
            p = len(prompt_ids[s.prompt_index])
            ref_sum = float(ref[j, p : p + len(s.response_ids)].sum())
            total += float(sum(s.logprobs)) - ref_sum
            count += 1
    return total / max(count, 1)
