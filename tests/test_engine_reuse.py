"""Engine reuse between stages (PolicyEngine.reset, Context.new_policy / release, model.reuse_engines).

A reused engine must be indistinguishable from a fresh build loaded from the same checkpoint: same log-probs and,
after the same train steps, the same parameters, bit for bit (same process, same ops: equal by construction). The
previous owner trains with a much larger LR first, so Adam moments or step counts left behind would show; a
control run that skips the optimizer reset shows that they do. fp32 (main params are the model params) and bf16
(main params are fp32 copies refreshed on load). One spawned world of 1 with a tiny model (a few seconds)."""

import pytest
import torch
from dist_utils import response_loss as _loss
from dist_utils import run_distributed
from dist_utils import toy_batch as _batch

CFG = dict(family="qwen3", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
           ffn_hidden_size=64, tie_embeddings=True, rope_theta=10000.0)
STEPS = 3


def _params(e):
    return {n: p.detach().float().clone() for n, p in e.named_parameters_global()}


def _after_training(e, batch):
    """(log-probs before, parameters and log-probs after STEPS train steps, lr of each step)."""
    lp0 = e.forward_logprobs(batch)
    lrs = [e.train_step(batch, _loss)["train/lr"] for _ in range(STEPS)]
    return lp0, _params(e), e.forward_logprobs(batch), lrs


def _groups(e):
    """The optimizer's param groups (all but the params) and config values an OptimConfig sets."""
    return [({k: v for k, v in g.items() if k != "params"}, o.config.lr, o.config.min_lr, o.config.weight_decay)
            for o in e.optimizer.chained_optimizers for g in o.optimizer.param_groups]


def _same(a, b) -> bool:
    lp0a, pa, lpa, lra = a
    lp0b, pb, lpb, lrb = b
    return (torch.equal(lp0a, lp0b) and torch.equal(lpa, lpb) and lra == lrb and pa.keys() == pb.keys()
            and all(torch.equal(pa[k], pb[k]) for k in pa))


def _world(rank, tmp):
    from erpd_megatron.megatron.engine import OptimConfig, PolicyEngine
    from erpd_megatron.megatron.model import BuildOptions, ModelConfig
    from erpd_megatron.megatron.parallel import ParallelConfig, init_parallel

    par = ParallelConfig()
    init_parallel(par, seed=0)
    out = {}
    batch, other = _batch(0), _batch(1)
    new = OptimConfig(lr=1e-3, min_lr=1e-3, warmup_steps=2, micro_batch_size=2)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        opts = BuildOptions(dtype=dtype)

        def build(optim, temperature=1.0, opts=opts):
            return PolicyEngine(ModelConfig(**CFG), par, optim, opts, seed=0, temperature=temperature)

        ck = f"{tmp}/{name}_ck"
        src = build(OptimConfig(lr=1e-2))
        src.train_step(other, _loss)  # the checkpoint differs from a fresh init
        src.save(ck)
        del src

        # the previous owner: another checkpoint's weights, 4 steps at 50x the LR, another temperature
        used = build(OptimConfig(lr=5e-2, micro_batch_size=4), temperature=1.3)
        used.train_step(other, _loss)
        used.save(f"{tmp}/{name}_other")
        for _ in range(3):
            used.train_step(other, _loss)
        used.trainer_state = {"position": 7}
        used.reset(new, temperature=0.7)
        used.load(ck, model_only=True)
        out[f"{name}_state"] = (used.step, used.trainer_state, used.temperature, used.generation, used.lr)
        reused = _after_training(used, batch)

        fresh = build(new, temperature=0.7)
        fresh.load(ck, model_only=True)
        out[f"{name}_fresh_state"] = (fresh.step, fresh.trainer_state, fresh.temperature, fresh.generation, fresh.lr)
        out[f"{name}_equal"] = _same(reused, _after_training(fresh, batch))
        out[f"{name}_groups_equal"] = _groups(used) == _groups(fresh)

        # resume: a full checkpoint (optimizer state included) of the fresh engine loads into a reused one built with
        # another LR (megatron pairs param groups by their max_lr / min_lr), and the next step is the same
        fresh.save(f"{tmp}/{name}_trained")
        used.reset(new)
        used.load(f"{tmp}/{name}_trained")
        out[f"{name}_resumed_step"] = used.step
        used.train_step(batch, _loss)
        fresh.train_step(batch, _loss)
        out[f"{name}_resumed_equal"] = all(torch.equal(a, b) for a, b in zip(_params(used).values(),
                                                                          _params(fresh).values()))
        used.save(f"{tmp}/{name}_reused_saved")  # and the reused engine's checkpoint loads into a fresh build
        back = build(new)
        back.load(f"{tmp}/{name}_reused_saved")
        out[f"{name}_loaded_back_step"] = back.step

        # control: the same reuse without clearing the optimizer -> stale Adam moments / step counts change the steps
        stale = build(OptimConfig(lr=5e-2, micro_batch_size=4), temperature=1.3)
        for _ in range(4):
            stale.train_step(other, _loss)
        stale.optim_cfg, stale.temperature, stale.step = new, 0.7, 0
        stale._set_lr()
        stale.load(ck, model_only=True)
        fresh2 = build(new, temperature=0.7)
        fresh2.load(ck, model_only=True)
        out[f"{name}_stale_equal"] = _same(_after_training(stale, batch), _after_training(fresh2, batch))

    # construction-time optimizer settings cannot be reset
    e = PolicyEngine(ModelConfig(**CFG), par, OptimConfig(lr=1e-3), seed=0)
    try:
        e.reset(OptimConfig(lr=1e-3, clip_grad=0.5))
        out["baked"] = None
    except ValueError as err:
        out["baked"] = str(err)
    out["pool"] = _pool(tmp, par, batch)
    return out


