"""ERPD algorithm core (pure torch, no Megatron): losses, advantages, token signals, metrics.

See docs/algorithms.md for every formula, its source and what differs from the paper.
"""

from .advantages import decoupled_gae, gae, grpo_advantages, length_adaptive_lambda, outcome_token_rewards
from .losses import (
    AGG_MODES,
    LOSSES,
    SEQUENCE_REWARD_LOSSES,
    aggregate,
    ce_loss,
    cispo_loss,
    distill_loss,
    entropy_from_logits,
    get_loss,
    grpo_loss,
    kl_penalty,
    mse_loss,
    ppo_value_loss,
    sapo_loss,
    sequence_score,
)
from .metrics import (
    clip_fractions,
    entropy_mean,
    explained_variance,
    logprob_by_outcome,
    response_length_mean,
    reverse_kl,
)
from .signals import (
    STRATEGIES,
    clip_signal,
    ensemble,
    evolving_signal,
    log_ratio_signal,
    make_signal,
    sequential_index,
    sign_mask,
    strategy_signal,
    whiten,
)

__all__ = [
    "AGG_MODES", "LOSSES", "SEQUENCE_REWARD_LOSSES", "STRATEGIES",
    "aggregate", "ce_loss", "cispo_loss", "distill_loss", "entropy_from_logits", "get_loss", "grpo_loss",
    "kl_penalty", "mse_loss", "ppo_value_loss", "sapo_loss", "sequence_score",
    "decoupled_gae", "gae", "grpo_advantages", "length_adaptive_lambda", "outcome_token_rewards",
    "clip_fractions", "entropy_mean", "explained_variance", "logprob_by_outcome", "response_length_mean", "reverse_kl",
    "clip_signal", "ensemble", "evolving_signal", "log_ratio_signal", "make_signal", "sequential_index",
    "sign_mask", "strategy_signal", "whiten",
]
