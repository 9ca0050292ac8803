"""The ERPD pipeline end to end on CPU: real Megatron, real LocalEngine, real math-verify, real Parquet.

- the micro preset runs every stage and writes summary.json / report.md / plot / metrics / checkpoints;
- SIGKILL during teacher training and during distillation, rerun, and the final checkpoints equal those of
  an uninterrupted run (CPU determinism);
- bad config or data fails before any compute with a clear message.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

PRESETS = Path(__file__).resolve().parent.parent / "erpd_megatron" / "presets"


def clean_env(**extra) -> dict:
    """A fresh single-process world for a child: no rendezvous variables left behind by in-process
    distributed tests (a stale MASTER_PORT makes the child's gloo store fail with EADDRINUSE)."""
    e = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                          "LOCAL_RANK")}
    return {**e, "OMP_NUM_THREADS": "1", **extra}


def erpd(*args, env=None, check=True):
    e = clean_env(**(env or {}))
    out = subprocess.run([sys.executable, "-m", "erpd_megatron.cli", *args], capture_output=True, text=True, env=e)
    if check and out.returncode != 0:
        raise AssertionError(f"erpd {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return out


def test_micro_pipeline_end_to_end(tmp_path, toy_base):
    from conftest import write_mixed_batch

    run = tmp_path / "micro"
    # the fixed batch holds correct and wrong samples in every group whatever the base scores on this machine
    # (a short warm-up may score 0 %: all rewards 0, and the MSE / PPO teachers would get no gradient)
    rewards = write_mixed_batch(run, toy_base, prompts_per_batch=16, n_samples=4)
    assert 0 < sum(rewards) < len(rewards)
    erpd("run", "--config", str(PRESETS / "micro.yaml"), f"run_dir={run}", f"model.base={toy_base}")
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["methods"]) == {"ce", "mse", "ppo", "s1_ce", "s2_mse", "onpolicy_grpo"}
    assert 0.0 <= summary["base"]["accuracy"] <= 1.0
    for name, m in summary["methods"].items():
        assert {"accuracy", "kl", "steps", "rollouts", "wall_s"} <= set(m), name
        assert m["curve"][0]["step"] == 0 and m["curve"][-1]["step"] == m["steps"]
        assert m["curve"][0]["accuracy"] == summary["base"]["accuracy"]  # every path starts at the base
        lines = (run / "metrics" / f"{name}.jsonl").read_text().splitlines()  # one line per optimizer step
        assert [json.loads(x)["step"] for x in lines] == list(range(1, m["steps"] + 1))
        last = json.loads(lines[-1])
        for key in ("policy/kl_fwd_k3_tok_batch", "policy/entropy", "policy/logprob_pos", "perf/tokens_per_s",
                    "perf/response_length", "train/grad_norm"):
            assert key in last, (name, key)
        assert last["policy/entropy"] > 0
        if name != "onpolicy_grpo":  # on-policy batches are sampled by the policy being updated: KL 0
            assert last["policy/kl_fwd_k3_tok_batch"] > 0, name
    # ERPD and the on-policy baseline consume the same rollout budget
    assert summary["methods"]["onpolicy_grpo"]["rollouts"] == summary["methods"]["s1_ce"]["rollouts"] == 16 * 4
    assert summary["methods"]["ce"]["kl"] > 0
    # the PPO teacher pre-trained its critic (value loss per step) and logged the GAE advantage statistics
    critic = [json.loads(x) for x in (run / "metrics" / "ppo_critic.jsonl").read_text().splitlines()]
    assert [c["step"] for c in critic] == [1, 2, 3] and "critic/explained_var" in critic[-1]
    assert (run / "report.md").read_text().startswith("# ERPD run")
    assert (run / "accuracy_vs_kl.png").stat().st_size > 1000
    # wall time per stage (utils/timing.py): every stage was timed at least once; no threshold on the seconds
    from erpd_megatron.utils.timing import STAGES

    times = summary["stage_times"]
    assert set(STAGES) | {"other"} <= set(times["stages"]) and all(v >= 0 for v in times["stages"].values())
    assert all(times["counts"][k] > 0 for k in STAGES), times["counts"]
    assert "Wall time by stage" in (run / "report.md").read_text()
    # signals were precomputed into the rollout store, next to the rollouts
    from erpd_megatron.data.rollout_store import RolloutStore

    store = RolloutStore(run / "rollouts")
    assert {"old_logprobs", "lp_ce_s4", "lp_mse_s4", "lp_mse_s2"} <= set(store.per_token_columns(0))
    assert store.read_table(0, columns=["reward"])["reward"].to_pylist() == rewards  # the injected batch was used


