"""Token signals: strategies, whitening vs a statistics-module loop, sign masks (paper Tab. 12),
ensembles and the sequential schedule."""

import math
import statistics

import pytest
import torch

from erpd_megatron.algorithms import signals as S

torch.set_num_threads(1)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T = 4, 10
    mask = torch.zeros(B, T)
    for b, (s, n) in enumerate([(1, 6), (4, 5), (2, 8), (3, 2)]):
        mask[b, s : s + n] = 1
    lps = {
        k: torch.where(mask.bool(), -torch.rand(B, T, generator=g, dtype=torch.float64) * 4, torch.nan)
        for k in ("teacher", "old", "unlearned", "current", "weak")
    }
    return lps, mask


def masked_values(x, mask):
    return [x[b, t].item() for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]


@pytest.mark.parametrize(
    "strategy,num,den", [(1, "teacher", "old"), (2, "teacher", "unlearned"), (3, "current", "weak")]
)
def test_strategies(strategy, num, den):
    lps, mask = batch()
    s = S.strategy_signal(strategy, lps, mask)
    assert masked_values(s, mask) == masked_values(lps[num] - lps[den], mask)
    assert (s[mask == 0] == 0).all()  # NaN padding never leaks


def test_strategy_errors_and_evolving():
    lps, mask = batch()
    with pytest.raises(ValueError, match="missing \\['unlearned'\\]"):
        S.strategy_signal(2, {"teacher": lps["teacher"]}, mask)
    with pytest.raises(ValueError, match="strategy must be one of"):
        S.strategy_signal(4, lps, mask)
    cur = lps["current"].clone().requires_grad_()
    ev = S.evolving_signal(lps["teacher"], cur, mask)
    assert not ev.requires_grad  # the signal is a fixed target, never differentiated
    assert masked_values(ev, mask) == masked_values(lps["teacher"] - lps["current"], mask)
    bad = lps["old"].clone()
    bad[0, 2] = math.nan
    with pytest.raises(ValueError, match="old log-probs contains NaN at 1"):
        S.strategy_signal(1, {**lps, "old": bad}, mask)


def test_whiten_matches_statistics_reference():
    lps, mask = batch(1)
    raw = S.strategy_signal(1, lps, mask)
    w = S.whiten(raw, mask)
    vals = masked_values(raw, mask)
    mu, sd = statistics.fmean(vals), statistics.stdev(vals)
    assert masked_values(w, mask) == pytest.approx([(v - mu) / (sd + 1e-8) for v in vals], abs=1e-10)
    got = masked_values(w, mask)
    assert statistics.fmean(got) == pytest.approx(0.0, abs=1e-12)
    assert statistics.stdev(got) == pytest.approx(1.0, abs=1e-6)
    assert (w[mask == 0] == 0).all()


