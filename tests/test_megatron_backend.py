"""Megatron backend, single-process parts: log-prob math, configs, layout checks, compat layer.

References are independent: float64 log_softmax / entropy written directly, transformers'
config classes, and a subprocess that pretends CUDA is available.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from erpd_megatron.megatron.logprobs import token_logprobs, vocab_parallel_logprobs
from erpd_megatron.megatron.model import ModelConfig
from erpd_megatron.megatron.parallel import LayoutError, ParallelConfig, validate_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ref_stats(logits, targets, vocab_size, temperature):
    """float64 log-prob / entropy over the first vocab_size columns (padding columns excluded)."""
    z = logits[..., :vocab_size].double() / temperature
    logp = torch.log_softmax(z, -1)
    lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent


@pytest.mark.parametrize("temperature,chunk", [(1.0, 1 << 20), (0.7, 13 * 7)])
def test_vocab_logprobs_match_float64_and_gradients(temperature, chunk):
    torch.manual_seed(0)
    V, Vp = 45, 48  # 3 padding columns that must not take probability mass
    logits = (torch.randn(3, 7, Vp) * 3).requires_grad_()
    targets = torch.randint(0, V, (3, 7))
    lp, ent = vocab_parallel_logprobs(logits, targets, vocab_size=V, temperature=temperature, with_entropy=True,
                                      chunk_elems=chunk)
    ref_lp, ref_ent = _ref_stats(logits, targets, V, temperature)
    assert torch.allclose(lp.double(), ref_lp, atol=1e-5)
    assert torch.allclose(ent.double(), ref_ent, atol=1e-5)
    w1, w2 = torch.randn(3, 7), torch.randn(3, 7)
    g, = torch.autograd.grad((lp * w1).sum() + (ent * w2).sum(), logits)
    ref_logits = logits.detach().double().requires_grad_()
    r_lp, r_ent = _ref_stats(ref_logits, targets, V, temperature)
    g_ref, = torch.autograd.grad((r_lp * w1.double()).sum() + (r_ent * w2.double()).sum(), ref_logits)
    assert torch.allclose(g.double(), g_ref, atol=1e-5)
    assert g[..., V:].abs().max() == 0  # padding columns get no gradient


def test_token_logprobs_alignment():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 16)
    ids = torch.randint(0, 16, (2, 5))
    lp, ent = token_logprobs(logits, ids, vocab_size=16, with_entropy=True)
    assert torch.all(lp[:, 0] == 0) and torch.all(ent[:, 0] == 0)
    for t in range(1, 5):  # log p(ids[t] | ids[:t]) comes from the logits at t-1
        want = torch.log_softmax(logits[:, t - 1].double(), -1).gather(-1, ids[:, t:t + 1]).squeeze(-1)
        assert torch.allclose(lp[:, t].double(), want, atol=1e-6)


# ---------------------------------------------------------------------------- configs


def test_model_config_from_hf_qwen3_llama_qwen35():
    from transformers import LlamaConfig, Qwen3Config
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5Config, Qwen3_5TextConfig

    q = Qwen3Config(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=24, tie_word_embeddings=True, rope_theta=5e5).to_dict()
    c = ModelConfig.from_hf(q)
    assert (c.family, c.head_dim, c.num_kv_heads, c.qk_norm, c.tie_embeddings, c.rope_theta) == \
        ("qwen3", 24, 2, True, True, 5e5)
    assert ModelConfig.from_hf(json.loads(json.dumps(c.to_hf()))) == c  # round trip through JSON
    back = Qwen3Config(**c.to_hf())
    assert (back.head_dim, back.num_key_value_heads, back.intermediate_size) == (24, 2, 96)

    ll = ModelConfig.from_hf(LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=8, num_key_value_heads=4).to_dict())
    assert (ll.family, ll.qk_norm, ll.head_dim, ll.rope_theta) == ("llama", False, 8, 10000.0)

    t = Qwen3_5TextConfig(num_hidden_layers=8, hidden_size=128, vocab_size=512).to_dict()
    h = ModelConfig.from_hf(t)
    assert h.family == "qwen3_5" and h.hybrid.layer_types[3] == "full_attention"
    assert h.hybrid.partial_rotary_factor == 0.25 and h.head_dim == 256
    assert ModelConfig.from_hf(h.to_hf()) == h
    top = Qwen3_5Config(text_config=dict(num_hidden_layers=4, hidden_size=128, vocab_size=512)).to_dict()
    assert ModelConfig.from_hf(top).num_layers == 4  # multimodal wrapper: text_config is used


def test_model_config_rejects_unsupported():
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_hf({"model_type": "gpt2"})
    base = dict(model_type="qwen3", vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=2)
    with pytest.raises(ValueError, match="attention_bias"):
        ModelConfig.from_hf({**base, "attention_bias": True})


def test_padded_vocab():
    c = ModelConfig("qwen3", 151936, 64, 2, 4, 2, 16, 128)
    assert c.padded_vocab_size(1) == 151936 and c.padded_vocab_size(8) == 152576
    assert c.padded_vocab_size(8) % (128 * 8) == 0


def test_impossible_layouts_refused_with_reason():
    c = ModelConfig("qwen3", 250, 64, 4, num_heads=6, num_kv_heads=3, head_dim=16, ffn_hidden_size=96)
    validate_layout(c, ParallelConfig(tp=3, pp=2, dp=1), 6)
    with pytest.raises(LayoutError, match="num_heads=6 is not divisible by tp=4"):
        validate_layout(c, ParallelConfig(tp=4), 4)
    with pytest.raises(LayoutError, match="num_kv_heads=3 and tp=2: one must divide the other"):
        validate_layout(c, ParallelConfig(tp=2), 2)
    validate_layout(c, ParallelConfig(tp=6), 6)  # 3 KV groups over 6 ranks: megatron-core shares each group
    with pytest.raises(LayoutError, match="num_layers=4 is not divisible by pp=3"):
        validate_layout(c, ParallelConfig(pp=3), 3)
    with pytest.raises(LayoutError, match="but the job has 4 processes"):
        validate_layout(c, ParallelConfig(tp=1, pp=2, dp=1), 4)
    with pytest.raises(LayoutError, match="positive"):
        validate_layout(c, ParallelConfig(tp=0), 1)


# ---------------------------------------------------------------------------- compat layer

_COMPAT_PROBE = r"""
import json, sys, torch
import megatron.core.optimizer.clip_grads as cg
import megatron.core.tensor_parallel.random as rnd
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
before = (torch.cuda.current_device, cg.torch, rnd._get_cuda_rng_state, DistributedOptimizer.__init__)
mode = sys.argv[1]
if mode == "cuda":
    torch.cuda.is_available = lambda: True
