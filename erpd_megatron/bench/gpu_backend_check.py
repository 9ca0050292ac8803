"""GPU check of the megatron backend: bf16 train step + log-prob pass of a Qwen3-1.7B-shaped model.

Runs the project's own PolicyEngine (TP=1, one GPU) with the portable local spec (SDPA core
attention; "local-naive": megatron's unfused DotProductAttention for comparison) and, when
Transformer Engine is importable, the TE spec in bf16 and FP8 (hybrid, delayed scaling). Reports per variant: tokens/s, model TFLOP/s, MFU against 989 TFLOP/s (H100
SXM dense bf16), peak memory, and the first-step loss (all variants start from the same weights,
so their losses must agree to bf16 noise).

    python -m erpd_megatron.bench.gpu_backend_check          # GPU, writes $OUT/gpu_backend_check.json
    SMALL=1 python -m erpd_megatron.bench.gpu_backend_check  # CPU toy size: checks the script itself

Environment: SEQ (4096), MBS (1, rows per micro-batch), MICRO (2, micro-batches per step),
STEPS (5 timed, after 2 warm-up), SPECS ("local,local-naive,te,te-fp8"; unavailable ones are skipped).
FLOPs per token: 6 * matmul params + 6 * 2 * (S/2) * heads * head_dim * layers (causal attention),
a log-prob pass counts one third of that.
"""

from __future__ import annotations

import json
import os
import time

import torch

PEAK_TFLOPS = 989.0  # H100 SXM, dense bf16


def model_config(small: bool):
    from erpd_megatron.megatron.model import ModelConfig

    if small:
        return ModelConfig("qwen3", vocab_size=512, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                           head_dim=32, ffn_hidden_size=256, tie_embeddings=True)
    # Qwen3-1.7B: 28 layers, hidden 2048, 16 heads / 8 KV of 128, MLP 6144, tied 151936 vocabulary
    return ModelConfig("qwen3", vocab_size=151936, hidden_size=2048, num_layers=28, num_heads=16, num_kv_heads=8,
                       head_dim=128, ffn_hidden_size=6144, tie_embeddings=True)


def flops_per_token(cfg, seq: int) -> float:
    h, L = cfg.hidden_size, cfg.num_layers
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    matmul = L * (h * (q + 2 * kv) + q * h + 3 * h * cfg.ffn_hidden_size) + cfg.vocab_size * h  # + lm head
    attn = 2 * 2 * (seq / 2) * q * L  # QK^T and AV over the causal half
    return 3 * (2 * matmul + attn)


def loss_fn(lp, mb, ent):
    m = mb["response_mask"].float()
    return -(lp * m).sum() / m.sum().clamp(min=1), {}


def run_variant(name: str, spec: str, fp8: str | None, cfg, seq: int, mbs: int, micro: int, steps: int,
                attention: str = "sdpa") -> dict:
    from erpd_megatron.megatron.engine import OptimConfig, PolicyEngine
    from erpd_megatron.megatron.model import BuildOptions
    from erpd_megatron.megatron.parallel import ParallelConfig

    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    eng = PolicyEngine(cfg, ParallelConfig(), OptimConfig(lr=1e-6, micro_batch_size=mbs),
                       BuildOptions(spec=spec, fp8=fp8, fp8_recipe="delayed", attention=attention), seed=0)
    B = mbs * micro
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (B, seq), generator=g)
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), response_mask=torch.ones_like(ids))
    batch["response_mask"][:, : seq // 4] = 0
    if cuda:
        batch = {k: v.cuda() for k, v in batch.items()}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    res: dict = {"spec": spec, "fp8": fp8, "attention": attention if spec == "local" else "te", "params_b": round(sum(p.numel() for p in eng.modules[0].parameters()) / 1e9, 3)}
    fpt = flops_per_token(cfg, seq)
    for mode in ("train", "logprob"):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        first = None
        for i in range(2 + steps):
            if i == 2:
                sync()
                t0 = time.perf_counter()
            if mode == "train":
                m = eng.train_step(batch, loss_fn)
                first = m["loss"] if first is None else first
            else:
                eng.forward_logprobs(batch)
        sync()
        dt = (time.perf_counter() - t0) / steps
        tok_s = B * seq / dt
        tflops = fpt * (1.0 if mode == "train" else 1 / 3) * tok_s / 1e12
        res[mode] = {
            "s_per_step": round(dt, 4),
            "tokens_per_s": round(tok_s),
            "model_tflops": round(tflops, 3),
            "mfu": round(tflops / PEAK_TFLOPS, 4),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        }
        if mode == "train":
            res[mode]["first_loss"] = first
    del eng
    if cuda:
        torch.cuda.empty_cache()
    return res


def main() -> dict:
    from erpd_megatron.megatron.model import have_te

    small = os.environ.get("SMALL") == "1"
    cuda = torch.cuda.is_available()
    if not cuda and not small:
        raise SystemExit("no CUDA device: run with SMALL=1 to check the script on CPU")
    torch.set_num_threads(max(1, torch.get_num_threads()) if cuda else 1)
    cfg = model_config(small)
    seq = int(os.environ.get("SEQ", 128 if small else 4096))
    mbs = int(os.environ.get("MBS", 1))
    micro = int(os.environ.get("MICRO", 2))
    steps = int(os.environ.get("STEPS", 2 if small else 5))
    wanted = os.environ.get("SPECS", "local,local-naive,te,te-fp8").split(",")
    te = cuda and have_te()
    out = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "transformer_engine": te,
        "model": cfg.to_dict(),
        "seq": seq, "micro_batch_size": mbs, "micro_batches": micro,
        "peak_tflops": PEAK_TFLOPS,
        "variants": {},
    }
    variants = {"local": ("local", None, "sdpa"), "local-naive": ("local", None, "megatron"),
                "te": ("te", None, "sdpa"), "te-fp8": ("te", "hybrid", "sdpa")}
    for name in wanted:
        spec, fp8, attention = variants[name]
        if spec == "te" and not te:
            out["variants"][name] = {"skipped": "transformer_engine not importable or no CUDA"}
            continue
        try:
            out["variants"][name] = run_variant(name, spec, fp8, cfg, seq, mbs, micro, steps, attention)
        except Exception as e:  # keep the other variants' numbers
            out["variants"][name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        print(json.dumps({name: out["variants"][name]}), flush=True)
    from erpd_megatron.megatron.parallel import destroy_parallel

    destroy_parallel()
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_backend_check.json"), "w") as f:
            json.dump(out, f, indent=1)
    print("RESULT", json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
