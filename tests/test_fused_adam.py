"""Checkpoints and engine reuse with the optimizer megatron-core builds when Transformer Engine is installed.

With TE importable megatron's Adam is TE's FusedAdam: its state_dict() has a dtype only for exp_avg / exp_avg_sq /
master_param, and it keeps the step count in the param group. tests/fused_adam_standin.py models it on the CPU and
`install()` makes megatron use it as on a GPU with TE. One spawned world of 1 with a tiny model, fp32:
- resume: an engine trained 2 steps is saved with its optimizer; a fresh build loads it (a KeyError on the per-param
  'step' before checkpoint._init_empty_optimizer_state followed megatron's own initialiser) and its next step equals
  the uninterrupted engine's bit for bit; the group step survives a second save / load round trip;
- reuse: an engine used for 3 steps at a 50x LR, reset and reloaded, then trained, equals a fresh build loaded from the
  same checkpoint bit for bit, param groups included (before PolicyEngine.reset cleared `group["step"]`, the reused
  engine's first update used the old engine's bias correction);
- gpu_smoke.sh's checks of the same two (bench/gpu_smoke_te.py) pass, and the reuse check's control fires.
"""

import pytest
import torch
from dist_utils import response_loss as _loss
from dist_utils import run_distributed
from dist_utils import toy_batch as _batch

CFG = dict(family="qwen3", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
           ffn_hidden_size=64, tie_embeddings=True, rope_theta=10000.0)


def _params(e):
    return {n: p.detach().clone() for n, p in e.named_parameters_global()}


def _equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _inner(e):
    return [o.optimizer for o in e.optimizer.chained_optimizers]


def _group_steps(e):
    return [g.get("step") for opt in _inner(e) for g in opt.param_groups if g["params"]]


def _groups(e):
    return [{k: v for k, v in g.items() if k != "params"} for opt in _inner(e) for g in opt.param_groups]


def _world(rank, tmp):
    import fused_adam_standin

    fused_adam_standin.install()  # before init_parallel (apply_mcore_fixes reads megatron's TE flag)
    from erpd_megatron.megatron.engine import OptimConfig, PolicyEngine
    from erpd_megatron.megatron.model import ModelConfig
    from erpd_megatron.megatron.parallel import ParallelConfig, init_parallel

    par = ParallelConfig()
    init_parallel(par, seed=0)
    batch, other = _batch(0), _batch(1)
    out = {}

    def build(optim):
        return PolicyEngine(ModelConfig(**CFG), par, optim, seed=0)

    # ---------------------------------------------------------------- resume with the optimizer loaded
    optim = OptimConfig(lr=1e-2, min_lr=1e-2, micro_batch_size=2)
    a = build(optim)
    out["optimizer_class"] = sorted({type(o).__name__ for o in _inner(a)})
    for _ in range(2):
        a.train_step(other, _loss)
    out["per_param_keys"] = sorted({k for o in _inner(a) for st in o.state.values() for k in st})
    a.save(f"{tmp}/full")
    b = build(optim)
    try:
        b.load(f"{tmp}/full")
        out["load_error"] = None
    except Exception as e:  # noqa: BLE001 - the failure mode under test
        out["load_error"] = f"{type(e).__name__}: {e}"
        return out
    out["loaded_steps"] = (b.step, _group_steps(b))
    a.train_step(batch, _loss)
    b.train_step(batch, _loss)
    out["resume_equal"] = _equal(_params(a), _params(b))
    out["after_steps"] = (_group_steps(a), _group_steps(b))
    b.save(f"{tmp}/again")  # round trip: the loaded engine's checkpoint loads into a fresh build
    c = build(optim)
    c.load(f"{tmp}/again")
    out["round_trip_steps"] = (c.step, _group_steps(c))
    c.train_step(other, _loss)
    b.train_step(other, _loss)
    out["round_trip_equal"] = _equal(_params(b), _params(c))
    del a, b, c

    # ---------------------------------------------------------------- reuse vs a fresh build
    new = OptimConfig(lr=1e-3, min_lr=1e-3, warmup_steps=2, micro_batch_size=2)
    src = build(OptimConfig(lr=1e-2))
    src.train_step(other, _loss)
    src.save(f"{tmp}/ck")
    used = build(OptimConfig(lr=5e-2, micro_batch_size=4))
    for _ in range(3):
        used.train_step(other, _loss)
    out["used_steps"] = _group_steps(used)
    used.reset(new)
    used.load(f"{tmp}/ck", model_only=True)
    fresh = build(new)
    fresh.load(f"{tmp}/ck", model_only=True)
    out["reset_groups_equal"] = _groups(used) == _groups(fresh)
    for _ in range(3):
        used.train_step(batch, _loss)
        fresh.train_step(batch, _loss)
    out["reuse_equal"] = _equal(_params(used), _params(fresh))
    out["reuse_steps"] = (_group_steps(used), _group_steps(fresh))
    del used, fresh

    # ---------------------------------------------------------------- gpu_smoke.sh's checks 5 and 6 on the stand-in
    from erpd_megatron.bench import gpu_smoke_te as smoke_te
    from erpd_megatron.bench.gpu_smoke import _batch as smoke_batch

    def sbuild(lr):
        return build(OptimConfig(lr=lr, min_lr=lr, micro_batch_size=4))

    sb, so = smoke_batch(ModelConfig(**CFG), torch.device("cpu"), T=13), smoke_batch(ModelConfig(**CFG),
                                                                                   torch.device("cpu"), T=13, seed=2)
    out["smoke_resume"] = smoke_te.check_optimizer_resume(sbuild, sb, so, tmp)
    out["smoke_reuse"] = smoke_te.check_reuse_vs_fresh(sbuild, sb, so, tmp)
    return out


