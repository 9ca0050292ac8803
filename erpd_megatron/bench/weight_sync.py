"""Benchmark 4: weight sync GB/s, Megatron (TP=2, 2 gloo processes) -> LocalEngine, vs memcpy bandwidth.

Two spawned processes hold a TP=2 PolicyEngine (fp32); rank 0 also holds a LocalEngine (transformers
Qwen3, own random init). `erpd_megatron.rollout.weight_sync.sync_weights(policy, engine,
receivers="rank0", bucket_bytes=...)` streams the weights: both TP ranks write their rows into HF
tensors in shared-memory bucket slots (`weight_sync_shm`; keys "<MiB>"), and, interleaved with it, the
point-to-point gloo path (`shm=False`, keys "p2p_<MiB>"); size-capped buckets,
`LocalEngine.update_weights` copying into the model.
GB/s = HF bytes delivered / wall seconds on rank 0, per bucket size (A, B, ... order alternating
between repeats). Also per run: "stream only" (buckets consumed without an engine: gather + un-fuse
cost) and the machine's plain memory-copy bandwidth (`dst.copy_(src)` of a large fp32 buffer, one
thread, same process, same run), which the target compares against (>= 1/4 of memcpy).
After the last sync the engine's weights are checked against the Megatron model (log-probs on a
fixed batch must agree), so a fast but wrong sync cannot pass.

    python -m erpd_megatron.bench.weight_sync [--repeats 3] [--out docs/benchmarks]
"""

from __future__ import annotations

import argparse
import time

import torch

from erpd_megatron.bench.common import Recorder, spawn, spread
from erpd_megatron.bench.models import BenchModel

NAME = "weight_sync"
MiB = 1 << 20
DEFAULT_MODEL = BenchModel(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64,
                           ffn_hidden_size=1536, vocab_size=8192, tie_embeddings=False)
DEFAULT_BUCKETS_MIB = (1, 4, 16, 64, 256, 512)


def memcpy_gbps(nbytes: int = 256 * MiB, repeats: int = 5) -> dict:
    """Plain copy bandwidth: bytes copied per second by `dst.copy_(src)` (both buffers pre-touched)."""
    n = nbytes // 4
    src = torch.randn(n)
    dst = torch.empty(n)
    dst.copy_(src)  # touch the pages
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        rates.append(nbytes / (time.perf_counter() - t) / 1e9)
    return {"buffer_bytes": nbytes, **spread(rates)}


def _worker(rank: int, model: BenchModel, buckets_mib: list[float], repeats: int, memcpy_bytes: int):
    import torch.distributed as dist

    from erpd_megatron.bench.models import policy_engine, token_batch
    from erpd_megatron.megatron.parallel import ParallelConfig
    from erpd_megatron.rollout.local_engine import LocalEngine
    from erpd_megatron.rollout.weight_sync import sync_weights

    policy = policy_engine(model, ParallelConfig(tp=2), micro_batch_size=4, trainable=False)
    engine = LocalEngine.from_config(model.hf_config(), seed=7, eos_token_ids=[0]) if rank == 0 else None
    runs: dict[str, list[dict]] = {}
    sizes = [float(b) for b in buckets_mib]
    # warm-up: one full sync (first-touch of the engine's pages, gloo connections)
    sync_weights(policy, engine, version=-1, receivers="rank0", bucket_bytes=int(64 * MiB))
    for r in range(repeats):
        for b in (sizes if r % 2 == 0 else sizes[::-1]):
            # both transports of the same bucket size back to back, order alternating between repeats
            for shm in ((True, False) if r % 2 == 0 else (False, True)):
                dist.barrier()
                s = sync_weights(policy, engine, version=r, receivers="rank0", bucket_bytes=int(b * MiB), shm=shm)
                runs.setdefault(str(b) if shm else f"p2p_{b}", []).append(s)
        dist.barrier()
        s = sync_weights(policy, None, version=r, receivers="rank0", bucket_bytes=int(64 * MiB), shm=True)
        runs.setdefault("stream_only_64", []).append(s)
    # memcpy on rank 0 while rank 1 waits (no competition for the cores)
    mem = memcpy_gbps(memcpy_bytes) if rank == 0 else None
    dist.barrier()
    # correctness: the engine now runs the Megatron weights
    batch = token_batch(4, 64, model.vocab_size, seed=3)
    lp_meg = policy.forward_logprobs(batch)
    if rank != 0:
        return None
    lp_eng = engine.compute_logprobs(batch["input_ids"], batch["attention_mask"])
    diff = float((lp_eng.float() - lp_meg).abs().max())
    return {"runs": runs, "memcpy": mem, "max_abs_logprob_diff": diff}


