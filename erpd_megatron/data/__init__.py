"""Data: prompt datasets (`prompts`) and the on-disk rollout store (`rollout_store`)."""

from erpd_megatron.data.prompts import (
    DEFAULT_INSTRUCTION,
    Prompt,
    PromptDataError,
    PromptDataset,
    encode_prompts,
    load_prompts,
    render_prompt,
)
from erpd_megatron.data.rollout_store import (
    RolloutRecord,
    RolloutStore,
    RolloutStoreError,
    pack_rollouts,
    pad_rollouts,
)

__all__ = [
    "DEFAULT_INSTRUCTION",
    "Prompt",
    "PromptDataError",
    "PromptDataset",
    "RolloutRecord",
    "RolloutStore",
    "RolloutStoreError",
    "encode_prompts",
    "load_prompts",
    "pack_rollouts",
    "pad_rollouts",
    "render_prompt",
]
