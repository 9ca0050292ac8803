"""C4 controls (issue 22): promoting a teacher itself (no distillation, the paper's Table 2 (a) / (b)) is a
validated choice of iterate.promote; the benchmark's teacher-only arm is built from the preset by construction."""

import pytest

from erpd_megatron.config import ConfigError, load_config


def test_promote_accepts_a_teacher_or_its_checkpoint():
    base = ["iterations=2", "teachers.ce.steps=8", "teachers.ce.save_every=4"]
    assert load_config(overrides=[*base, "iterate.promote=ce"]).iterate.promote == "ce"
    assert load_config(overrides=[*base, "iterate.promote=ce@4"]).iterate.promote == "ce@4"
    assert load_config(overrides=[*base, "iterate.promote=s1_ce"]).iterate.promote == "s1_ce"  # a student, as before
    with pytest.raises(ConfigError, match="neither a configured student"):
        load_config(overrides=[*base, "iterate.promote=nope"])
    with pytest.raises(ConfigError, match="not a saved step of teacher 'ce'"):
        load_config(overrides=[*base, "iterate.promote=ce@3"])
    with pytest.raises(ConfigError, match="iterate.fallback"):
        load_config(overrides=[*base, "iterate.fallback=nope@2"])


def test_teacher_only_config_keeps_only_the_promoted_teacher(tmp_path):
    """The benchmark's control: the preset reduced to the ERPD student's teacher, promoted itself, no student,
    no on-policy baseline, no RFT; everything else (seed, batches, lr, steps, eval) unchanged."""
    from erpd_megatron.bench.erpd_vs_onpolicy import PRESET, teacher_only_config

    cfg = load_config(str(PRESET))
    t, teacher = teacher_only_config(cfg, tmp_path / "solo")
    assert teacher == cfg.students[cfg.iterate.promote].teacher == "sapo"
    assert list(t.teachers) == ["sapo"] and t.teachers["sapo"] == cfg.teachers["sapo"]
    assert t.students == {} and t.onpolicy is None and t.iterate.promote == "sapo"
    assert (t.seed, t.iterations, t.data, t.rollout, t.eval) == (cfg.seed, cfg.iterations, cfg.data, cfg.rollout,
                                                                 cfg.eval)
    assert t.run_dir == str(tmp_path / "solo") and cfg.students  # the original is untouched


def test_rft_lr_grid_adds_one_control_per_lr():
    """--rft-lrs: one RFT control per lr, the preset's rft teacher otherwise unchanged (each is kind "rft" in the
    benchmark, so every one is paired against ERPD)."""
    from erpd_megatron.bench.erpd_vs_onpolicy import PRESET, rft_lr_overrides

    cfg = load_config(str(PRESET))
    grid = load_config(str(PRESET), rft_lr_overrides(cfg, [3e-5, 1.5e-4]))
    for name, lr in (("rft_lr3e-5", 3e-5), ("rft_lr1p5e-4", 1.5e-4)):
        t = grid.teachers[name]
        assert t.loss == "sft" and t.lr == lr
        assert (t.steps, t.mini_batch_size, t.save_every) == (cfg.teachers["rft"].steps, cfg.teachers["rft"].mini_batch_size,
                                                              cfg.teachers["rft"].save_every)