def _final_weights(ckpt_root: Path) -> dict:
    from checkpoints_conv.mcore_io import load_params  # noqa: F401  (import check: converter reads these)
    from erpd_megatron.megatron.checkpoint import resolve_checkpoint_dir

    d = Path(resolve_checkpoint_dir(str(ckpt_root)))
    meta = json.loads((d / "erpd_checkpoint.json").read_text())
    return {"step": meta["step"], "dir": d}


def _load_state(ckpt_dir: Path) -> dict:
    """Model tensors of a checkpoint, read in a child process (a world of one) to keep this one clean."""
    code = (
        "import sys, torch, json\n"
        "from checkpoints_conv.verify import build_and_load\n"
        "_, chunks = build_and_load(sys.argv[1], 1, 1)\n"
        "torch.save({k: v.detach().clone() for c in chunks for k, v in c.state_dict().items()"
        " if torch.is_tensor(v) and not k.endswith('_extra_state')}, sys.argv[2])\n"
    )
    out = ckpt_dir.parent.parent.parent / f"state_{ckpt_dir.parent.name}_{ckpt_dir.name}.pt"
    r = subprocess.run([sys.executable, "-c", code, str(ckpt_dir), str(out)], capture_output=True, text=True,
                       env=clean_env())
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out)


RESUME = ["teachers={ce: {loss: ce, steps: 4, mini_batch_size: 16, lr: 3.0e-4, save_every: 2}}",
          "students={s1: {strategies: [1], teacher: ce, steps: 4, mini_batch_size: 16, lr: 1.0e-4}}",
          "onpolicy=null", "eval.every=0", "data.eval_prompts=8", "eval.k=1", "checkpoint.keep_last=1"]


