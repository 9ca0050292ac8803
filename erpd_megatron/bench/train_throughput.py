"""Benchmark 1: tokens/s of one training step, Megatron backend vs a plain transformers + torch loop.

Both sides train the same Qwen3 (same config, same initial tensors), on the same batch, with the
same token-log-prob loss (policy-gradient surrogate, `models.pg_loss`), fp32 on CPU, one process:
- "megatron": `PolicyEngine.train_step` (TP=1; megatron DDP + DistributedOptimizer with torch
  AdamW, grad clipping, megatron's forward_backward_func, vocab-parallel log-prob function);
- "plain": `Qwen3ForCausalLM(ids).logits -> log_softmax -> gather -> loss.backward()`,
  `clip_grad_norm_`, `torch.optim.AdamW`, SDPA attention (transformers' default).
- "plain_onednn": the same plain loop with its `nn.Linear`s on the backend's CPU GEMM (`utils/cpu_gemm.py`,
  oneDNN): the kernel-equal control; `ratio_megatron_over_plain_onednn` says how much of the Megatron / plain
  ratio the GEMM library alone explains (issue 15).
One micro-batch = the whole batch on both sides. Timed A, B, A, B, ... after warm-up (see
common.interleaved); each round gives one Megatron/plain throughput ratio, reported as median/min/max.
Before timing, the first step's losses are compared (they must agree: same model, same loss).

    python -m erpd_megatron.bench.train_throughput [--repeats 5] [--steps 2] [--out docs/benchmarks]
"""

from __future__ import annotations

import torch

from erpd_megatron.bench.common import Recorder, interleaved, ratio_results, set_threads, throughput_main
from erpd_megatron.bench.models import (
    BenchModel,
    hf_model,
    hf_token_logprobs,
    onednn_twin,
    pg_loss,
    policy_engine,
    token_batch,
)

NAME = "train_throughput"


def run(out_dir=None, *, model: BenchModel | None = None, batch_size: int = 16, seq_len: int = 256,
        warmup: int = 1, repeats: int = 5, steps: int = 2, threads: int | None = 1, lr: float = 1e-5,
        log=print, suffix: str = "") -> dict:
    model = model or BenchModel()
    threads = set_threads(threads)
    config = dict(model=model.to_dict(), batch_size=batch_size, seq_len=seq_len, warmup=warmup, repeats=repeats,
                  steps_per_repeat=steps, threads=threads, dtype="float32", lr=lr, micro_batch_size=batch_size,
                  tp=1, params=model.num_params())
    rec = Recorder(NAME + suffix, config)
    hf = hf_model(model)
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    eng = policy_engine(model, micro_batch_size=batch_size, lr=lr, hf_state=state)
    hf_dnn = onednn_twin(model, state)  # the same loop with its Linears on the backend's CPU GEMM
    batch = token_batch(batch_size, seq_len, model.vocab_size)

    def plain_loop(m):
        opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0)

        def step():
            opt.zero_grad(set_to_none=True)
            loss, _ = pg_loss(hf_token_logprobs(m, batch), batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            return float(loss.detach())

        return step

    plain_step, plain_onednn_step = plain_loop(hf), plain_loop(hf_dnn)

    def megatron_step():
        return eng.train_step(batch, pg_loss)["loss"]

    # correctness first: identical weights and loss -> identical first-step loss
    loss_plain, loss_meg, loss_dnn = plain_step(), megatron_step(), plain_onednn_step()
    log(f"[{NAME + suffix}] first-step loss plain {loss_plain:.6f} megatron {loss_meg:.6f} plain+oneDNN {loss_dnn:.6f}")
    cpu: dict[str, list[float]] = {}
    times = interleaved({"megatron": megatron_step, "plain": plain_step, "plain_onednn": plain_onednn_step},
                        warmup=warmup, repeats=repeats, steps=steps, log=log, cpu=cpu)
    tokens = batch_size * seq_len
    flops_tok = 3 * model.matmul_flops_per_token(seq_len)  # fwd + bwd (2x fwd)
    first = {"plain": loss_plain, "megatron": loss_meg, "plain_onednn": loss_dnn,
             "abs_diff": abs(loss_plain - loss_meg)}
    return ratio_results(NAME + suffix, times, tokens, flops_tok, "step", rec, out_dir, log, cpu=cpu,
                         first_step_loss=first)


def main(argv=None):
    throughput_main(run, __doc__, argv, steps=2)


if __name__ == "__main__":
    main()
