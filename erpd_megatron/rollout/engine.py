"""The rollout-engine interface: what the trainer asks of any inference engine.

An engine only generates. It receives the trainer's weights as a stream of buckets, each a
``list[(hf_name, full_tensor)]`` with names exactly as in the Hugging Face checkpoint
(see ``erpd_megatron/rollout/weight_sync.py``), and tags every sample with the weight version that
produced it. Two implementations: ``LocalEngine`` (transformers, in-process, CPU default) and
``SGLangEngine`` (HTTP client of one or more ``sglang.launch_server`` processes).

Behaviour log-probs -- the choice, and why
-----------------------------------------
``Sample.logprobs[k]`` is ``log softmax(logits / T)[token_k]``: the *tempered, unfiltered*
distribution. That is what the trainer recomputes (``PolicyEngine.forward_logprobs`` at the same
temperature), so importance ratios ``exp(lp - lp_old)`` start at exactly 1 on unchanged weights.
With ``top_p < 1`` or ``top_k > 0`` the token is *drawn* from the renormalised truncated
distribution, but its recorded log-prob is still the unfiltered one; the difference (the log of the
kept probability mass) is not recorded. SGLang 0.5.x returns the same quantity by default
(``log(softmax(logits / T))`` in ``srt/layers/sampler.py`` unless ``SGLANG_RETURN_ORIGINAL_LOGPROB``
is set), so both engines agree. Greedy decoding (``temperature == 0``) records ``log softmax(logits)``
(T = 1), as SGLang does.

Seeds: sample ``j`` of prompt ``i`` uses ``derive_seed(seed, i, j)``, so every sample is reproducible
on its own (independent of batching, of how requests are spread over servers, and of retries).
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

FinishReason = Literal["stop", "length"]
WeightBucket = list[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. Validated on construction (bad values raise ``ValueError`` naming the field)."""

    n: int = 1
    """Samples per prompt."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1 disables it."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 (or 0) disables it."""
    max_new_tokens: int = 256
    """Hard cap on response length; hitting it gives ``finish_reason == "length"``."""
    stop: tuple[str, ...] = ()
    """Stop strings: generation ends after the token that completes one (that token is kept)."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra stop tokens (the tokenizer's EOS always stops); the stop token is kept in the response."""
    seed: int | None = None
    """Base seed; ``None`` = nondeterministic."""

    def __post_init__(self):
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"SamplingParams.n must be an int >= 1, got {self.n!r}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k must be an int >= -1, got {self.top_k!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        # Accept lists for convenience, store tuples so the dataclass stays hashable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if any(not s for s in self.stop):
            raise ValueError("SamplingParams.stop must not contain empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def derive_seed(seed: int | None, prompt_index: int, sample_index: int) -> int | None:
    """Per-sample seed (63-bit), a hash of (seed, prompt index, sample index); ``None`` stays ``None``."""
    if seed is None:
        return None
    h = hashlib.blake2b(f"{seed}/{prompt_index}/{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


@dataclass
class Sample:
    """One generated response."""

    prompt_index: int
    """Index of its prompt in the ``prompt_ids`` list given to ``generate``."""
    response_ids: list[int]
    logprobs: list[float]
    """Behaviour log-prob of each response token (see module docstring), same length as response_ids."""
    finish_reason: FinishReason
    weight_version: int | str | None
    """Version given to the last ``update_weights`` before this sample was generated (None = initial)."""
    sample_index: int = 0
    """Which of the ``n`` samples of its prompt (0..n-1)."""
    info: dict = field(default_factory=dict)
    """Engine-specific extras (e.g. the matched stop, the server that produced it); never needed."""

    def __post_init__(self):
        if len(self.response_ids) != len(self.logprobs):
            raise ValueError(
                f"Sample(prompt {self.prompt_index}, #{self.sample_index}): {len(self.response_ids)} tokens "
                f"but {len(self.logprobs)} logprobs"
            )


class RolloutEngine(abc.ABC):
    """What the trainer calls. Implementations: ``LocalEngine``, ``SGLangEngine``."""

    weight_version: int | str | None = None

    @abc.abstractmethod
    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingParams) -> list[Sample]:
        """``sampling.n`` samples per prompt, ordered by (prompt_index, sample_index)."""

    @abc.abstractmethod
    def update_weights(self, buckets: Iterable[WeightBucket], version: int | str | None = None) -> None:
        """Load HF-named full tensors, one bucket at a time; afterwards samples carry ``version``."""

    @abc.abstractmethod
    def score_logprobs(self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int],
                       temperature: float = 1.0) -> list[list[float]]:
        """Teacher-forced log-probs of the current weights: for each sequence, ``log softmax(logits / T)`` of its
        tokens at positions ``prompt_lens[k]`` .. ``len - 1`` given the tokens before them (the weights-arrived
        guard, ``rollout/weight_check.py``, compares them with the trainer's). ``prompt_lens[k] >= 1``."""

    def release_memory(self) -> None:  # noqa: B027 - optional for engines without accelerator memory
        """Free accelerator memory (weights + KV cache) so a colocated trainer can use it."""

    def resume_memory(self) -> None:  # noqa: B027
        """Re-occupy the memory released by ``release_memory`` (weights must then be re-sent)."""

    @abc.abstractmethod
    def health(self) -> bool:
        """True when the engine can serve ``generate`` now."""

    def shutdown(self) -> None:  # noqa: B027
        """Stop any process the engine started; the engine is unusable afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


def expand_requests(num_prompts: int, sampling: SamplingParams) -> list[tuple[int, int]]:
    """The (prompt_index, sample_index) pairs of one ``generate`` call, in output order."""
    return [(i, j) for i in range(num_prompts) for j in range(sampling.n)]


def check_score_args(sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]) -> None:
    """``score_logprobs``' arguments: one prompt length per sequence, each in [1, len(sequence)]."""
    if len(sequences) != len(prompt_lens):
        raise ValueError(f"score_logprobs: {len(sequences)} sequences but {len(prompt_lens)} prompt lengths")
    for k, (s, p) in enumerate(zip(sequences, prompt_lens)):
        if not 1 <= int(p) <= len(s):
            raise ValueError(f"score_logprobs: sequence {k} has {len(s)} tokens, prompt_len {p} is not in [1, {len(s)}]")
