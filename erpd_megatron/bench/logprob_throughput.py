"""Benchmark 2: tokens/s of the log-prob pass (signal precompute), Megatron backend vs transformers.

Same model, weights and batch as benchmark 1; no gradients:
- "megatron": `PolicyEngine.forward_logprobs(batch)` (TP=1, forward-only schedule, chunked
  vocab-parallel log-prob function, result [B, T] fp32);
- "plain": `torch.no_grad(): Qwen3ForCausalLM(ids).logits -> log_softmax -> gather`, eval mode.
Before timing, the two [B, T] results are compared (max |diff|, must be ~1e-6 in fp32).
Timed A, B, A, B, ... after warm-up; per-round Megatron/plain ratio reported as median/min/max.

    python -m erpd_megatron.bench.logprob_throughput [--repeats 5] [--steps 3] [--out docs/benchmarks]
"""

from __future__ import annotations

import argparse

import torch

from erpd_megatron.bench.common import Recorder, interleaved, set_threads, spread
from erpd_megatron.bench.models import BenchModel, hf_model, hf_token_logprobs, policy_engine, token_batch

NAME = "logprob_throughput"


def run(out_dir=None, *, model: BenchModel | None = None, batch_size: int = 16, seq_len: int = 256,
        warmup: int = 1, repeats: int = 5, steps: int = 3, threads: int | None = 1, log=print) -> dict:
    model = model or BenchModel()
    threads = set_threads(threads)
    config = dict(model=model.to_dict(), batch_size=batch_size, seq_len=seq_len, warmup=warmup, repeats=repeats,
                  steps_per_repeat=steps, threads=threads, dtype="float32", micro_batch_size=batch_size, tp=1,
                  params=model.num_params())
    rec = Recorder(NAME, config)
    hf = hf_model(model).eval()
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    eng = policy_engine(model, micro_batch_size=batch_size, hf_state=state, trainable=False)
    batch = token_batch(batch_size, seq_len, model.vocab_size)

    @torch.no_grad()
    def plain_pass():
        return hf_token_logprobs(hf, batch)

    def megatron_pass():
        return eng.forward_logprobs(batch)

    diff = float((plain_pass() - megatron_pass()).abs().max())
    log(f"[{NAME}] max |logprob diff| megatron vs plain: {diff:.2e}")
    times = interleaved({"megatron": megatron_pass, "plain": plain_pass}, warmup=warmup, repeats=repeats,
                        steps=steps, log=log)
    tokens = batch_size * seq_len
    flops_tok = model.matmul_flops_per_token(seq_len)
    ratios = [p / m for m, p in zip(times["megatron"], times["plain"])]
    results = {
        "max_abs_logprob_diff": diff,
        "tokens_per_pass": tokens,
        "seconds_per_pass": {k: v for k, v in times.items()},
        "tokens_per_s": {k: spread([tokens / t for t in v]) for k, v in times.items()},
        "gflops_per_s": {k: spread([flops_tok * tokens / t / 1e9 for t in v]) for k, v in times.items()},
        "ratio_megatron_over_plain": spread(ratios),
        "target_ratio": 1.0,
    }
    path = rec.write(results, out_dir)
    r = results["ratio_megatron_over_plain"]
    log(f"[{NAME}] tokens/s megatron {results['tokens_per_s']['megatron']['median']:.0f} plain "
        f"{results['tokens_per_s']['plain']['median']:.0f}; ratio median {r['median']:.3f} "
        f"[{r['min']:.3f}, {r['max']:.3f}] -> {path}")
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    run(a.out, batch_size=a.batch_size, seq_len=a.seq_len, warmup=a.warmup, repeats=a.repeats, steps=a.steps,
        threads=a.threads)


if __name__ == "__main__":
    main()
