"""Benchmark 7: the real SGLang server on CPU vs LocalEngine, same model: weight-update time and generate throughput.

One small random Qwen3 (fp32, the toy tokenizer) served by sglang 0.5.23 from the CPU environment
`make sglang-env` builds (`--dtype float32`, torch-native layers) and loaded by LocalEngine (transformers,
in-process). Per engine, interleaved A/B over ``--repeats``:
- weight update: the full HF state dict as one bucket through ``update_weights`` (SGLang: the tensor
  transport's session -- pause, flush, begin, flattened-bucket payload by shared memory, end, continue;
  LocalEngine: ``copy_`` into its parameters). Seconds per update.
- generate: ``--prompts`` prompts x ``--n`` samples, ``--max-new-tokens`` each (temperature 1, no stop token, so
  every sample is full length). Generated tokens per second of wall time.
Ratios are SGLang / LocalEngine (>1: SGLang faster for throughput, slower for update time). Informational
on CPU: sglang's scheduler, HTTP and detokenizer overheads dominate at this size, and on a GPU its kernels
and CUDA graphs change the picture entirely. Without the environment it records the reason and exits 0.

    python -m erpd_megatron.bench.sglang_vs_local [--repeats 3] [--out docs/benchmarks]
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from pathlib import Path

import torch

from erpd_megatron.bench.common import REPO_ROOT, Recorder, spread

NAME = "sglang_vs_local"
MODEL = dict(family="qwen3", vocab_size=32, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
             head_dim=64, ffn_hidden_size=768, tie_embeddings=False, rope_theta=10000.0, max_position_embeddings=1024)


def sglang_python() -> str | None:
    env = os.environ.get("ERPD_SGLANG_PYTHON")
    venv = REPO_ROOT / ".venv-sglang"
    if env:
        return env
    return str(venv / "bin" / "python") if (venv / ".installed").exists() else None


def _save_model(out: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoConfig, AutoModelForCausalLM

    from erpd_megatron.megatron.model import ModelConfig
    from erpd_megatron.toy.tokenizer import build_tokenizer

    tok = build_tokenizer()
    cfg = AutoConfig.for_model(**ModelConfig(**MODEL).to_hf(), bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(out_dir, *, repeats: int = 3, prompts: int = 8, n: int = 4, max_new_tokens: int = 64) -> dict:
    from erpd_megatron.rollout.engine import SamplingParams
    from erpd_megatron.rollout.local_engine import LocalEngine
    from erpd_megatron.rollout.sglang_engine import LaunchSpec, SGLangEngine

    config = {"model": MODEL, "repeats": repeats, "prompts": prompts, "n": n, "max_new_tokens": max_new_tokens,
              "dtype": "float32", "sglang": "0.5.23 CPU (torch_native attention, no CUDA graphs)"}
    rec = Recorder(NAME, config)
    python = sglang_python()
    if python is None:
        res = {"skipped": "no CPU SGLang environment (make sglang-env)"}
        rec.write(res, out_dir)
        return res
    with tempfile.TemporaryDirectory(prefix="erpd_bench_sgl_") as tmp:
        model_dir = Path(tmp) / "model"
        state = _save_model(model_dir)
        bucket = sorted(state.items())
        nbytes = sum(t.numel() * t.element_size() for _, t in bucket)
        t0 = time.perf_counter()
        spec = LaunchSpec(model_path=str(model_dir), python=python, base_port=_free_port(), log_dir=tmp,
                          cpu_max_total_tokens=8192)
        sgl = SGLangEngine(launch=spec, request_timeout=1800, control_timeout=1800)
        start_s = time.perf_counter() - t0
        local = LocalEngine.from_pretrained(model_dir, max_batch_size=prompts * n)
        engines = {"sglang": sgl, "local": local}
        g = torch.Generator().manual_seed(1)
        prompt_ids = [[1, 4] + torch.randint(6, 24, (6,), generator=g).tolist() for _ in range(prompts)]
        sp = SamplingParams(n=n, temperature=1.0, max_new_tokens=max_new_tokens, seed=3)
        update_s: dict[str, list[float]] = {k: [] for k in engines}
        gen_tps: dict[str, list[float]] = {k: [] for k in engines}
        try:
            for eng in engines.values():  # warm-up: first update and first batch outside the timing
                eng.update_weights(iter([bucket]), version=0)
                eng.generate(prompt_ids[:2], SamplingParams(n=1, max_new_tokens=4, seed=0))
            for r in range(repeats):
                order = list(engines) if r % 2 == 0 else list(engines)[::-1]
                for name in order:
                    eng = engines[name]
                    t = time.perf_counter()
                    eng.update_weights(iter([bucket]), version=r + 1)
                    update_s[name].append(time.perf_counter() - t)
                    t = time.perf_counter()
                    samples = eng.generate(prompt_ids, sp)
                    gen_tps[name].append(sum(len(s.response_ids) for s in samples) / (time.perf_counter() - t))
        finally:
            sgl.shutdown()
    upd = {k: spread(v) for k, v in update_s.items()}
    tps = {k: spread(v) for k, v in gen_tps.items()}
    res = {"weights_bytes": nbytes, "sglang_start_s": round(start_s, 1), "update_s": upd, "generate_tokens_per_s": tps,
           "ratio_update_s_sglang_over_local": upd["sglang"]["median"] / upd["local"]["median"],
           "ratio_tokens_per_s_sglang_over_local": tps["sglang"]["median"] / tps["local"]["median"]}
    rec.write(res, out_dir)
    print(f"{NAME}: update {upd['sglang']['median']:.3f} s (sglang) vs {upd['local']['median']:.3f} s (local), "
          f"generate {tps['sglang']['median']:.0f} vs {tps['local']['median']:.0f} tokens/s, "
          f"ratio {res['ratio_tokens_per_s_sglang_over_local']:.2f}", flush=True)
    return res


def main(argv=None) -> None:
    from erpd_megatron.bench.common import DEFAULT_OUT

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    a = ap.parse_args(argv)
    run(a.out, repeats=a.repeats, prompts=a.prompts, n=a.n, max_new_tokens=a.max_new_tokens)


if __name__ == "__main__":
    main()