@pytest.mark.parametrize("value", [0.0, 0.1, -3.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_whiten_constant_empty_single_give_zeros(value, dtype):
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    w = S.whiten(torch.full(mask.shape, value, dtype=dtype), mask)
    assert (w == 0).all()
    assert (S.whiten(torch.randn(2, 8, dtype=dtype), torch.zeros(2, 8)) == 0).all()
    one = torch.zeros(2, 8)
    one[0, 3] = 1
    assert (S.whiten(torch.randn(2, 8, dtype=dtype), one) == 0).all()


def test_clip_and_sign_mask():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    s = torch.tensor([[-2.0, 0.5, 3.0, 9.0], [-1.0, 2.0, -0.5, 0.1]], dtype=torch.float64)
    assert S.clip_signal(s, mask, -1.0, 1.0).tolist() == [[-1.0, 0.5, 1.0, 0.0], [-1.0, 1.0, -0.5, 0.1]]
    assert S.clip_signal(s, mask, low=0.0).tolist() == [[0.0, 0.5, 3.0, 0.0], [0.0, 2.0, 0.0, 0.1]]
    pos = torch.tensor([True, False])
    # positive sample (row 0) keeps only its > 0 part; the negative sample (row 1) is untouched
    assert S.sign_mask(s, mask, pos, "positive").tolist() == [[0.0, 0.5, 3.0, 0.0], [-1.0, 2.0, -0.5, 0.1]]
    assert S.sign_mask(s, mask, pos, "negative").tolist() == [[-2.0, 0.0, 0.0, 0.0], [-1.0, 2.0, -0.5, 0.1]]
    assert S.sign_mask(s, mask, pos, "both").tolist() == [[-2.0, 0.5, 3.0, 0.0], [-1.0, 2.0, -0.5, 0.1]]
    with pytest.raises(ValueError, match="keep must be one of"):
        S.sign_mask(s, mask, pos, "neg")
    with pytest.raises(ValueError, match="reversed"):
        S.clip_signal(s, mask, 1.0, -1.0)


def test_make_signal_order_sign_mask_then_whiten():
    lps, mask = batch(2)
    raw = S.strategy_signal(2, lps, mask)
    pos = torch.tensor([True, False, True, False])
    got = S.make_signal(raw, mask, positive_samples=pos, keep="negative", clip_whitened=1.5)
    # independent: zero the > 0 tokens of positive rows, then whiten the masked values, then clip
    vals, where = [], []
    for b in range(4):
        for t in range(10):
            if mask[b, t]:
                v = raw[b, t].item()
                vals.append(min(v, 0.0) if pos[b] else v)
                where.append((b, t))
    mu, sd = statistics.fmean(vals), statistics.stdev(vals)
    for v, (b, t) in zip(vals, where):
        assert got[b, t].item() == pytest.approx(max(-1.5, min(1.5, (v - mu) / (sd + 1e-8))), abs=1e-10)
    with pytest.raises(ValueError, match="positive_samples"):
        S.make_signal(raw, mask, keep="positive")
    assert torch.equal(S.make_signal(raw, mask, normalize=False), raw)


def test_ensemble_is_sum_of_whitened():
    lps, mask = batch(3)
    s1 = S.strategy_signal(1, lps, mask)
    s2 = S.strategy_signal(2, lps, mask) * 50  # scale must not matter after whitening
    e = S.ensemble([s1, s2], mask)
    assert torch.allclose(e, S.whiten(s1, mask) + S.whiten(s2 / 50, mask), atol=1e-10)
    ew = S.ensemble([s1, s2], mask, weights=[1.0, 0.5])
    assert torch.allclose(ew, S.whiten(s1, mask) + 0.5 * S.whiten(s2, mask))
    with pytest.raises(ValueError):
        S.ensemble([], mask)
    with pytest.raises(ValueError, match="weights"):
        S.ensemble([s1], mask, weights=[1.0, 2.0])


def test_sequential_index():
    seq = [S.sequential_index(k, [16, 16]) for k in range(40)]
    assert seq == [0] * 16 + [1] * 24  # stays on the last signal after its block
    assert [S.sequential_index(k, [2, 3], cycle=True) for k in range(8)] == [0, 0, 1, 1, 1, 0, 0, 1]
    with pytest.raises(ValueError):
        S.sequential_index(-1, [4])
    with pytest.raises(ValueError):
        S.sequential_index(0, [4, 0])


# ----------------------------------------------------------------------------- students' budget (issue 11)
def test_student_defaults_run_one_epoch_and_more_warns(caplog):
    """Default students: 16 steps, mini-batch 0 = batch // steps -> exactly one epoch (128 x 8 = 1024 rows ->
    64 per step). 20 steps x 256 of 1024 rows = 5 epochs logs a warning naming the student."""
    import logging

    from erpd_megatron.config import DistillConfig, load_config, student_epochs, student_mini_batch

    assert (DistillConfig().steps, DistillConfig().mini_batch_size) == (16, 0)
    with caplog.at_level(logging.WARNING, logger="erpd.config"):
        cfg = load_config()
    s = cfg.students["s1_ce"]
    assert student_mini_batch(cfg, s) == 1024 // 16 == 64 and student_epochs(cfg, s) == 1.0
    assert "epochs" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="erpd.config"):
        cfg = load_config(overrides=["students.s1_ce.steps=20", "students.s1_ce.mini_batch_size=256"])
    assert student_epochs(cfg, cfg.students["s1_ce"]) == 5.0
    assert "students.s1_ce runs 5.0 epochs" in caplog.text
    # iterating with the paper's 10 steps: 1024 // 10 = 102 per step, 0.996 epochs, no warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="erpd.config"):
        cfg = load_config(overrides=["students.s1_ce.steps=10"])
    assert student_mini_batch(cfg, cfg.students["s1_ce"]) == 102 and "epochs" not in caplog.text


def test_strategy1_over_mse_teacher_warns_and_bench_pairs_strong_teacher(caplog):
    """Strategy 1 over an MSE teacher logs the pairing warning (paper Sec. 3.4); strategy 2 over MSE and
    strategy 1 over CE do not; the benchmark preset's ERPD arm is strategy 1 over a strong teacher."""
    import logging

    from erpd_megatron.bench.erpd_vs_onpolicy import PRESET
    from erpd_megatron.config import load_config

    mse = ["teachers.mse.loss=mse", "students.s1_ce.teacher=mse"]
    cases = [(mse, True), ([*mse, "students.s1_ce.strategies=[2]"], False), ([], False)]
    from erpd_megatron import config

    for overrides, warns in cases:
        caplog.clear()
        config._WARNED.clear()  # said once per process: another test may have said it already
        with caplog.at_level(logging.WARNING, logger="erpd.config"):
            load_config(overrides=overrides)
        assert ("strategy 1 over the MSE teacher 'mse'" in caplog.text) == warns, overrides
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="erpd.config"):
        cfg = load_config(str(PRESET))
    assert "MSE teacher" not in caplog.text
    for s in cfg.students.values():
        loss = cfg.teachers[s.teacher].loss
        assert (1 not in s.strategies or loss in ("ce", "sapo", "grpo")) and (2 not in s.strategies or loss == "mse")