def _world_layout(rank, tmp, kw):
    """The reuse comparison on several ranks (DP: the DistributedOptimizer shards the Adam state over the ranks):
    a reused engine after reset + load vs a fresh build, log-probs and parameters after STEPS steps."""
    from erpd_megatron.megatron.engine import OptimConfig, PolicyEngine
    from erpd_megatron.megatron.model import ModelConfig
    from erpd_megatron.megatron.parallel import ParallelConfig, init_parallel

    par = ParallelConfig(**kw)
    init_parallel(par, seed=0)
    batch, other = _batch(0), _batch(1)
    new = OptimConfig(lr=1e-3, min_lr=1e-3, warmup_steps=2, micro_batch_size=2)

    def build(optim):
        return PolicyEngine(ModelConfig(**CFG), par, optim, seed=0)

    src = build(OptimConfig(lr=1e-2))
    src.train_step(other, _loss)
    src.save(f"{tmp}/ck")
    used = build(OptimConfig(lr=5e-2, micro_batch_size=4))
    for _ in range(3):
        used.train_step(other, _loss)
    used.reset(new)
    used.load(f"{tmp}/ck", model_only=True)
    fresh = build(new)
    fresh.load(f"{tmp}/ck", model_only=True)
    return _same(_after_training(used, batch), _after_training(fresh, batch))


