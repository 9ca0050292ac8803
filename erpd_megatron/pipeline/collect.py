"""Stage 0: sample one fixed rollout batch, score it, store it, recompute the base log-probs in Megatron.

`sample_batch` is shared with the on-policy baseline (which calls it once per step with fresh prompts).
The batch is written atomically; if it is already in the store, it is reused (resume). The Megatron
log-probs of the base policy (`old_logprobs`) are added as a per-token column: the trainer's ratios use
them rather than the engine's behaviour log-probs, so r = 1 exactly at step 0 whatever the numerical
difference between the two stacks (the engine's values stay stored for diagnostics).
"""

from __future__ import annotations

import logging

from erpd_megatron.data.rollout_store import RolloutRecord, RolloutStore
from erpd_megatron.utils.timing import stage

log = logging.getLogger("erpd.collect")


def batch_prompts(ctx, index: int, n: int) -> list:
    """Prompts of batch `index`: consecutive slices of the training set (wrapping around)."""
    data = ctx.train_prompts
    start = (index * n) % len(data)
    return [data[(start + i) % len(data)] for i in range(n)]


def sample_batch(ctx, store: RolloutStore, batch: int, prompts: list, version, seed: int) -> None:
    """Generate n samples per prompt with the engine's current weights, score, write batch `batch`."""
    from erpd_megatron.rollout.engine import SamplingParams

    r = ctx.cfg.rollout
    prompt_ids = ctx.encode(prompts)
    sp = SamplingParams(n=r.n_samples, temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens,
                        seed=seed)
    with stage("collect"):  # also on-policy training's per-step sampling
        samples = ctx.engine.generate(prompt_ids, sp)
        texts = [ctx.tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples]
        rewards = ctx.reward.score_batch(texts, [prompts[s.prompt_index] for s in samples])
    params = {"n": r.n_samples, "temperature": r.temperature, "top_p": r.top_p, "max_new_tokens": r.max_new_tokens,
              "seed": seed}
    records = [
        RolloutRecord(prompt_ids=prompt_ids[s.prompt_index], response_ids=s.response_ids,
                      behaviour_logprobs=s.logprobs, reward=float(rw), group_id=s.prompt_index,
                      prompt_id=str(prompts[s.prompt_index].id), finish_reason=s.finish_reason,
                      sampling_params=params, policy_version=version if isinstance(version, int) else 0)
        for s, rw in zip(samples, rewards)
    ]
    store.write_batch(batch, records)
    acc = sum(rewards) / max(len(rewards), 1)
    log.info("batch %d: %d samples, mean reward %.3f", batch, len(records), acc)
    failures = {k: v for k, v in ctx.reward.last_stats.reasons.items() if k not in ("passed", "wrong_answer")}
    if failures:  # counted like the math judge's timeouts: timeouts, sandbox kills, no code block, ...
        log.info("batch %d: reward failures by reason %s", batch, dict(sorted(failures.items())))


def add_policy_logprobs(ctx, store: RolloutStore, batch: int, column: str, policy) -> None:
    """Per-token log-probs of `policy` over the stored tokens, added as column `column` (all ranks compute)."""
    tensors = store.load_tensors(batch, pad_id=ctx.tokenizer.pad_token_id or 0)
    lp = policy.forward_logprobs({k: tensors[k] for k in ("input_ids", "attention_mask", "response_mask")})
    if ctx.is_main:
        store.add_columns(batch, {column: lp})  # the store takes [B,T] in its own load_tensors layout
    ctx.barrier()


def collect(ctx, iteration: int = 0) -> int:
    """Fixed batch `iteration` with the base policy of that iteration; returns the batch id."""
    store = RolloutStore(ctx.run.rollouts)
    if iteration in store.batches() and "old_logprobs" in store.per_token_columns(iteration):
        return iteration
    policy = ctx.new_policy(init=ctx.base_ckpt(iteration))
    if iteration not in store.batches():
        ctx.push_weights(policy, version=iteration)  # iteration i samples with its own base (i > 0: a student)
        if ctx.is_main:
            prompts = batch_prompts(ctx, iteration, ctx.cfg.data.prompts_per_batch)
            sample_batch(ctx, store, iteration, prompts, version=iteration, seed=ctx.cfg.seed + iteration)
        ctx.barrier()
    add_policy_logprobs(ctx, store, iteration, "old_logprobs", policy)
    ctx.release(policy)  # the rollout engine holds copies of its weights, the store its log-probs
    return iteration