@pytest.fixture(scope="module")
def res(tmp_path_factory):
    return run_distributed(_world, 1, args=(str(tmp_path_factory.mktemp("fused_adam")),), timeout=400)[0]


def test_megatron_runs_the_standin_like_fused_adam(res):
    assert res["optimizer_class"] == ["FusedAdamStandIn"]
    assert res["per_param_keys"] == ["exp_avg", "exp_avg_sq"]  # no per-parameter step: it is in the group


def test_resume_loads_the_optimizer_and_continues_exactly(res):
    assert res["load_error"] is None, res["load_error"]
    assert res["loaded_steps"][0] == 2 and set(res["loaded_steps"][1]) == {2}
    assert res["resume_equal"]
    assert res["after_steps"] == ([3] * len(res["after_steps"][0]),) * 2
    assert res["round_trip_steps"][0] == 3 and set(res["round_trip_steps"][1]) == {3}
    assert res["round_trip_equal"]


def test_reused_engine_equals_a_fresh_build(res):
    assert set(res["used_steps"]) == {3}
    assert res["reset_groups_equal"]  # no group "step" left behind
    assert res["reuse_equal"]
    assert res["reuse_steps"][0] == res["reuse_steps"][1]


def test_standin_refuses_a_per_parameter_step_like_te():
    from fused_adam_standin import FusedAdamStandIn

    p = torch.nn.Parameter(torch.ones(3))
    opt = FusedAdamStandIn([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    assert opt.param_groups[0]["step"] == 1 and sorted(opt.state[p]) == ["exp_avg", "exp_avg_sq"]
    opt.state_dict()  # fine
    opt.state[p]["step"] = torch.zeros(())
    with pytest.raises(KeyError, match="step"):
        opt.state_dict()


def test_gpu_smoke_te_checks_pass_and_their_control_fires(res):
    """scripts/gpu_smoke.sh's optimizer_resume / reuse_vs_fresh (bench/gpu_smoke_te.py) with FusedAdam's behaviour:
    both pass, and the reuse check's control (the group step left behind, as before the fix) is caught."""
    r, u = res["smoke_resume"], res["smoke_reuse"]
    assert r["pass"] and r["optimizer"] == ["FusedAdamStandIn"] and r["update_rel_err"] == 0.0, r
    assert u["pass"] and u["optimizer_keeps_group_step"] and u["update_rel_err"] == 0.0, u
    assert u["control_rel_err"] > 2 * u["tolerance"], u