def test_sigkill_resume_equals_uninterrupted(tmp_path, toy_base):
    args = ["run", "--config", str(PRESETS / "micro.yaml"), f"model.base={toy_base}", *RESUME]
    erpd(*args, f"run_dir={tmp_path / 'straight'}")
    killed = tmp_path / "killed"
    env = {"ERPD_TEST_KILL_AT": "ce:3,s1:3"}
    r1 = erpd(*args, f"run_dir={killed}", env=env, check=False)
    assert r1.returncode == -9, r1.stderr[-2000:]  # SIGKILL in teacher training (after step 3's update)
    # the teacher's only checkpoint (step 2) damaged in place: the resume says so and starts over from the base
    from test_checkpoint_integrity import _alter_in_place, _largest_distcp

    it2 = killed / "ckpt" / "ce" / "iter_0000002"
    _alter_in_place(it2 / _largest_distcp(it2))
    r2 = erpd(*args, f"run_dir={killed}", env=env, check=False)
    assert r2.returncode == -9, r2.stderr[-2000:]  # resumed the teacher, then SIGKILL in distillation
    assert "iter_0000002 is damaged, resuming from the initial weights instead" in r2.stderr, r2.stderr[-3000:]
    erpd(*args, f"run_dir={killed}", env=env)  # resumes the student and finishes
    assert (killed / ".killed_ce_3").exists() and (killed / ".killed_s1_3").exists()
    assert sorted(p.name for p in (killed / "ckpt" / "ce").glob("iter_*")) == ["iter_0000004"]  # keep_last=1
    # a rerun of the finished run builds nothing: every method is skipped from its completion marker
    r4 = erpd(*args, f"run_dir={killed}")
    assert "ce: finished in an earlier invocation" in r4.stderr and "s1: finished in an earlier invocation" in r4.stderr
    assert "resuming from step" not in r4.stderr
    for method in ("ce", "s1"):
        a = _final_weights(tmp_path / "straight" / "ckpt" / method)
        b = _final_weights(killed / "ckpt" / method)
        assert a["step"] == b["step"] == 4
        sa, sb = _load_state(a["dir"]), _load_state(b["dir"])
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{method}: {k} differs after resume"
    # metrics of the killed run have each step exactly once
    steps = [json.loads(x)["step"] for x in (killed / "metrics" / "s1.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_bad_config_and_data_fail_before_compute(tmp_path):
    run = tmp_path / "bad"
    r = erpd("run", f"run_dir={run}", "teachers.ce.loss=dpo", check=False)
    assert r.returncode == 2 and "teachers.ce.loss: unknown loss 'dpo'" in r.stderr
    assert not run.exists()
    r = erpd("run", f"run_dir={run}", "students.s1_ce.strategies=[2]", "students.s1_ce.unlearned_step=0", check=False)
    assert r.returncode == 2 and "strategy 2 needs an unlearned checkpoint" in r.stderr
    data = tmp_path / "noanswer.jsonl"
    data.write_text('{"problem": "1+1=", "answer": "2"}\n{"problem": "2+2="}\n')
    r = erpd("run", f"run_dir={run}", f"data.train={data}", check=False)
    assert r.returncode == 2 and "noanswer.jsonl" in r.stderr and ":2" in r.stderr and "answer" in r.stderr
    assert not (run / "hf_base").exists() and not (run / "ckpt").exists()  # no warm-up, no training


def test_iterate_two_batches_with_fallback_and_online_phase(tmp_path, toy_base):
    """Iteration 0's promoted student (or the fallback, when the teacher did not gain) goes through an online
    phase; its checkpoint is iteration 1's base: batch 1 is sampled by it and every method is prefixed it1_."""
    run = tmp_path / "iter"
    erpd("run", "--config", str(PRESETS / "micro.yaml"), f"run_dir={run}", f"model.base={toy_base}",
         "iterations=2", "teachers={ce: {loss: ce, steps: 2, mini_batch_size: 16, save_every: 1}}",
         "students={s1: {strategies: [1], teacher: ce, steps: 2, mini_batch_size: 16},"
         " s3: {strategies: [3], weak: PLACEHOLDER, steps: 2, mini_batch_size: 16}}".replace(
             "PLACEHOLDER", str(run / "base")),
         "iterate={promote: s1, fallback: s3, min_teacher_gain: 1.0, online_steps: 1}",
         "onpolicy={loss: grpo, prompts_per_step: 8, steps: 1}", "eval.every=0", "data.eval_prompts=8", "eval.k=1")
    promoted = json.loads((run / "iter_0" / "promoted.json").read_text())
    assert promoted["student"] == "s3" and "fallback" in promoted["reason"]  # a gain of 1.0 is impossible
    assert promoted["online"] == "online_0" and promoted["checkpoint"].endswith("ckpt/online_0/iter_0000001")
    from erpd_megatron.data.rollout_store import RolloutStore

    store = RolloutStore(run / "rollouts")
    assert store.batches() == [0, 1]
    assert set(store.read_table(1, columns=["policy_version"])["policy_version"].to_pylist()) == {1}
    summary = json.loads((run / "summary.json").read_text())
    assert {"ce", "s1", "s3", "online_0", "it1_ce", "it1_s1", "it1_s3", "onpolicy_grpo"} <= set(summary["methods"])
    assert summary["methods"]["online_0"]["rollouts"] == 8 * 4


def test_early_stop_rule():
    from erpd_megatron.pipeline.train import _no_progress

    evals = {s: {"avg_at_k": a} for s, a in [(0, 0.3), (10, 0.4), (20, 0.35), (30, 0.38)]}
    assert _no_progress(evals, 2) and not _no_progress(evals, 3)
    assert not _no_progress({0: {"avg_at_k": 0.3}, 10: {"avg_at_k": 0.3}}, 2)  # a tie is no progress