from erpd_megatron.megatron import compat
applied = compat.apply_cpu_compat()
n_first = len(compat.PATCHES)
again = compat.apply_cpu_compat()
after = (torch.cuda.current_device, cg.torch, rnd._get_cuda_rng_state, DistributedOptimizer.__init__)
print(json.dumps({"applied": applied, "again": again, "n_patches": len(compat.PATCHES), "n_first": n_first,
                  "unchanged": [a is b for a, b in zip(before, after)]}))
"""


def _probe(mode, env=None):
    out = subprocess.run([sys.executable, "-c", _COMPAT_PROBE, mode], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_compat_not_applied_when_cuda_available():
    """With CUDA "available" nothing is patched (the CPU path, incl. idempotence, runs in test_megatron_parallel)."""
    gpu = _probe("cuda")
    assert gpu == {"applied": False, "again": False, "n_patches": 0, "n_first": 0, "unchanged": [True] * 4}


def test_compat_refuses_other_megatron_versions(monkeypatch):
    from erpd_megatron.megatron import compat

    assert compat.installed_mcore_version() in compat.SUPPORTED_MCORE_VERSIONS
    monkeypatch.setattr(compat, "installed_mcore_version", lambda: "0.20.0")
    monkeypatch.delenv("ERPD_MCORE_UNCHECKED", raising=False)
    with pytest.raises(compat.UnsupportedMegatronVersion, match="found 0.20.0"):
        compat.check_mcore_version()
    # apply_cpu_compat checks before patching anything (an earlier test of this process may have applied the
    # layer already: pretend it has not, and check that nothing is added)
    monkeypatch.setattr(compat, "_APPLIED", False)
    before = list(compat.PATCHES)
    with pytest.raises(compat.UnsupportedMegatronVersion, match="found 0.20.0"):
        compat.apply_cpu_compat(force=True)
    assert not compat.is_applied() and compat.PATCHES == before