# ----------------------------------------------------------------------------- no learning signal (issue 11)
def test_no_signal_warning_names_batch_and_method(caplog):
    import logging

    from erpd_megatron.pipeline.stages import no_signal_reason, warn_if_no_signal

    groups = torch.tensor([0, 0, 1, 1])
    assert no_signal_reason(torch.zeros(4), groups, "ce") == "every reward equals 0 (4 samples)"
    assert no_signal_reason(torch.ones(4), groups, "grpo") == "every reward equals 1 (4 samples)"
    # rewards differ across prompts but not within any group: nothing for GRPO-style losses, CE still learns
    constant_groups = torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert "all sapo advantages are 0" in no_signal_reason(constant_groups, groups, "sapo")
    assert no_signal_reason(constant_groups, groups, "ce") is None
    assert no_signal_reason(torch.tensor([1.0, 0.0, 0.0, 0.0]), groups, "grpo") is None
    with caplog.at_level(logging.WARNING, logger="erpd.stages"):
        warn_if_no_signal({"rewards": torch.zeros(4), "group_ids": groups}, "fixed batch 2", "it2_ce", "ce")
        warn_if_no_signal({"rewards": torch.tensor([1.0, 0.0, 1.0, 0.0]), "group_ids": groups}, "fixed batch 0", "x")
    assert "fixed batch 2 carries no learning signal for it2_ce: every reward equals 0" in caplog.text
    assert "for x" not in caplog.text


# ----------------------------------------------------------------------------- unlearned checkpoint from the dip
def test_dip_step_hand_curves():
    from erpd_megatron.pipeline.stages import dip_step

    assert dip_step({10: -1.0, 20: -2.0, 30: -1.5}) == 20
    assert dip_step({10: -2.0, 20: -2.0, 30: -1.0}) == 10  # tie: the earliest
    with pytest.raises(ValueError, match="no candidate"):
        dip_step({})


