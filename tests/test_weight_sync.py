"""Megatron (TP=2 x PP=2, CPU gloo) -> rollout engines through erpd_megatron.rollout.weight_sync.

One spawned world of 4 ranks (start-up dominates on 2 cores):
- receivers="rank0": rank 0 streams into a LocalEngine (transformers Qwen3, different random init)
  with a small bucket cap; the engine's token log-probs on fixed sequences then equal Megatron's
  ``forward_logprobs`` within 1e-4 (fp32), and no bucket exceeded the cap (peak measured);
- receivers="all": every rank yields the same tensors as rank 0's "rank0" stream;
- rank 0 also pushes the stream into the fake SGLang server (tests/fake_sglang_server.py, TP=2)
  with the flattened-bucket wire format; the tensors it reconstructs equal the streamed ones.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed

CFG = dict(family="qwen3", vocab_size=250, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
           ffn_hidden_size=96, tie_embeddings=False, rope_theta=10000.0)
CAP = 48 * 1024  # bytes: several buckets; the largest HF tensor (250 x 64 fp32 = 64000 B) exceeds it on purpose


def _batch():
    g = torch.Generator().manual_seed(3)
    B, T = 3, 16
    ids = torch.randint(0, CFG["vocab_size"], (B, T), generator=g)
    lens = torch.tensor([16, 11, 7])
    am = (torch.arange(T)[None] < lens[:, None]).long()
    rm = am.clone()
    rm[:, :4] = 0
    return dict(input_ids=ids * am, attention_mask=am, response_mask=rm)


def _world(rank, tmp):
    from erpd_megatron.megatron.engine import PolicyEngine
    from erpd_megatron.megatron.model import ModelConfig
    from erpd_megatron.megatron.parallel import ParallelConfig, init_parallel
    from erpd_megatron.rollout.weight_sync import iter_hf_buckets, sync_weights

    par = ParallelConfig(tp=2, pp=2)
    init_parallel(par, seed=11)
    cfg = ModelConfig(**CFG)
    policy = PolicyEngine(cfg, par, trainable=False)
    batch = _batch()
    out: dict = {}

    # receivers="rank0" into a LocalEngine (rank 0), counting bucket sizes.
    local = None
    if rank == 0:
        from erpd_megatron.rollout.local_engine import LocalEngine

        local = LocalEngine.from_config(cfg.to_hf(), seed=99)
        before = local.compute_logprobs(batch["input_ids"], batch["attention_mask"])
    sizes: list[tuple[int, int]] = []
    streamed: dict = {}

    class Recorder:
        def update_weights(self, buckets, version):
            def rec():
                for b in buckets:
                    sizes.append((sum(t.numel() * t.element_size() for _, t in b), len(b)))
                    streamed.update({n: t.clone() for n, t in b})
                    yield b
            local.update_weights(rec(), version)

    stats = sync_weights(policy, Recorder() if rank == 0 else None, version=1, receivers="rank0", bucket_bytes=CAP)
    mlp_lp = policy.forward_logprobs(batch)  # collective: every rank
    if rank == 0:
        eng_lp = local.compute_logprobs(batch["input_ids"], batch["attention_mask"])
        m = batch["attention_mask"].bool()
        out.update(diff=float((eng_lp - mlp_lp)[m].abs().max()), diff_before=float((before - mlp_lp)[m].abs().max()),
                   sizes=sizes, stats=stats, names=list(streamed), version=local.weight_version)
    else:
        out.update(sizes=sizes)

    # receivers="all": every rank gets the same tensors.
    got = {n: t for b in iter_hf_buckets(policy, receivers="all", bucket_bytes=CAP) for n, t in b}
    out["all"] = {n: t.clone() for n, t in got.items()}
    if rank == 0:
        out["rank0"] = streamed

    # rank 0 pushes the same stream into the fake SGLang server (flattened buckets, TP=2 payloads).
    if rank == 0:
        out["sglang"] = _push_to_fake_sglang(policy, tmp)
    else:
        for _ in iter_hf_buckets(policy, receivers="rank0", bucket_bytes=CAP):
            pass
    return _np(out)


def _push_to_fake_sglang(policy, tmp, tp=2):
    import torch.multiprocessing as tmp_mp

    from erpd_megatron.rollout.sglang_engine import LaunchSpec, SGLangEngine, http_json
    from erpd_megatron.rollout.weight_sync import iter_hf_buckets

    sys.path.insert(0, str(Path(__file__).parent))
    from test_sglang_engine import free_port

    tmp_mp.set_sharing_strategy("file_system")  # see test_sglang_engine.shm_by_filename
    repo = str(Path(__file__).resolve().parents[1])
    spec = LaunchSpec(model_path="unused", tp=tp, base_port=free_port(),
                      command=(sys.executable, str(Path(__file__).with_name("fake_sglang_server.py")),
                               "--port", "{port}", "--tp", str(tp)),
                      env={"PYTHONPATH": repo}, log_dir=str(tmp), startup_timeout=60)
    with SGLangEngine(launch=spec, control_timeout=60, health_timeout=5) as eng:
        eng.update_weights(iter_hf_buckets(policy, receivers="rank0", bucket_bytes=CAP), version=5)
        path = os.path.join(tmp, "sgl_dump.pt")
        http_json(eng.servers[0].url, "POST", "/_dump_weights", {"path": path})
        return torch.load(path)


def _np(d: dict) -> dict:
    """Tensors -> numpy: a tensor returned through the spawn queue would be shared memory that dies with its rank."""
    return {k: (_np(v) if isinstance(v, dict) else v.numpy() if isinstance(v, torch.Tensor) else v)
            for k, v in d.items()}


def test_tp2_pp2_stream_into_local_engine_and_fake_sglang(tmp_path):
    res = run_distributed(_world, world_size=4, args=(str(tmp_path),), timeout=600)
    r0 = res[0]
    assert r0["diff_before"] > 1e-2  # the engine really started from other weights
    assert r0["diff"] < 1e-4, r0["diff"]
    assert r0["version"] == 1
    # Every HF tensor of a Qwen3ForCausalLM, vocabulary padding removed.
    assert len(r0["names"]) == len(set(r0["names"])) == 3 + 4 * 11
    assert r0["rank0"]["model.embed_tokens.weight"].shape == (250, 64)
    assert r0["rank0"]["lm_head.weight"].shape == (250, 64)
    # Bucket cap: several buckets; none above the cap unless it is a single oversized tensor.
    assert len(r0["sizes"]) > 5
    assert all(b <= CAP or n == 1 for b, n in r0["sizes"])
    assert r0["stats"]["weight_sync/peak_bucket_bytes"] == max(b for b, _ in r0["sizes"])
    assert all(not r["sizes"] for r in res[1:])  # "rank0": nobody else received anything
    # "all": identical tensors on every rank.
    for r in res:
        assert set(r["all"]) == set(r0["rank0"])
        for n, t in r0["rank0"].items():
            assert (r["all"][n] == t).all(), n
    # The fake SGLang server reconstructed exactly the streamed tensors.
    assert set(r0["sglang"]) == set(r0["rank0"])
    for n, t in r0["rank0"].items():
        assert (r0["sglang"][n] == t).all() and r0["sglang"][n].dtype == t.dtype, n


def _dp_world(rank, tmp, tp):
    """TP=tp x DP=2: every rank runs sync_weights(receivers="rank0") (the DP>1 hang: DP-1 ranks left
    before the world-wide owner exchange); rank 0 feeds a LocalEngine, then the fake SGLang server,
    whose received tensors are loaded into a second LocalEngine."""
    from erpd_megatron.megatron.engine import PolicyEngine
    from erpd_megatron.megatron.model import ModelConfig
    from erpd_megatron.megatron.parallel import ParallelConfig, init_parallel
    from erpd_megatron.rollout.local_engine import LocalEngine
    from erpd_megatron.rollout.weight_sync import iter_hf_buckets, sync_weights

    par = ParallelConfig(tp=tp, dp=2)
    init_parallel(par, seed=11)
    cfg = ModelConfig(**{**CFG, "num_layers": 2})
    policy = PolicyEngine(cfg, par, trainable=False)
    batch = _batch()
    local = LocalEngine.from_config(cfg.to_hf(), seed=99) if rank == 0 else None
    sync_weights(policy, local, version=1, receivers="rank0", bucket_bytes=CAP)
    mlp_lp = policy.forward_logprobs(batch)  # same batch on both replicas
    out: dict = {"n_all": sum(len(b) for b in iter_hf_buckets(policy, receivers="all", bucket_bytes=CAP))}
    if rank == 0:
        dumped = _push_to_fake_sglang(policy, tmp, tp=tp)
        via_sglang = LocalEngine.from_config(cfg.to_hf(), seed=98)
        via_sglang.update_weights(iter([list(dumped.items())]), version=2)
        m = batch["attention_mask"].bool()
        for key, eng in (("local", local), ("sglang", via_sglang)):
            lp = eng.compute_logprobs(batch["input_ids"], batch["attention_mask"])
            out[key] = float((lp - mlp_lp)[m].abs().max())
        out["n_sglang"] = len(dumped)
    else:
        for _ in iter_hf_buckets(policy, receivers="rank0", bucket_bytes=CAP):
            pass
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_dp2_rank0_stream_into_local_engine_and_fake_sglang(tmp_path, tp):
    """TP=1 x DP=2 (world 2) and TP=2 x DP=2 (world 4): no hang, and the engines' log-probs equal
    Megatron's (fp32, 1e-4) whether the weights arrive directly or through the SGLang wire format."""
    res = run_distributed(_dp_world, world_size=2 * tp, args=(str(tmp_path), tp), timeout=600)
    r0 = res[0]
    assert r0["local"] < 1e-4 and r0["sglang"] < 1e-4, r0
    assert r0["n_sglang"] == 3 + 2 * 11
    assert all(r["n_all"] == 3 + 2 * 11 for r in res)


