"""Rewards. `math`: math-verify answer checking (loose / strict-boxed) over a spawn process pool."""

from erpd_megatron.rewards.math import BatchStats, MathReward, last_boxed, make_reward, score

__all__ = ["BatchStats", "MathReward", "last_boxed", "make_reward", "score"]
