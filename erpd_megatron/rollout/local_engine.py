"""``LocalEngine``: an in-process rollout engine over a transformers causal LM (the CPU default).

What it does, compared with ``model.generate``:
- a KV-cached loop with left-padded batches (explicit ``position_ids``), so prompts of any lengths
  share a batch;
- per-sample ``torch.Generator`` seeded with ``derive_seed(seed, prompt, sample)``: a sample does not
  depend on batch size or on the other prompts of the call, and a fixed seed reproduces it exactly;
- one uniform draw per token and inverse-CDF sampling over the (top-k / top-p filtered) tempered
  distribution; the recorded behaviour log-prob is of the *unfiltered* tempered distribution
  (see ``engine.py`` for why);
- stop rules as SGLang applies them: length first (``max_new_tokens``), then stop token ids
  (EOS + ``stop_token_ids``), then stop strings on the decoded response
  (``skip_special_tokens=True``); the token that ends the response is kept in it.

``update_weights`` copies HF-named tensors into the module (strict: an unknown name or a wrong shape
raises; by default, after the stream ends, a parameter that received nothing raises too).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from erpd_megatron.rollout.engine import (
    RolloutEngine,
    Sample,
    SamplingParams,
    WeightBucket,
    check_score_args,
    derive_seed,
    expand_requests,
)


class WeightUpdateError(ValueError):
    """A streamed tensor does not fit the engine's model (unknown name, wrong shape, missing names)."""