def _pool(tmp, par, batch):
    """Context.new_policy / release with reuse on and off."""
    from pathlib import Path

    from erpd_megatron.config import load_config
    from erpd_megatron.megatron.model import ModelConfig
    from erpd_megatron.pipeline.context import Context
    from erpd_megatron.pipeline.rundir import RunDir

    ck = Path(f"{tmp}/fp32_ck")
    res = {}
    for reuse in (True, False):
        cfg = load_config(None, [f"model.reuse_engines={str(reuse).lower()}", "model.micro_batch_size=2"])
        ctx = Context(cfg=cfg, run=RunDir(Path(tmp) / f"run_{reuse}"), base_hf=Path(tmp), tokenizer=None,
                      model_cfg=ModelConfig(**CFG), _par=par)
        a = ctx.new_policy(init=ck)  # stage 1
        b = ctx.new_policy(lr=1e-3, init=ck)  # built while `a` is in use: never `a`
        r = {"a_is_b": a is b, "built_two_live": ctx.engines_built}
        ctx.release(a)
        c = ctx.new_policy(lr=1e-3, init=ck)  # stage 2
        r.update(c_is_a=c is a, built=ctx.engines_built, generation=c.generation, idle=len(ctx._idle))
        ctx.release(b)
        if reuse:
            try:
                b.forward_logprobs(batch)
                r["use_after_release"] = None
            except RuntimeError as err:
                r["use_after_release"] = str(err)
            try:
                ctx.release(b)
                r["double_release"] = None
            except RuntimeError as err:
                r["double_release"] = str(err)
            ctx.drop_idle()  # b was idle: forgotten, so the next stage builds
            ctx.new_policy(init=ck)
            r["built_after_drop"] = ctx.engines_built
        res[reuse] = r
    return res


@pytest.fixture(scope="module")
def res(tmp_path_factory):
    return run_distributed(_world, 1, args=(str(tmp_path_factory.mktemp("reuse")),), timeout=400)[0]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_reused_engine_equals_a_fresh_build_bit_for_bit(res, dtype):
    assert res[f"{dtype}_state"][:3] == (0, {}, 0.7) and res[f"{dtype}_state"][3] == 1
    assert res[f"{dtype}_state"] == (*res[f"{dtype}_fresh_state"][:3], 1, res[f"{dtype}_fresh_state"][4])
    assert res[f"{dtype}_equal"] and res[f"{dtype}_groups_equal"]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_full_checkpoints_load_across_reused_and_fresh_engines(res, dtype):
    assert res[f"{dtype}_resumed_step"] == STEPS and res[f"{dtype}_resumed_equal"]
    assert res[f"{dtype}_loaded_back_step"] == STEPS + 1


@pytest.mark.parametrize("kw", [{"dp": 2}])  # DistributedOptimizer: each rank holds a shard of the Adam state
def test_reused_engine_equals_a_fresh_build_on_two_ranks(tmp_path, kw):
    assert run_distributed(_world_layout, 2, args=(str(tmp_path), kw), timeout=400) == [True, True]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_comparison_sees_stale_optimizer_state(res, dtype):
    assert not res[f"{dtype}_stale_equal"]


def test_construction_time_optimizer_settings_are_refused(res):
    assert res["baked"] is not None and "fixed at construction" in res["baked"]


def test_pool_reuses_only_released_engines(res):
    """Two stages, one build; an engine in use is never handed out; a released one refuses its old owner."""
    r = res["pool"][True]
    assert not r["a_is_b"] and r["built_two_live"] == 2
    assert r["c_is_a"] and r["built"] == 2 and r["generation"] == 1 and r["idle"] == 0
    assert "released" in r["use_after_release"]
    assert "released already" in r["double_release"]
    assert r["built_after_drop"] == 3


def test_reuse_off_builds_every_time(res):
    r = res["pool"][False]
    assert not r["a_is_b"] and not r["c_is_a"] and r["built"] == 3 and r["generation"] == 0 and r["idle"] == 0


def test_fp8_engines_are_not_reused():
    """TE's FP8 scaling history survives a model-only load of a local-spec checkpoint: never handed out again."""
    from types import SimpleNamespace

    from erpd_megatron.megatron.engine import PolicyEngine
    from erpd_megatron.megatron.model import BuildOptions

    fake = SimpleNamespace(build_opts=BuildOptions(fp8="hybrid"), _optimizers=lambda: [])
    assert not PolicyEngine.reusable.fget(fake)
    assert PolicyEngine.reusable.fget(SimpleNamespace(build_opts=BuildOptions(), _optimizers=lambda: []))
