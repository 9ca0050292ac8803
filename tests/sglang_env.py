"""Where the real-server tests find sglang: the CPU environment `make sglang-env` builds (scripts/sglang_cpu/).

``sglang_python()`` is its interpreter: ``$ERPD_SGLANG_PYTHON`` when set, else ``<repo>/.venv-sglang/bin/python``
once its build stamp exists. ``require_sglang()`` returns it, or skips the test with the reason -- except under
``ERPD_REQUIRE_SGLANG=1`` (set by .ci/run), where a missing environment fails the test instead.
Also the tiny random models these tests serve (Qwen3 and Llama, ``save_pretrained`` + the toy tokenizer).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: fields of erpd's ModelConfig shared by the tiny served models (vocab 32 >= the toy tokenizer's 24 tokens)
TINY = dict(vocab_size=32, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
            ffn_hidden_size=128, rope_theta=10000.0, max_position_embeddings=512)


def sglang_python() -> str | None:
    env = os.environ.get("ERPD_SGLANG_PYTHON")
    if env:
        return env
    venv = REPO / ".venv-sglang"
    if (venv / ".installed").exists() and (venv / "bin" / "python").exists():
        return str(venv / "bin" / "python")
    return None


def require_sglang() -> str:
    py = sglang_python()
    if py is None:
        why = "no CPU SGLang environment: `make sglang-env` builds .venv-sglang (or set ERPD_SGLANG_PYTHON)"
        if os.environ.get("ERPD_REQUIRE_SGLANG") == "1":
            pytest.fail(f"ERPD_REQUIRE_SGLANG=1 but {why}")
        pytest.skip(why)
    return py


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model_config(family: str, tie: bool):
    from erpd_megatron.megatron.model import ModelConfig

    return ModelConfig(family=family, tie_embeddings=tie, **TINY)


def save_tiny_model(out: Path, family: str, *, tie: bool, seed: int) -> Path:
    """A random tiny ``family`` model (erpd's ModelConfig -> HF config) and the toy tokenizer in ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from erpd_megatron.toy.tokenizer import build_tokenizer

    tok = build_tokenizer()
    hf = tiny_model_config(family, tie).to_hf()
    cfg = AutoConfig.for_model(**hf, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # norms away from 1 so that a weight sync that misses them is visible
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
