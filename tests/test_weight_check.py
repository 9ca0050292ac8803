"""The weights-arrived guard (rollout/weight_check.py, Context.push_weights / verify_sync, score_logprobs).

One spawned world of 2 (TP=2, CPU gloo) with a small random Qwen3 (init std 0.05 so one wrong tensor moves the
log-probs far past fp32's 1e-3 tolerance). Rank 0 owns the rollout engines:
- LocalEngine: a correct sync passes (max |diff| ~1e-6); a sync whose stream has one tensor altered in flight (the final
  norm zeroed; one MLP weight negated) raises WeightSyncMismatch on both ranks, naming the sync, the version and the
  largest difference; through Context.push_weights the same, with the check timed as the "weight_verify" stage;
- the fake SGLang server (tests/fake_sglang_server.py --hf-config: a transformers model holding the received tensors,
  answering sglang 0.5.23's prefill-only input_token_logprobs): the same pass / fail over the tensor transport.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed

CFG = dict(family="qwen3", vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
           ffn_hidden_size=96, tie_embeddings=False, rope_theta=10000.0, init_std=0.05)


def _probe():
    from erpd_megatron.rollout.weight_check import Probe

    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, CFG["vocab_size"], (n,), generator=g).tolist() for n in (17, 9, 23)]
    return Probe(seqs, [1, 4, 10])


def _corrupt(name, how):
    """A stream filter altering one HF tensor in flight."""
    def wrap(buckets):
        for b in buckets:
            yield [(n, how(t) if n == name else t) for n, t in b]
    return wrap


def _try(fn):
    from erpd_megatron.rollout.weight_check import WeightSyncMismatch

    try:
        return {"ok": fn()}
    except WeightSyncMismatch as e:
        return {"error": str(e)}


def _world(rank, tmp):
    from erpd_megatron.megatron.engine import PolicyEngine
    from erpd_megatron.megatron.model import ModelConfig
    from erpd_megatron.megatron.parallel import ParallelConfig, init_parallel
    from erpd_megatron.rollout.weight_check import check_sync
    from erpd_megatron.rollout.weight_sync import iter_hf_buckets

    par = ParallelConfig(tp=2)
    init_parallel(par, seed=3)
    cfg = ModelConfig(**CFG)
    policy = PolicyEngine(cfg, par, trainable=False)
    probe = _probe()
    out: dict = {}

    local = None
    if rank == 0:
        from erpd_megatron.rollout.local_engine import LocalEngine

        local = LocalEngine.from_config(cfg.to_hf(), seed=99)

    def sync_and_check(engine, sync, version, filt=lambda b: b):
        buckets = iter_hf_buckets(policy, receivers="rank0")
        if rank == 0:
            engine.update_weights(filt(buckets), version=version)
        else:
            for _ in buckets:
                pass
        return _try(lambda: check_sync(policy, engine, probe, sync=sync, version=version,
                                       engine_dtype=getattr(engine, "dtype", None), is_main=rank == 0))

    out["local_before"] = _try(lambda: check_sync(policy, local, probe, sync=0, version=None, is_main=rank == 0))
    out["local_ok"] = sync_and_check(local, 1, 1)
    out["local_norm"] = sync_and_check(local, 2, "ce@10", _corrupt("model.norm.weight", torch.zeros_like))
    out["local_mlp"] = sync_and_check(local, 3, 3, _corrupt("model.layers.1.mlp.down_proj.weight", lambda t: -t))
    out["local_again"] = sync_and_check(local, 4, 4)

    # through the pipeline's Context: push_weights checks after the update, timed as "weight_verify"
    from erpd_megatron.config import RunConfig
    from erpd_megatron.pipeline.context import Context
    from erpd_megatron.utils import timing

    timing.reset()
    ctx = Context(cfg=RunConfig(), run=None, base_hf=None, tokenizer=None, model_cfg=cfg)
    ctx._par, ctx._probe, ctx._engine = par, probe, local
    out["ctx_ok"] = _try(lambda: ctx.push_weights(policy, version=7))
    if rank == 0:
        plain = local.update_weights
        local.update_weights = lambda buckets, version: plain(
            _corrupt("model.embed_tokens.weight", lambda t: t.roll(1, 0))(buckets), version)
    out["ctx_bad"] = _try(lambda: ctx.push_weights(policy, version=8))
    ctx.cfg.rollout.verify_weights = False
    out["ctx_off"] = _try(lambda: ctx.push_weights(policy, version=9))
    out["ctx_counts"] = dict(timing.CLOCK.counts)
    out["ctx_syncs"] = ctx.syncs

    # the fake SGLang server, tensor transport
    server = _fake_sglang(cfg, tmp) if rank == 0 else None
    try:
        out["sgl_ok"] = sync_and_check(server, 1, 1)
        out["sgl_bad"] = sync_and_check(server, 2, 2, _corrupt("model.layers.0.self_attn.q_proj.weight",
                                                              lambda t: t.flip(0)))
        out["sgl_again"] = sync_and_check(server, 3, 3)
        if rank == 0:
            with pytest.raises(ValueError, match="temperature must be 1"):
                server.score_logprobs(probe.sequences, probe.prompt_lens, 0.7)
            out["sgl_lens"] = [len(x) for x in server.score_logprobs(probe.sequences, probe.prompt_lens, 1.0)]
    finally:
        if server is not None:
            server.shutdown()
    return out


def _fake_sglang(cfg, tmp):
    import torch.multiprocessing as tmp_mp

    from erpd_megatron.rollout.sglang_engine import LaunchSpec, SGLangEngine

    sys.path.insert(0, str(Path(__file__).parent))
    from test_sglang_engine import free_port

    tmp_mp.set_sharing_strategy("file_system")  # see test_sglang_engine.shm_by_filename
    hf = Path(tmp) / "hf_config"
    hf.mkdir(exist_ok=True)
    (hf / "config.json").write_text(json.dumps(cfg.to_hf()))
    repo = str(Path(__file__).resolve().parents[1])
    spec = LaunchSpec(model_path="unused", base_port=free_port(),
                      command=(sys.executable, str(Path(__file__).with_name("fake_sglang_server.py")),
                               "--port", "{port}", "--vocab", str(CFG["vocab_size"]), "--hf-config", str(hf)),
                      env={"PYTHONPATH": repo}, log_dir=str(tmp), startup_timeout=60)
    return SGLangEngine(launch=spec, control_timeout=60, health_timeout=5)


@pytest.fixture(scope="module")
def res(tmp_path_factory):
    return run_distributed(_world, world_size=2, args=(str(tmp_path_factory.mktemp("wcheck")),), timeout=400)


def test_correct_syncs_pass_with_fp32_agreement(res):
    for r in res:
        for key in ("local_ok", "local_again", "sgl_ok", "sgl_again"):
            assert "ok" in r[key], (key, r[key])
    ok = res[0]["local_ok"]["ok"]
    assert ok["max"] < 1e-4 and ok["tokens"] == 17 - 1 + 9 - 4 + 23 - 10 and ok["dtype"] == "float32"
    assert res[0]["sgl_ok"]["ok"]["dtype"] == "bfloat16"  # an SGLang server does not say: the loose tolerance
    assert res[0]["sgl_lens"] == [16, 5, 13]
    assert res[0]["sgl_ok"]["ok"]["max"] < 1e-4  # the fake server's fp32 model equals the trainer's token by token


def test_engine_with_other_weights_is_refused(res):
    for r in res:  # the random LocalEngine before any sync
        assert "weight sync #0 (version None) did not arrive intact" in r["local_before"]["error"]


@pytest.mark.parametrize("key, sync, version", [("local_norm", 2, "'ce@10'"), ("local_mlp", 3, "3"),
                                                ("sgl_bad", 2, "2")])
def test_one_tensor_corrupted_in_flight_stops_every_rank(res, key, sync, version):
    msgs = [r[key].get("error") for r in res]
    assert msgs[0] and msgs[0] == msgs[1], msgs  # both ranks raise the same error (none hangs in a collective)
    assert f"weight sync #{sync} (version {version}) did not arrive intact" in msgs[0]
    assert "differ from the trainer's by up to" in msgs[0] and "tolerance" in msgs[0]
    assert "stopping before any rollout of this version is used" in msgs[0]


def test_context_push_weights_checks_and_times_it(res):
    for r in res:
        assert "ok" in r["ctx_ok"] and "ok" in r["ctx_off"]  # verify_weights=false: the bad stream goes unnoticed
        assert "weight sync #2 (version 8) did not arrive intact" in r["ctx_bad"]["error"]
        assert r["ctx_counts"]["weight_sync"] == 3 and r["ctx_counts"]["weight_verify"] == 2
        assert r["ctx_syncs"] == 3


def test_helpers():
    from erpd_megatron.rollout.engine import check_score_args
    from erpd_megatron.rollout.weight_check import compare, make_probe, tolerance

    assert tolerance(torch.float32, torch.float32)[:2] == (1e-3, 2e-2)
    assert tolerance(torch.float32, None)[2] == "bfloat16"  # the loosest of the two sides
    assert tolerance(torch.bfloat16, torch.float32, mean_override=0.1)[:2] == pytest.approx((0.1, 2.0))
    p = make_probe([[1], [1, 2, 3], list(range(100)), [4, 5]], n=2, max_len=64)
    assert p.sequences == [[1, 2, 3], list(range(64))] and p.prompt_lens == [1, 1] and p.tokens == 2 + 63
    c = compare([[0.0, -1.0], [-2.0]], [[0.0, -1.5], [-2.1]])
    assert c["max"] == 0.5 and c["where"] == (0, 1) and c["tokens"] == 3
    assert compare([[0.0]], [[float("nan")]])["max"] != compare([[0.0]], [[float("nan")]])["max"]  # NaN kept
    for seqs, lens in (([[1, 2]], [0]), ([[1, 2]], [3]), ([[1, 2]], [1, 1])):
        with pytest.raises(ValueError):
            check_score_args(seqs, lens)


def test_cli_reports_a_mismatch_in_one_line_exit_2(tmp_path, monkeypatch, capsys):
    from erpd_megatron.pipeline import run
    from erpd_megatron.rollout.weight_check import WeightSyncMismatch

    def boom(cfg, stages):
        raise WeightSyncMismatch("weight sync #3 (version 5) did not arrive intact: ...")

    monkeypatch.setattr(run, "_pipeline", boom)
    monkeypatch.setattr(run, "setup_logging", lambda: None, raising=False)
    rc = run.main_collect([f"run_dir={tmp_path / 'r'}"])
    assert rc == 2
    assert capsys.readouterr().err.strip() == "erpd collect: error: weight sync #3 (version 5) did not arrive intact: ..."