def test_unlearned_step_auto_picks_the_dip_on_the_fixed_batch(tmp_path):
    """unlearned_step=-1: log-prob columns of the teacher's saved checkpoints before its own (10, 20, 30 of
    40) on the fixed batch; the positives' mean token log-prob is -1.0, -2.0, -1.5 there (by construction),
    so step 20 is chosen, recorded, and reused without recomputing."""
    from types import SimpleNamespace

    from erpd_megatron.config import load_config
    from erpd_megatron.data.rollout_store import RolloutRecord, RolloutStore
    from erpd_megatron.pipeline.rundir import RunDir
    from erpd_megatron.pipeline.stages import unlearned_step

    cfg = load_config(overrides=["teachers.mse.loss=mse", "teachers.mse.steps=40", "teachers.mse.save_every=10",
                                 "students.s2.strategies=[2]", "students.s2.teacher=mse"])
    run = RunDir(tmp_path)
    store = RolloutStore(run.rollouts)
    rewards = [1.0, 0.0, 1.0, 0.0]
    store.write_batch(0, [RolloutRecord(prompt_ids=[5, 6], response_ids=[7, 8, 9], behaviour_logprobs=[-0.5] * 3,
                                        reward=r, group_id=i // 2) for i, r in enumerate(rewards)])
    t = store.load_tensors(0)
    store.add_columns(0, {"old_logprobs": torch.full(t["input_ids"].shape, -0.5)})
    level = {10: -1.0, 20: -2.0, 30: -1.5}
    loaded = []

    class Policy:
        def __init__(self, step):
            self.step = step

        def forward_logprobs(self, tensors):
            pos = torch.tensor(rewards)[:, None] > 0.5
            return torch.where(pos, level[self.step], -9.0).expand(tensors["input_ids"].shape).clone()

    def new_policy(init):
        step = int(str(init).rsplit("_", 1)[1])  # .../ckpt/mse/iter_0000020
        loaded.append(step)
        return Policy(step)

    released = []
    ctx = SimpleNamespace(cfg=cfg, run=run, is_main=True, barrier=lambda: None, new_policy=new_policy,
                          release=lambda p: released.append(p.step), tokenizer=SimpleNamespace(pad_token_id=0))
    s = cfg.students["s2"]
    assert s.unlearned_step == -1
    assert unlearned_step(ctx, s, 0) == 20 and sorted(loaded) == [10, 20, 30]
    assert sorted(released) == [10, 20, 30]  # each candidate's policy goes back to the engine pool
    import json

    rec = json.loads((tmp_path / "iter_0" / "unlearned_mse.json").read_text())
    assert rec["step"] == 20 and rec["teacher_step"] == 40 and rec["pos_logprob"]["20"] == pytest.approx(-2.0)
    assert rec["pos_logprob"]["0"] == pytest.approx(-0.5)
    assert unlearned_step(ctx, s, 0) == 20 and len(loaded) == 3  # recorded: nothing recomputed


def test_unlearned_step_auto_needs_a_checkpoint_before_the_teachers():
    from erpd_megatron.config import ConfigError, load_config

    base = ["teachers.mse.loss=mse", "students.s2.strategies=[2]", "students.s2.teacher=mse"]
    load_config(overrides=[*base, "teachers.mse.steps=20", "teachers.mse.save_every=10"])  # candidate: step 10
    with pytest.raises(ConfigError, match="before the teacher's last"):
        load_config(overrides=[*base, "teachers.mse.steps=10", "teachers.mse.save_every=10"])
    with pytest.raises(ConfigError, match="strategy 2 needs an unlearned checkpoint"):
        load_config(overrides=[*base, "students.s2.unlearned_step=0"])


# ----------------------------------------------------------------------------- strategy 2 tuned as the paper does (issue 22)
def test_unlearned_and_teacher_refs_validated():
    from erpd_megatron.config import ConfigError, load_config

    base = ["teachers.mse.loss=mse", "teachers.mse.steps=16", "teachers.mse.save_every=4",
            "teachers.u.loss=mse", "teachers.u.steps=4", "teachers.u.save_every=2", "teachers.u.lr=1e-3",
            "students.s2.strategies=[2]"]
    cfg = load_config(overrides=[*base, "students.s2.teacher=mse@8", "students.s2.unlearned=u@2"])
    s = cfg.students["s2"]
    assert (s.teacher, s.teacher_step, s.unlearned) == ("mse", 8, "u@2")  # stored resolved
    load_config(overrides=[*base, "students.s2.teacher=mse", "students.s2.unlearned=u"])  # u's last checkpoint
    # the run's own last step is a checkpoint even when it is not a multiple of save_every
    load_config(overrides=[*base, "teachers.u.steps=5", "students.s2.teacher=mse", "students.s2.unlearned=u@5"])
    for bad, msg in ((["students.s2.teacher=mse", "students.s2.unlearned=v@2"], "not a configured teacher"),
                     (["students.s2.teacher=mse", "students.s2.unlearned=u@3"], "not a saved step of teacher 'u'"),
                     (["students.s2.teacher=mse@6", "students.s2.unlearned=u@2"], "not a saved step of teacher 'mse'"),
                     (["students.s2.teacher=mse@8", "students.s2.teacher_step=4"], "disagree"),
                     (["students.s2.teacher=mse", "students.s2.unlearned=u@x"], "integer step"),
                     (["students.s2.teacher=mse", "students.s2.strategies=[1]", "students.s2.unlearned=u@2"],
                      "strategy 2 is not in strategies")):
        with pytest.raises(ConfigError, match=msg):
            load_config(overrides=[*base, *bad])


def _s2_ctx(tmp_path, overrides):
    """A fake run over one 4-row fixed batch: each checkpoint's policy returns known per-token log-probs
    lp[b, t] = -(step / 10) (t + 1) - [run == "u"] 0.01 (t + 1)^2 (plus -1 on negatives), so any other pair of
    checkpoints gives a different whitened signal."""
    from types import SimpleNamespace

    from erpd_megatron.config import load_config
    from erpd_megatron.data.rollout_store import RolloutRecord, RolloutStore
    from erpd_megatron.pipeline.rundir import RunDir

    cfg = load_config(overrides=overrides)
    run = RunDir(tmp_path)
    store = RolloutStore(run.rollouts)
    rewards = [1.0, 0.0, 1.0, 0.0]
    store.write_batch(0, [RolloutRecord(prompt_ids=[5, 6], response_ids=[7, 8, 9, 10], behaviour_logprobs=[-0.5] * 4,
                                        reward=r, group_id=i // 2) for i, r in enumerate(rewards)])
    shape = store.load_tensors(0)["input_ids"].shape
    store.add_columns(0, {"old_logprobs": torch.full(shape, -0.5)})
    loaded = []

    def lp_of(method, step):
        t = torch.arange(shape[1], dtype=torch.float32)[None, :] + 1
        neg = (torch.tensor(rewards)[:, None] <= 0.5).float()
        return (-(step / 10) * t - (0.01 * t**2 if method == "u" else 0.0) - neg).expand(shape).clone()

    class Policy:
        def __init__(self, method, step):
            self.method, self.step = method, step

        def forward_logprobs(self, tensors):
            return lp_of(self.method, self.step)

    def new_policy(init):  # .../ckpt/<method>/iter_0000016
        loaded.append((init.parent.name, int(init.name.rsplit("_", 1)[1])))
        return Policy(*loaded[-1])

    from erpd_megatron.megatron.checkpoint import iter_dirname

    for name, t in cfg.teachers.items():  # the saved checkpoints' directories (what keep_last could prune)
        for step in range(t.save_every, t.steps + 1, t.save_every):
            (run.ckpt(name) / iter_dirname(step)).mkdir(parents=True)
    ctx = SimpleNamespace(cfg=cfg, run=run, is_main=True, barrier=lambda: None, new_policy=new_policy,
                          release=lambda p: None, tokenizer=SimpleNamespace(pad_token_id=0))
    return ctx, store, lp_of, loaded


S2_BASE = ["teachers.mse.loss=mse", "teachers.mse.steps=16", "teachers.mse.save_every=4",
           "teachers.u.loss=mse", "teachers.u.steps=4", "teachers.u.save_every=2", "teachers.u.negative_weight=8",
           "students.s2.strategies=[2]", "students.s2.teacher=mse", "students.s2.unlearned=u@2"]


def test_strategy2_signal_uses_the_named_checkpoints(tmp_path):
    """students.s2.unlearned=u@2 (a run of its own), teacher mse (last = 16): the signal is exactly
    whiten(lp(mse@16) - lp(u@2)), not the ratio with any other checkpoint (u@4, the dip of mse, ...)."""
    from erpd_megatron.algorithms import signals as S
    from erpd_megatron.pipeline.stages import build_signals, compute_signals, load_batch, signal_columns

    ctx, store, lp_of, loaded = _s2_ctx(tmp_path, S2_BASE)
    s = ctx.cfg.students["s2"]
    cols = signal_columns(ctx, s, 0)
    assert {k: v[0] for k, v in cols.items()} == {"lp_mse_s16": "teacher", "lp_u_s2": "unlearned"}
    compute_signals(ctx, 0)
    assert ("mse", 16) in loaded and ("u", 2) in loaded
    batch = load_batch(ctx, store, 0, list(cols))
    (sig,) = build_signals(ctx, s, batch, 0)
    mask = batch["response_mask"]
    want = S.make_signal((lp_of("mse", 16) - lp_of("u", 2)) * mask, mask, positive_samples=batch["rewards"] > 0.5)
    other = S.make_signal((lp_of("mse", 16) - lp_of("u", 4)) * mask, mask, positive_samples=batch["rewards"] > 0.5)
    assert torch.allclose(sig, want, atol=1e-6) and not torch.allclose(sig, other, atol=1e-3)


def test_strategy2_logprob_curves_per_checkpoint(tmp_path):
    """compute_signals writes, for both ends' runs, the positives' / negatives' mean token log-prob on the whole
    fixed batch at every saved checkpoint (step 0 = the base's old_logprobs): the fake's values, by construction."""
    import json
    import shutil

    from erpd_megatron.megatron.checkpoint import iter_dirname
    from erpd_megatron.pipeline.stages import compute_signals

    ctx, store, lp_of, _ = _s2_ctx(tmp_path, S2_BASE)
    shutil.rmtree(ctx.run.ckpt("mse") / iter_dirname(8))  # pruned by checkpoint.keep_last: left out of the curve
    compute_signals(ctx, 0)
    mask = store.load_tensors(0)["response_mask"].bool()
    for run, steps in (("mse", [4, 12, 16]), ("u", [2, 4])):
        rec = json.loads((tmp_path / "iter_0" / f"logprobs_{run}.json").read_text())
        assert sorted(map(int, rec["curve"])) == [0, *steps]
        assert rec["curve"]["0"] == {"pos": pytest.approx(-0.5), "neg": pytest.approx(-0.5)}
        for st in steps:
            lp = lp_of(run, st)
            assert rec["curve"][str(st)]["pos"] == pytest.approx(lp[0][mask[0]].mean().item(), abs=1e-6)
            assert rec["curve"][str(st)]["neg"] == pytest.approx(lp[1][mask[1]].mean().item(), abs=1e-6)
    assert json.loads((tmp_path / "iter_0" / "logprobs_u.json").read_text())["negative_weight"] == 8.0


def test_strategy2_report_names_both_ends_and_the_choice(tmp_path):
    """The report's strategy-2 section: each student's pi_T / pi_U (run@step, lr, negative weight), the student with
    the best last-step accuracy marked, and the split named (a selection only on a *_val split)."""
    import json

    from erpd_megatron.config import load_config
    from erpd_megatron.pipeline.report import strategy2_lines, strategy2_summary
    from erpd_megatron.pipeline.rundir import RunDir

    cfg = load_config(overrides=[*S2_BASE, "teachers.u.lr=1e-3", "students.s2b.strategies=[2]",
                                 "students.s2b.teacher=mse@12", "students.s2b.unlearned=u", "data.eval=toy_val"])
    run = RunDir(tmp_path)
    for m, acc in (("s2", 0.40), ("s2b", 0.45)):
        run.write_eval(m, 4, {"avg_at_k": acc - 0.1})
        run.write_eval(m, 8, {"avg_at_k": acc})
    s2 = strategy2_summary(run, cfg)
    assert s2["chosen"] == "s2b" and s2["is_validation"]
    assert s2["students"]["s2"] == {"teacher": "mse@16", "unlearned": "u@2", "unlearned_lr": 1e-3,
                                    "unlearned_negative_weight": 8.0, "accuracy": 0.40}
    assert s2["students"]["s2b"]["teacher"] == "mse@12" and s2["students"]["s2b"]["unlearned"] == "u@4"
    text = "\n".join(strategy2_lines(s2))
    assert "| s2b (chosen) | mse@12 | u@4 |" in text and "toy_val" in text
    (tmp_path / "iter_0").mkdir(exist_ok=True)  # the Fig. 9 lines list the checkpoints by step, not as strings sort
    (tmp_path / "iter_0" / "logprobs_mse.json").write_text(json.dumps({
        "loss": "mse", "lr": 3e-4, "negative_weight": 8.0,
        "curve": {str(k): {"pos": -k / 100, "neg": -1.0} for k in (0, 12, 16, 4, 8)}}))
    text = "\n".join(strategy2_lines(strategy2_summary(run, cfg)))
    assert "0: 0.0000 / -1.0000, 4: -0.0400 / -1.0000, 8: -0.0800 / -1.0000, 12: -0.1200" in text
    cfg.data.eval = "toy"
    assert "NOT a validation split" in "\n".join(strategy2_lines(strategy2_summary(run, cfg)))
