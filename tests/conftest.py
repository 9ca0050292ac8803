"""Shared fixtures."""

import pytest


@pytest.fixture(scope="session")
def toy_base(tmp_path_factory):
    """A short warm-up of the toy base (the demo's is longer), shared by every test that runs the pipeline."""
    from erpd_megatron.toy.warmup import WarmupConfig, ensure_base_model

    out = tmp_path_factory.mktemp("toy_base") / "hf"
    return ensure_base_model(out, WarmupConfig(steps=120, eval_prompts=32, eval_samples=2), log=lambda *a: None)