def run(out_dir=None, *, model: BenchModel | None = None, buckets_mib=DEFAULT_BUCKETS_MIB, repeats: int = 3,
        memcpy_mib: int = 256, threads: int = 1, log=print) -> dict:
    model = model or DEFAULT_MODEL
    config = dict(model=model.to_dict(), params=model.num_params(), tp=2, processes=2, backend="gloo",
                  dtype="float32", receivers="rank0", transports=["shm", "p2p"], bucket_sizes_mib=list(buckets_mib), repeats=repeats,
                  memcpy_buffer_mib=memcpy_mib, threads_per_process=threads)
    rec = Recorder(NAME, config)
    res = spawn(_worker, 2, (model, list(buckets_mib), repeats, memcpy_mib * MiB), threads=threads)[0]
    mem = res["memcpy"]
    per_bucket = {}
    for key, stats in res["runs"].items():
        gbps = [s["weight_sync/gbps"] for s in stats]
        per_bucket[key] = {
            "bytes": stats[0]["weight_sync/bytes"],
            "buckets": stats[0]["weight_sync/buckets"],
            "peak_bucket_bytes": max(s["weight_sync/peak_bucket_bytes"] for s in stats),
            "seconds": [s["weight_sync/seconds"] for s in stats],
            "gbps": spread(gbps),
            "fraction_of_memcpy": spread([g / mem["median"] for g in gbps]),
        }
    shm_keys = [k for k in per_bucket if k != "stream_only_64" and not k.startswith("p2p_")]
    best_key = max(shm_keys, key=lambda k: per_bucket[k]["gbps"]["median"])
    best_p2p = max((k for k in per_bucket if k.startswith("p2p_")), key=lambda k: per_bucket[k]["gbps"]["median"])
    results = {
        "memcpy_gbps": mem,
        "per_bucket_mib": per_bucket,
        "best_bucket_mib": best_key,
        "best_fraction_of_memcpy": per_bucket[best_key]["fraction_of_memcpy"]["median"],
        "target_fraction_of_memcpy": 0.25,
        "best_p2p_bucket_mib": best_p2p,
        "best_p2p_fraction_of_memcpy": per_bucket[best_p2p]["fraction_of_memcpy"]["median"],
        "max_abs_logprob_diff_engine_vs_megatron": res["max_abs_logprob_diff"],
    }
    path = rec.write(results, out_dir)
    log(f"[{NAME}] memcpy {mem['median']:.2f} GB/s; " + ", ".join(
        f"{k} MiB {v['gbps']['median']:.3f} GB/s" for k, v in per_bucket.items())
        + f"; best {best_key} MiB = {results['best_fraction_of_memcpy']:.3f} of memcpy (shm), "
          f"p2p best {results['best_p2p_fraction_of_memcpy']:.3f}; "
          f"logprob diff {res['max_abs_logprob_diff']:.1e} -> {path}")
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--buckets-mib", type=float, nargs="+", default=list(DEFAULT_BUCKETS_MIB))
    a = ap.parse_args(argv)
    run(a.out, buckets_mib=a.buckets_mib, repeats=a.repeats)


if __name__ == "__main__":
    main()
