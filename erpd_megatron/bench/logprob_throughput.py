"""Benchmark 2: tokens/s of the log-prob pass (signal precompute), Megatron backend vs transformers.

Same model, weights and batch as benchmark 1; no gradients:
- "megatron": `PolicyEngine.forward_logprobs(batch)` (TP=1, forward-only schedule, chunked
  vocab-parallel log-prob function, result [B, T] fp32);
- "plain": `torch.no_grad(): Qwen3ForCausalLM(ids).logits -> log_softmax -> gather`, eval mode.
- "plain_onednn": the same pass with its `nn.Linear`s on the backend's CPU GEMM (oneDNN, `utils/cpu_gemm.py`):
  the kernel-equal control (`ratio_megatron_over_plain_onednn`).
Before timing, the two [B, T] results are compared (max |diff|, must be ~1e-6 in fp32).
Timed A, B, A, B, ... after warm-up; per-round Megatron/plain ratio reported as median/min/max.

    python -m erpd_megatron.bench.logprob_throughput [--repeats 5] [--steps 3] [--out docs/benchmarks]
"""

from __future__ import annotations

import torch

from erpd_megatron.bench.common import Recorder, interleaved, ratio_results, set_threads, throughput_main
from erpd_megatron.bench.models import BenchModel, hf_model, hf_token_logprobs, onednn_twin, policy_engine, token_batch

NAME = "logprob_throughput"


def run(out_dir=None, *, model: BenchModel | None = None, batch_size: int = 16, seq_len: int = 256,
        warmup: int = 1, repeats: int = 5, steps: int = 3, threads: int | None = 1, log=print,
        suffix: str = "") -> dict:
    model = model or BenchModel()
    threads = set_threads(threads)
    config = dict(model=model.to_dict(), batch_size=batch_size, seq_len=seq_len, warmup=warmup, repeats=repeats,
                  steps_per_repeat=steps, threads=threads, dtype="float32", micro_batch_size=batch_size, tp=1,
                  params=model.num_params())
    rec = Recorder(NAME + suffix, config)
    hf = hf_model(model).eval()
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    eng = policy_engine(model, micro_batch_size=batch_size, hf_state=state, trainable=False)
    hf_dnn = onednn_twin(model, state).eval()  # the same pass with its Linears on the backend's CPU GEMM
    batch = token_batch(batch_size, seq_len, model.vocab_size)

    @torch.no_grad()
    def plain_pass():
        return hf_token_logprobs(hf, batch)

    @torch.no_grad()
    def plain_onednn_pass():
        return hf_token_logprobs(hf_dnn, batch)

    def megatron_pass():
        return eng.forward_logprobs(batch)

    diff = float((plain_pass() - megatron_pass()).abs().max())
    log(f"[{NAME + suffix}] max |logprob diff| megatron vs plain: {diff:.2e}")
    cpu: dict[str, list[float]] = {}
    times = interleaved({"megatron": megatron_pass, "plain": plain_pass, "plain_onednn": plain_onednn_pass},
                        warmup=warmup, repeats=repeats, steps=steps, log=log, cpu=cpu)
    tokens = batch_size * seq_len
    flops_tok = model.matmul_flops_per_token(seq_len)
    return ratio_results(NAME + suffix, times, tokens, flops_tok, "pass", rec, out_dir, log, cpu=cpu,
                         max_abs_logprob_diff=diff)


def main(argv=None):
    throughput_main(run, __doc__, argv, steps=3)


if __name__ == "__main__":
    main()
