"""GPU check of the megatron backend: bf16 train step + log-prob pass of a Qwen3-1.7B-shaped model.

Runs the project's own PolicyEngine (TP=1, one GPU) with the portable local spec (SDPA core
attention; "local-naive": megatron's unfused DotProductAttention for comparison) and, when
Transformer Engine is importable, the TE spec in bf16 and FP8 (hybrid, delayed scaling). Reports per variant: tokens/s, model TFLOP/s, MFU against 989 TFLOP/s (H100
SXM dense bf16), peak memory, and the first-step loss (all variants start from the same weights,
so their losses must agree to bf16 noise).
Plus the plain transformers loop on the very same weights (exported from a PolicyEngine built with
the same seed through rollout.weight_sync), same batch, same loss, same micro-batching:
"hf" = Qwen3ForCausalLM (SDPA) with fp32 master weights under torch.autocast(bf16) and fused AdamW
(the mixed-precision recipe comparable to megatron's bf16 + fp32 main params); "hf-bf16" = pure
bf16 parameters (no master weights: faster, numerically weaker; the plain loop's upper bound).
Log-prob pass of both: the model in bf16 under no_grad, logits -> fp32 log_softmax -> gather.
`comparison` reports Megatron local-spec tokens/s over "hf" (train and log-prob). On CPU (SMALL=1)
everything runs in fp32.

    python -m erpd_megatron.bench.gpu_backend_check          # GPU, writes $OUT/gpu_backend_check.json
    SMALL=1 python -m erpd_megatron.bench.gpu_backend_check  # CPU toy size: checks the script itself

Environment: SEQ (4096), MBS (1, rows per micro-batch), MICRO (2, micro-batches per step),
STEPS (5 timed, after 2 warm-up), SPECS ("local,local-naive,te,te-fp8,hf,hf-bf16"; unavailable ones are skipped).
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


def reseed(seed: int = 0) -> None:
    """Same starting weights for every variant: PolicyEngine seeds megatron's RNG tracker only when it
    initialises the parallel state (the first variant); later variants would draw their weights from
    wherever the previous one left the model-parallel CUDA generator. So reseed all generators here."""
    from megatron.core import parallel_state as ps

    from erpd_megatron.megatron.parallel import set_seed

    torch.manual_seed(seed)
    if ps.model_parallel_is_initialized():
        set_seed(seed)  # python, torch (CPU + CUDA) and megatron's model-parallel tracker


def free_memory() -> None:
    """gc first: megatron's DDP buffers and optimizers sit in reference cycles, so `del` alone frees
    nothing and empty_cache() would keep their blocks (inflating the next variant's peak memory)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def loss_fn(lp, mb, ent):
    m = mb["response_mask"].float()
    return -(lp * m).sum() / m.sum().clamp(min=1), {}


def run_variant(name: str, spec: str, fp8: str | None, cfg, seq: int, mbs: int, micro: int, steps: int,
                attention: str = "sdpa") -> dict:
    from erpd_megatron.megatron.engine import OptimConfig, PolicyEngine
    from erpd_megatron.megatron.model import BuildOptions
    from erpd_megatron.megatron.parallel import ParallelConfig

    cuda = torch.cuda.is_available()
    reseed(0)
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
    free_memory()
    return res


def _hf_from_policy(cfg, mbs: int, dtype):
    """transformers Qwen3/Llama with the weights of a PolicyEngine built like run_variant's (seed 0)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from erpd_megatron.megatron.engine import OptimConfig, PolicyEngine
    from erpd_megatron.megatron.model import BuildOptions
    from erpd_megatron.megatron.parallel import ParallelConfig
    from erpd_megatron.rollout.weight_sync import iter_hf_buckets

    reseed(0)
    eng = PolicyEngine(cfg, ParallelConfig(), OptimConfig(micro_batch_size=mbs), BuildOptions(spec="local"), seed=0,
                       trainable=False)
    hf_cfg = dict(cfg.to_hf())
    hf_cfg = AutoConfig.for_model(hf_cfg.pop("model_type"), **hf_cfg)
    hf_cfg._attn_implementation = "sdpa"
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    params = model.state_dict()
    got = set()
    with torch.no_grad():
        for bucket in iter_hf_buckets(eng, receivers="all", bucket_bytes=1 << 30):
            for name, t in bucket:
                params[name].copy_(t)
                got.add(name)
    missing = set(params) - got - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    if missing:
        raise RuntimeError(f"HF model did not receive {sorted(missing)[:5]}")
    del eng
    free_memory()
    return model


def run_hf_variant(name: str, cfg, seq: int, mbs: int, micro: int, steps: int, pure_bf16: bool) -> dict:
    """The plain transformers + torch loop on the same weights, batch and loss as run_variant."""
    cuda = torch.cuda.is_available()
    master = torch.bfloat16 if (cuda and pure_bf16) else torch.float32
    model = _hf_from_policy(cfg, mbs, master).train()
    amp = cuda and not pure_bf16
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0, fused=cuda)
    B = mbs * micro
    g = torch.Generator().manual_seed(1)  # the same batch as run_variant
    ids = torch.randint(0, cfg.vocab_size, (B, seq), generator=g)
    resp = torch.ones_like(ids)
    resp[:, : seq // 4] = 0
    if cuda:
        ids, resp = ids.cuda(), resp.cuda()

    def token_lp(rows):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits = model(input_ids=ids[rows]).logits
        lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[rows, 1:, None]).squeeze(-1)
        return torch.cat([lp.new_zeros(lp.shape[0], 1), lp], 1)

    def train_step():
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for i in range(micro):
            rows = slice(i * mbs, (i + 1) * mbs)
            lp = token_lp(rows)
            m = resp[rows].float()
            loss = -(lp * m).sum() / m.sum().clamp(min=1) / micro  # mean over micro-batches, as megatron
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return total

    @torch.no_grad()
    def logprob_pass():
        return [token_lp(slice(i * mbs, (i + 1) * mbs)) for i in range(micro)]

    def sync():
        if cuda:
            torch.cuda.synchronize()

    res: dict = {"spec": "transformers", "attention": "sdpa",
                 "precision": "bf16 params" if master == torch.bfloat16 else ("fp32 master + autocast bf16" if amp
                                                                              else "fp32"),
                 "params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3)}
    fpt = flops_per_token(cfg, seq)
    for mode in ("train", "logprob"):
        if mode == "logprob":
            opt = None  # free the optimizer state before the log-prob pass
            model = model.to(torch.bfloat16 if cuda else torch.float32).eval()  # what a plain precompute loop runs
            free_memory()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        first = None
        for i in range(2 + steps):
            if i == 2:
                sync()
                t0 = time.perf_counter()
            if mode == "train":
                loss = train_step()
                first = loss if first is None else first
            else:
                logprob_pass()
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
    model = None
    opt = None
    free_memory()
    return res


def _comparison(variants: dict) -> dict:
    """Megatron (local spec, SDPA) tokens/s over the transformers loop, per mode."""
    meg, out = variants.get("local", {}), {}
    for ref in ("hf", "hf-bf16"):
        hf = variants.get(ref, {})
        for mode in ("train", "logprob"):
            if mode in meg and mode in hf:
                out[f"{mode}_megatron_over_{ref}"] = round(meg[mode]["tokens_per_s"] / hf[mode]["tokens_per_s"], 3)
        if "train" in meg and "train" in hf and ref == "hf":
            out["first_loss_abs_diff_vs_hf"] = abs(meg["train"]["first_loss"] - hf["train"]["first_loss"])
    return out


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
    wanted = os.environ.get("SPECS", "local,local-naive,te,te-fp8,hf,hf-bf16").split(",")
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
                "te": ("te", None, "sdpa"), "te-fp8": ("te", "hybrid", "sdpa"),
                "hf": ("hf", None, "sdpa"), "hf-bf16": ("hf", "bf16", "sdpa")}  # transformers loop (bench helper)
    for name in wanted:
        spec, fp8, attention = variants[name]
        if spec == "te" and not te:
            out["variants"][name] = {"skipped": "transformer_engine not importable or no CUDA"}
            continue
        try:
            if spec == "hf":
                out["variants"][name] = run_hf_variant(name, cfg, seq, mbs, micro, steps, pure_bf16=fp8 == "bf16")
            else:
                out["variants"][name] = run_variant(name, spec, fp8, cfg, seq, mbs, micro, steps, attention)
        except Exception as e:  # keep the other variants' numbers
            out["variants"][name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        print(json.dumps({name: out["variants"][name]}), flush=True)
    out["comparison"] = _comparison(out["variants"])
    from erpd_megatron.megatron.parallel import destroy_parallel

    destroy_parallel()
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_backend_check.json"), "w") as f:
            json.dump(out, f, indent=1)
    print("RESULT", json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
