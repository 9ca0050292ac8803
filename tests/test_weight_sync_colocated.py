"""Colocated SGLang pushes with one sender per GPU (erpd_megatron/rollout/colocated.py), on CPU.

The choice of the path is pure; the transport runs in a gloo world of 2 (TP = 2) into the in-test server with
TP = 2, each trainer rank standing for the GPU of one server TP rank (CPU tensors travel as shared-memory
handles instead of CUDA IPC): the server receives every tensor, and its two TP ranks' payloads come from two
different processes (not rank 0's copy twice, which is what ``receivers="rank0"`` sends).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from dist_utils import run_distributed

from erpd_megatron.config import RolloutConfig
from erpd_megatron.rollout import colocated


def test_choice_of_the_per_gpu_path():
    colo = RolloutConfig(engine="sglang", sglang_weight_transport="tensor")
    assert colocated.choose_receivers(colo, cuda=True) == "per_gpu"
    assert colocated.choose_receivers(colo, cuda=False) == "rank0"  # CPU servers: rank 0 sends
    for other in (RolloutConfig(engine="local"), RolloutConfig(engine="sglang", sglang_weight_transport="distributed"),
                  RolloutConfig(engine="sglang", sglang_weight_transport="disk"),
                  RolloutConfig(engine="sglang", sglang_urls=["http://r:30000"])):  # attached: not colocated
        assert colocated.choose_receivers(other, cuda=True) == "rank0"
    assert colocated.server_gpus(2, 2, 2) == [[2, 3], [4, 5]]
    # ranks 0-3 on node a (GPUs 0-3), 4-7 on node b: only node a's GPUs can feed the servers launched there
    owners = colocated.owners_from([("a", g) for g in range(4)] + [("b", g) for g in range(4)])
    assert owners == {0: 0, 1: 1, 2: 2, 3: 3}
    assert colocated.missing_gpus(owners, colocated.server_gpus(0, 4, 2)) == [4, 5, 6, 7]
    assert colocated.missing_gpus(owners, colocated.server_gpus(0, 2, 2)) == []


CFG = dict(family="qwen3", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
           ffn_hidden_size=48, tie_embeddings=False, rope_theta=10000.0)


def _world(rank, tmp):
    from erpd_megatron.megatron.engine import PolicyEngine
    from erpd_megatron.megatron.model import ModelConfig
    from erpd_megatron.megatron.parallel import ParallelConfig, init_parallel
    from erpd_megatron.rollout.sglang_engine import LaunchSpec, SGLangEngine, http_json
    from erpd_megatron.rollout.weight_sync import iter_hf_buckets

    sys.path.insert(0, str(Path(__file__).parent))
    from sglang_env import REPO, free_port

    par = ParallelConfig(tp=2)
    init_parallel(par, seed=5)
    policy = PolicyEngine(ModelConfig(**CFG), par, trainable=False)
    want = {n: t.clone() for b in iter_hf_buckets(policy, receivers="all") for n, t in b}
    eng = None
    if rank == 0:
        spec = LaunchSpec(model_path="unused", tp=2, base_port=free_port(), log_dir=tmp, startup_timeout=120,
                          command=(sys.executable, str(Path(__file__).with_name("fake_sglang_server.py")),
                                   "--port", "{port}", "--tp", "2"), env={"PYTHONPATH": str(REPO)})
        eng = SGLangEngine(launch=spec, control_timeout=120, health_timeout=5)
    owners = colocated.owners_from([("host", 0), ("host", 1)])  # "GPU" r = trainer rank r
    colocated.push_per_gpu(policy, eng, 6, owners=owners, gpus=[[0, 1]], bucket_bytes=8 * 1024)
    if rank != 0:
        return None
    try:
        path = f"{tmp}/dump.pt"
        http_json(eng.servers[0].url, "POST", "/_dump_weights", {"path": path})
        got = torch.load(path)
        _, ev = http_json(eng.servers[0].url, "GET", "/_events")
        updates = [e for e in ev["events"] if e["event"] == "update_weights_from_tensor"]
        return {"same": sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in want),
                "n_updates": len(updates), "distinct": all(len(set(e["digests"])) == 2 for e in updates),
                "version": ev["weight_version"], "session": [e["event"] for e in ev["events"]
                                                             if "weight_update" in e["event"]]}
    finally:
        eng.shutdown()


def test_per_gpu_push_into_the_in_test_server(tmp_path):
    r = run_distributed(_world, world_size=2, args=(str(tmp_path),), timeout=600)[0]
    assert r["same"] and r["n_updates"] > 1 and r["version"] == "6", r
    assert r["distinct"], r  # TP rank 0 and 1 got handles from different trainer processes
    assert r["session"] == ["begin_weight_update", "end_weight_update"], r