class LocalEngine(RolloutEngine):
    def __init__(self, model, tokenizer=None, *, eos_token_ids: Sequence[int] | None = None,
                 device: str | torch.device | None = None, max_batch_size: int = 256,
                 strict_complete: bool = True):
        """``model``: a transformers causal LM (``model(input_ids, attention_mask, position_ids,
        past_key_values, use_cache)`` -> ``.logits``). ``tokenizer``: needed only for stop strings.
        ``eos_token_ids``: default from the tokenizer and the model's generation config.
        ``strict_complete``: ``update_weights`` raises if some parameter got no tensor."""
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        if self.device.type == "cpu":  # CPU: oneDNN GEMMs, freed memory kept (utils/cpu_gemm.py, cpu_malloc.py)
            from erpd_megatron.utils.cpu_gemm import use_onednn_linears
            from erpd_megatron.utils.cpu_malloc import keep_freed_memory

            keep_freed_memory()
            use_onednn_linears(self.model)
        self.tokenizer = tokenizer
        self.max_batch_size = int(max_batch_size)
        self.strict_complete = strict_complete
        self.weight_version = None
        self._released_from: torch.device | None = None
        if eos_token_ids is None:
            eos_token_ids = _default_eos_ids(model, tokenizer)
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        self.pad_token_id = int(pad) if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = torch.float32, **kw) -> LocalEngine:
        """Load model (and tokenizer, when the directory has one) from an HF directory."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        tokenizer = kw.pop("tokenizer", None)
        if tokenizer is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(path))
            except (OSError, ValueError):
                tokenizer = None
        return cls(model, tokenizer, **kw)

    @classmethod
    def from_config(cls, config, tokenizer=None, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                    **kw) -> LocalEngine:
        """Randomly initialised model from an HF config (``PretrainedConfig`` or dict with ``model_type``);
        weights are expected to arrive through ``update_weights``."""
        from transformers import AutoConfig, AutoModelForCausalLM

        if isinstance(config, dict):
            config = dict(config)
            config = AutoConfig.for_model(config.pop("model_type"), **config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return cls(model, tokenizer, **kw)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingParams) -> list[Sample]:
        for i, p in enumerate(prompt_ids):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
        if sampling.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: build LocalEngine(model, tokenizer)")
        from erpd_megatron.utils.console import progress

        requests = expand_requests(len(prompt_ids), sampling)
        out: list[Sample] = []
        with progress(total=len(requests), desc="sampling", unit="sample") as bar:  # advances as rows finish
            for start in range(0, len(requests), self.max_batch_size):
                out.extend(self._generate_chunk(prompt_ids, requests[start:start + self.max_batch_size], sampling,
                                                bar))
        return out

    def _generate_chunk(self, prompt_ids, requests, sampling: SamplingParams, bar=None) -> list[Sample]:
        dev = self.device
        b = len(requests)
        prompts = [list(prompt_ids[i]) for i, _ in requests]
        lens = torch.tensor([len(p) for p in prompts])
        width = int(lens.max())
        # Left padding: every row's last prompt token sits in the last column.
        ids = torch.full((b, width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[r, width - len(p):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        gens = [_row_generator(sampling.seed, i, j) for i, j in requests]

        stop_ids = set(self.eos_token_ids) | set(sampling.stop_token_ids)
        responses: list[list[int]] = [[] for _ in range(b)]
        logprobs: list[list[float]] = [[] for _ in range(b)]
        finish: list[str | None] = [None] * b
        matched: list[object] = [None] * b

        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        cache = out.past_key_values
        next_pos = pos[:, -1] + 1
        bar_done = 0
        for _ in range(sampling.max_new_tokens):
            logits = out.logits[:, -1, :].float()
            tokens, lps = _sample_step(logits, sampling, gens)
            tok_list = tokens.tolist()
            for r in range(b):
                if finish[r] is not None:
                    continue
                t = tok_list[r]
                responses[r].append(t)
                logprobs[r].append(float(lps[r]))
                if len(responses[r]) >= sampling.max_new_tokens:
                    finish[r] = "length"
                elif t in stop_ids:
                    finish[r], matched[r] = "stop", t
                elif sampling.stop:
                    text = self.tokenizer.decode(responses[r], skip_special_tokens=True)
                    hit = next((s for s in sampling.stop if s in text), None)
                    if hit is not None:
                        finish[r], matched[r] = "stop", hit
            n_done = sum(f is not None for f in finish)
            if bar is not None:
                bar.update(n_done - bar_done)
                bar_done = n_done
            if n_done == b:
                break
            mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=dev)], dim=1)
            out = self.model(input_ids=tokens[:, None].to(dev), attention_mask=mask,
                             position_ids=next_pos[:, None], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            next_pos = next_pos + 1

        return [
            Sample(prompt_index=i, sample_index=j, response_ids=responses[r], logprobs=logprobs[r],
                   finish_reason=finish[r] or "length", weight_version=self.weight_version,
                   info={"matched_stop": matched[r]} if matched[r] is not None else {})
            for r, (i, j) in enumerate(requests)
        ]

    @torch.no_grad()
    def compute_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         temperature: float = 1.0) -> torch.Tensor:
        """Per-token log-probs of right-padded sequences, in the trainer's layout:
        ``out[b, t] = log softmax(logits[b, t-1] / T)[input_ids[b, t]]``, ``out[:, 0] = 0``."""
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        if temperature > 0:
            logits = logits / temperature
        lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        out = torch.zeros(input_ids.shape, dtype=torch.float32, device=self.device)
        out[:, 1:] = lp
        return out * attention_mask

    @torch.no_grad()
    def score_logprobs(self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int],
                       temperature: float = 1.0) -> list[list[float]]:
        """See ``RolloutEngine.score_logprobs``: one right-padded forward (``compute_logprobs``)."""
        check_score_args(sequences, prompt_lens)
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(sequences):
            ids[r, :len(s)] = torch.tensor([int(t) for t in s], dtype=torch.long)
            mask[r, :len(s)] = 1
        lp = self.compute_logprobs(ids, mask, temperature).cpu()
        return [lp[r, int(p):len(s)].tolist() for r, (s, p) in enumerate(zip(sequences, prompt_lens))]

    @property
    def dtype(self) -> torch.dtype:
        """The model's parameter dtype (the weight check's tolerance depends on it)."""
        return next(self.model.parameters()).dtype

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def update_weights(self, buckets: Iterable[WeightBucket], version: int | str | None = None) -> None:
        targets = self.model.state_dict(keep_vars=True)  # includes tied aliases (e.g. lm_head.weight)
        got: set[int] = set()
        for bucket in buckets:
            for name, tensor in bucket:
                param = targets.get(name)
                if param is None:
                    raise WeightUpdateError(f"update_weights: unknown tensor name {name!r} for "
                                            f"{type(self.model).__name__}")
                if tuple(param.shape) != tuple(tensor.shape):
                    raise WeightUpdateError(f"update_weights: {name!r} has shape {tuple(tensor.shape)}, "
                                            f"model expects {tuple(param.shape)}")
                param.data.copy_(tensor.to(device=param.device, dtype=param.dtype))
                got.add(id(param))
        if self.strict_complete:
            missing = [n for n, p in self.model.named_parameters() if id(p) not in got]
            if missing:
                raise WeightUpdateError(f"update_weights: {len(missing)} parameters received nothing, "
                                        f"e.g. {missing[:5]}")
        self.weight_version = version

    # ------------------------------------------------------------------ lifecycle
    def release_memory(self) -> None:
        """On an accelerator, park the weights in host memory; on CPU there is nothing to free."""
        if self.device.type != "cpu" and self._released_from is None:
            self._released_from = self.device
            self.model.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def resume_memory(self) -> None:
        if self._released_from is not None:
            self.model.to(self._released_from)
            self._released_from = None

    def health(self) -> bool:
        return self.model is not None and self._released_from is None

    def shutdown(self) -> None:
        pass


# ---------------------------------------------------------------------- helpers
def _default_eos_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    for src in (getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None,
                getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if src is None:
            continue
        for t in (src if isinstance(src, (list, tuple)) else [src]):
            if int(t) not in ids:
                ids.append(int(t))
    return ids


def _row_generator(seed: int | None, prompt_index: int, sample_index: int) -> torch.Generator:
    g = torch.Generator()
    s = derive_seed(seed, prompt_index, sample_index)
    if s is None:
        g.seed()
    else:
        g.manual_seed(s)
    return g


def _sample_step(logits: torch.Tensor, sampling: SamplingParams, gens: list[torch.Generator]):
    """One token per row. Returns (tokens [B] on CPU, behaviour log-probs [B] on CPU)."""
    if sampling.greedy:
        lp_all = torch.log_softmax(logits, dim=-1)
        tokens = logits.argmax(-1)
        return tokens.cpu(), lp_all.gather(-1, tokens[:, None]).squeeze(-1).cpu()
    scaled = logits / sampling.temperature
    lp_all = torch.log_softmax(scaled, dim=-1)
    probs = lp_all.exp()
    if 0 < sampling.top_k < probs.shape[-1]:
        kth = probs.topk(sampling.top_k, dim=-1).values[:, -1:]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if sampling.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly above each token
        keep_sorted = before < sampling.top_p * sorted_p.sum(-1, keepdim=True)
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = torch.where(keep, probs, torch.zeros_like(probs))
    cdf = probs.cpu().double().cumsum(-1)
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in gens])
    tokens = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
    tokens = tokens.clamp_(max=cdf.shape[-1] - 1)
    return tokens, lp_all.cpu().gather(-1, tokens[:, None]).squeeze(-1)
