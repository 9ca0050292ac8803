"""GPU check scripts on CPU: what can be checked without an accelerator (seeding, the no-CUDA exit)."""

import torch


def test_backend_check_reseed_resets_megatron_tracker():
    """Every variant of gpu_backend_check must start from the same weights: GPU weights are drawn inside
    megatron's model-parallel RNG tracker, which PolicyEngine seeds only once (first variant). reseed() must
    put the tracker back to its seeded state."""
    from megatron.core import tensor_parallel

    from erpd_megatron.bench.gpu_backend_check import reseed
    from erpd_megatron.megatron.parallel import ParallelConfig, destroy_parallel, init_parallel

    init_parallel(ParallelConfig(), seed=0)
    try:
        def draw():
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return torch.randn(8)

        reseed(0)
        a = draw()
        b = draw()  # the tracker moved on: a second variant without reseed would get other weights
        reseed(0)
        c = draw()
        assert not torch.equal(a, b)
        assert torch.equal(a, c)
    finally:
        destroy_parallel()


def test_gpu_smoke_without_cuda_exits_gracefully(tmp_path):
    """scripts/gpu_smoke.sh on a machine without CUDA: exit 0, one JSON with status "skipped" (nothing built)."""
    import json
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("SMOKE_CPU", None)
    p = subprocess.run(["bash", str(root / "scripts" / "gpu_smoke.sh")], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    doc = json.loads((tmp_path / "gpu_smoke.json").read_text())
    assert doc["status"] == "skipped" and "no CUDA" in doc["reason"]
    assert doc["env"]["megatron_core"] and "checks" not in doc
    assert "no CUDA" in p.stdout


def test_gpu_smoke_checks_pass_on_identical_weights_and_catch_a_wrong_one():
    """The smoke's checks in fp32 on the CPU (SMOKE_CPU's path): Megatron against the transformers reference on
    the same weights passes every check; one perturbed reference tensor fails the log-prob and gradient checks."""
    from erpd_megatron.bench import gpu_smoke as smoke
    from erpd_megatron.megatron.engine import OptimConfig, PolicyEngine
    from erpd_megatron.megatron.model import BuildOptions, ModelConfig
    from erpd_megatron.megatron.parallel import ParallelConfig, destroy_parallel, init_parallel

    torch.set_num_threads(1)
    init_parallel(ParallelConfig(), seed=0)
    try:
        assert smoke.check_nccl(False)["pass"]
        cfg = ModelConfig(**{**smoke.SMOKE_MODEL, "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128,
                             "num_heads": 4, "num_kv_heads": 2, "head_dim": 16})
        eng = PolicyEngine(cfg, ParallelConfig(), OptimConfig(lr=1e-4, micro_batch_size=4),
                           BuildOptions(spec="local", dtype=torch.float32), seed=0)
        batch = smoke._batch(cfg, torch.device("cpu"), T=24)
        ref = smoke._load_reference(eng, cfg)
        lp, tr = smoke.check_logprobs_and_train(eng, ref, batch)
        assert lp["pass"] and tr["pass"], (lp, tr)
        sync = smoke.check_weight_sync(eng, batch, torch.device("cpu"), torch.float32)
        assert sync["pass"] and sync["tensors"] == len(smoke._exported(eng)), sync

        ref = smoke._load_reference(eng, cfg)  # the updated weights, then one wrong tensor
        with torch.no_grad():
            ref.model.layers[1].mlp.down_proj.weight.mul_(3.0)
        lp, tr = smoke.check_logprobs_and_train(eng, ref, batch)
        assert not lp["pass"] and not tr["pass"]
    finally:
        destroy_parallel()
