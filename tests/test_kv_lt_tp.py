"""Fewer KV groups than TP ranks in the trainer (issue 12 item 11): a KV=1 model at TP=2 (gloo, CPU) gives the
TP=1 log-probs and gradients on the same weights (megatron-core 0.19.2 all-gathers linear_qkv and shares the
group between the two ranks; our SDPA core attention then sees 1 KV head for 2 local query heads)."""

import torch
from dist_utils import run_distributed

CFG = dict(family="qwen3", vocab_size=200, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=1, head_dim=8,
           ffn_hidden_size=64, tie_embeddings=False)


def _world(rank):
    from megatron.core import parallel_state as ps

    from erpd_megatron.megatron.engine import OptimConfig, PolicyEngine
    from erpd_megatron.megatron.model import BuildOptions, ModelConfig, load_full_state_dict, shard_full_tensor
    from erpd_megatron.megatron.parallel import ParallelConfig, init_parallel

    torch.set_num_threads(1)
    cfg = ModelConfig(**CFG)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 200, (2, 12), generator=g)
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), response_mask=torch.ones_like(ids))

    def loss_fn(lp, mb, ent):
        return -(lp * mb["response_mask"]).sum() / mb["response_mask"].sum(), {}

    def engine(par, seed):
        init_parallel(par, seed=seed)
        return PolicyEngine(cfg, par, OptimConfig(micro_batch_size=2, distributed_optimizer=False),
                            BuildOptions(spec="local", dtype=torch.float32), seed=seed)

    ref = engine(ParallelConfig(tp=1, dp=2), seed=1)
    full = {n: p.detach().clone() for n, p in ref.named_parameters_global()}
    lp_ref = ref.forward_logprobs(batch)
    ref.forward_backward(batch, loss_fn)
    grads_ref = {n: p.main_grad.detach().clone() for n, p in ref.named_parameters_global()}

    par = ParallelConfig(tp=2)
    eng = engine(par, seed=2)  # other seed: the weights must come from the reference
    load_full_state_dict(eng.modules, full, cfg, par)
    lp = eng.forward_logprobs(batch)
    eng.forward_backward(batch, loss_fn)
    tp_rank = ps.get_tensor_model_parallel_rank()
    worst = max(float((p.main_grad - shard_full_tensor(n, grads_ref[n], tp_rank, 2)).abs().max())
                for n, p in eng.named_parameters_global())
    qkv = dict(eng.named_parameters_global())["decoder.layers.0.self_attention.linear_qkv.weight"]
    return {"lp": float((lp - lp_ref).abs().max()), "grads": worst, "lp_scale": float(lp_ref.abs().max()),
            "qkv_rows": tuple(qkv.shape)}


def test_one_kv_group_at_tp2_matches_tp1():
    for r in run_distributed(_world, 2, timeout=600):
        assert r["qkv_rows"] == ((4 + 2) * 8 // 2, 32)  # the 6 head rows of the single group, split evenly
        assert r["lp_scale"] > 1 and r["lp"] < 1e-5 and r["grads"] < 1e-5, r