def _shm_world(rank):
    """TP=2 on one host (gloo): the default "rank0" stream takes the shared-memory transport, and it
    yields bit-identical tensors to the point-to-point path, in the same buckets (fp32 and bf16 casts,
    copy=True and the default views)."""
    from erpd_megatron.megatron.engine import PolicyEngine
    from erpd_megatron.megatron.model import ModelConfig
    from erpd_megatron.megatron.parallel import ParallelConfig, init_parallel
    from erpd_megatron.rollout import weight_sync as ws
    from erpd_megatron.rollout import weight_sync_shm as shm_mod

    ring_bytes = shm_mod.RING_BYTES
    par = ParallelConfig(tp=2)
    init_parallel(par, seed=11)
    policy = PolicyEngine(ModelConfig(**{**CFG, "num_layers": 2}), par, trainable=False)
    out: dict = {}
    for key, kw in (("fp32", {}), ("bf16", {"dtype": torch.bfloat16}), ("copy", {"copy": False})):
        runs = {}
        # twice through shm: the reused arena must give the same result; the second time with a ring of
        # arena of 2 x the largest bucket (RING_BYTES=0), so places are reused within the stream
        for shm, ring in ((None, None), (False, None), (None, 0)):
            shm_mod.RING_BYTES = ring if ring is not None else ring_bytes
            # float64 numpy: exact for fp32 and bf16; tensors through the spawn queue would die with the rank
            buckets = [[(n, str(t.dtype), t.double().numpy().copy()) for n, t in b]
                       for b in ws.iter_hf_buckets(policy, receivers="rank0", bucket_bytes=CAP, shm=shm, **kw)]
            runs.setdefault(str(shm), []).append((buckets, ws.last_transport()))
        out[key] = runs
    import glob
    out["leftover"] = glob.glob(f"/dev/shm/erpd_wsync_{os.getpid()}_*")
    return out


