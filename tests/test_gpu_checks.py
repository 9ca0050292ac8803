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
