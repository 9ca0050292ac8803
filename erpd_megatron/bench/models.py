"""The benchmark model: one Qwen3 config, built twice with the same weights.

`hf_model` is transformers' Qwen3ForCausalLM (SDPA attention, transformers' default); `policy_engine`
is the project's Megatron backend (PolicyEngine, local spec with SDPA core attention) loaded with
the very same tensors through checkpoints_conv's literal HF -> Megatron map. The batch is a fixed
random token batch in the brief's layout (prompt then response, right-padded).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass
class BenchModel:
    """A tiny-but-not-trivial Qwen3: big enough that the matmuls dominate, small enough for 2 CPU cores."""

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    ffn_hidden_size: int = 768
    vocab_size: int = 1536
    tie_embeddings: bool = False

    def hf_config(self, max_positions: int = 4096) -> dict:
        return {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.ffn_hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": max_positions,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1_000_000.0,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "tie_word_embeddings": self.tie_embeddings,
            "initializer_range": 0.02,
            "use_cache": False,
        }

    def to_dict(self) -> dict:
        return asdict(self)

    def num_params(self) -> int:
        from erpd_megatron.megatron.model import ModelConfig

        return ModelConfig.from_hf(self.hf_config()).num_params()

    def matmul_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token: 2 x matmul weights (embedding lookup excluded, LM head included)
        + causal attention (QK^T and AV over on average seq/2 keys)."""
        from erpd_megatron.megatron.model import ModelConfig

        mc = ModelConfig.from_hf(self.hf_config())
        n = mc.num_params() - self.vocab_size * self.hidden_size * (0 if self.tie_embeddings else 1)
        attn = 2 * 2 * (seq_len / 2) * self.num_heads * self.head_dim * self.num_layers
        return 2 * n + attn


def demo_base_model() -> BenchModel:
    """The demo's toy base (`toy/warmup.py` DEMO_MODEL with the toy vocabulary of 24, tied embeddings): issue 15
    asks for the Megatron / plain ratio on it too. Its batch in the benchmarks is the demo's training
    mini-batch, 256 rows, padded to 64 tokens (prompt + up to 40 generated tokens; `presets/demo.yaml`)."""
    from erpd_megatron.toy.tokenizer import VOCAB
    from erpd_megatron.toy.warmup import DEMO_MODEL

    return BenchModel(hidden_size=DEMO_MODEL["hidden_size"], num_layers=DEMO_MODEL["num_layers"],
                      num_heads=DEMO_MODEL["num_heads"], num_kv_heads=DEMO_MODEL["num_kv_heads"],
                      head_dim=DEMO_MODEL["head_dim"], ffn_hidden_size=DEMO_MODEL["intermediate_size"],
                      vocab_size=len(VOCAB), tie_embeddings=True)


#: --model choices of the throughput benchmarks: (model, batch size, sequence length, JSON name suffix)
MODELS = {
    "bench": (BenchModel, 16, 256, ""),
    "demo": (demo_base_model, 256, 64, "_demo"),
}


def hf_model(spec: BenchModel, seed: int = 0, attn_implementation: str = "sdpa"):
    """Qwen3ForCausalLM (fp32, train mode) with seeded init."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = dict(spec.hf_config())
    cfg.pop("architectures")
    cfg.pop("model_type")
    torch.manual_seed(seed)
    m = Qwen3ForCausalLM(Qwen3Config(**cfg, attn_implementation=attn_implementation)).float()
    return m.train()


def onednn_twin(spec: BenchModel, state: dict[str, torch.Tensor]):
    """`hf_model(spec)` holding the tensors `state`, its `nn.Linear`s on the backend's CPU GEMM
    (`utils/cpu_gemm.py`): the throughput benchmarks' kernel-equal plain arm."""
    from erpd_megatron.utils.cpu_gemm import use_onednn_linears

    m = hf_model(spec)
    m.load_state_dict(state)
    use_onednn_linears(m)
    return m


def policy_engine(spec: BenchModel, par=None, *, micro_batch_size: int, lr: float = 1e-5, clip_grad: float = 1.0,
                  hf_state: dict[str, torch.Tensor] | None = None, seed: int = 1234, trainable: bool = True):
    """PolicyEngine for `spec` (fp32 on CPU); with `hf_state` its weights are exactly those HF tensors."""
    from checkpoints_conv.maps import hf_to_mcore
    from erpd_megatron.megatron.engine import OptimConfig, PolicyEngine
    from erpd_megatron.megatron.model import ModelConfig, load_full_state_dict
    from erpd_megatron.megatron.parallel import ParallelConfig

    par = par or ParallelConfig()
    hf_cfg = spec.hf_config()
    mc = ModelConfig.from_hf(hf_cfg)
    optim = OptimConfig(lr=lr, clip_grad=clip_grad, micro_batch_size=micro_batch_size)
    eng = PolicyEngine(mc, par, optim, seed=seed, trainable=trainable)
    if hf_state is not None:
        full = dict(hf_to_mcore(hf_cfg, hf_state.__getitem__))
        load_full_state_dict([_bare(m) for m in eng.modules], full, mc, par)
        # DDP keeps fp32 main params / grad buffers aliased to the module params, so copying into the
        # module parameters in place is enough; the optimizer has not stepped yet.
    return eng


def _bare(m):
    from erpd_megatron.megatron.model import unwrap_model

    return unwrap_model(m)


def token_batch(batch_size: int, seq_len: int, vocab_size: int, *, prompt_len: int | None = None, seed: int = 0,
                ragged: bool = False) -> dict[str, torch.Tensor]:
    """Random tokens in the brief's layout: prompt (first quarter) then response; fixed advantages.

    `ragged=False` gives full-length rows (every method sees the same work: no padding to skip);
    `ragged=True` cuts rows to random lengths in [seq/2, seq] (right padding).
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=g)
    prompt_len = seq_len // 4 if prompt_len is None else prompt_len
    lengths = torch.full((batch_size,), seq_len)
    if ragged:
        lengths = torch.randint(seq_len // 2, seq_len + 1, (batch_size,), generator=g)
        lengths[0] = seq_len
    pos = torch.arange(seq_len).unsqueeze(0)
    attn = (pos < lengths.unsqueeze(1)).long()
    resp = ((pos >= prompt_len) & (attn > 0)).long()
    ids = ids * attn
    adv = torch.randn(batch_size, 1, generator=g).expand(-1, seq_len).contiguous()
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp, "advantages": adv}


def pg_loss(logprobs: torch.Tensor, batch: dict, entropy=None):
    """Policy-gradient surrogate -sum(A * lp * m) / sum(m): token log-prob based, like the ERPD losses."""
    m = batch["response_mask"].to(logprobs.dtype)
    loss = -(batch["advantages"].to(logprobs.dtype) * logprobs * m).sum() / m.sum().clamp_min(1.0)
    return loss, {}


def hf_token_logprobs(model, batch: dict) -> torch.Tensor:
    """[B, T] token log-probs the plain way: full logits -> log_softmax -> gather (out[:, 0] = 0)."""
    ids = batch["input_ids"]
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    lp = torch.cat([lp.new_zeros(ids.shape[0], 1), lp], dim=1)
    return lp * batch["attention_mask"].to(lp.dtype)