def test_shm_transport_taken_and_bit_equal_to_p2p():
    res = run_distributed(_shm_world, world_size=2, timeout=300)
    r0 = res[0]
    for key in ("fp32", "bf16", "copy"):
        (p2p, tr_p2p), = r0[key]["False"]
        assert tr_p2p == "p2p"
        assert len(p2p) > 3
        for shm, tr in r0[key]["None"]:
            assert tr == "shm"
            assert [[n for n, *_ in b] for b in shm] == [[n for n, *_ in b] for b in p2p]  # same buckets
            for bs, bp in zip(shm, p2p):
                for (n, da, a), (_, db, b) in zip(bs, bp):
                    assert da == db and a.shape == b.shape and (a == b).all(), (key, n)
    assert all(not r["fp32"]["None"][0][0] for r in res[1:])  # only rank 0 yields
    assert not r0["leftover"]  # the arena file is unlinked once mapped


def test_shm_ring_places_never_overlap_a_bucket_still_in_use():
    """``ring``: every bucket lies inside the arena, and bucket b shares no byte with any bucket after
    dep[b] (those may still be held by the consumer or written by a sender when b is released)."""
    from erpd_megatron.rollout import weight_sync_shm as m

    g = torch.Generator().manual_seed(0)
    for ring_bytes in (0, 1000, 1 << 20):
        m_ring, m.RING_BYTES = m.RING_BYTES, ring_bytes
        try:
            sizes = (torch.randint(1, 50, (200,), generator=g) * 64).tolist()
            offsets, dep, size = m.ring(sizes)
        finally:
            m.RING_BYTES = m_ring
        assert size >= max(ring_bytes, 2 * max(sizes))
        for b, (o, n) in enumerate(zip(offsets, sizes)):
            assert 0 <= o and o + n <= size and -1 <= dep[b] < b
            for j in range(dep[b] + 1, b):
                assert offsets[j] + sizes[j] <= o or o + n <= offsets[j], (b, j)
            if dep[b] >= 0:  # dep is a real overlap (not needlessly late)
                d = dep[b]
                assert offsets[d] < o + n and o < offsets[d] + sizes[d]
