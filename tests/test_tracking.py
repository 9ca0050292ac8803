"""What the operator sees and what the trackers get (utils/console.py, utils/tracking.py, pipeline/report.py).

- unit: the step line, its period (`logging.log_every`), the note on a negative k1 KL, the warning filters;
- a micro pipeline with W&B offline: the `.wandb` files read back hold the JSONL's metric names and values
  at the same steps, the resolved config and the git commit; the console has a header per stage, step lines
  every N steps, no megatron "Overwriting old incomplete" warning and none of the known third-party warnings;
  `erpd report` rebuilds the same summary from the run dir and `erpd compare` tables two runs.
"""

import json
import logging
import shutil
import warnings

import pytest
from test_pipeline import PRESETS, erpd

from erpd_megatron.utils import console


def test_step_line_fields_period_and_negative_kl_note():
    m = {"loss": 0.5, "policy/kl_fwd_k3_tok_batch": 0.0123, "policy/entropy": 1.25, "train/grad_norm": 3.0,
         "perf/tokens_per_s": 12345.6, "policy/kl_fwd_k1_seq_batch": 0.2}
    line = console.step_line("ce", 3, 10, m, eta_s=75)
    assert line == "[ce] step 3/10 | loss 0.5 | kl/tok 0.0123 | ent 1.25 | gnorm 3 | tok/s 12346 | eta 1:15"
    console._NOTED.clear()
    neg = console.step_line("s1", 1, 2, {**m, "policy/kl_fwd_k1_seq_batch": -0.01})
    assert "k1 kl/seq -0.01 < 0" in neg and "unbiased" in neg
    again = console.step_line("s1", 2, 2, {**m, "policy/kl_fwd_k1_seq_batch": -0.02})
    assert "k1 kl/seq -0.02 < 0)" in again and "unbiased" not in again  # the explanation once per run
    assert not console.kl_note(-1e-3) and not console.kl_note(0.0)
    console._NOTED.clear()
    assert console.kl_note(-1e-3) and not console.kl_note(-1e-3)
    console.configure(log_every=4)
    try:
        assert [s for s in range(1, 11) if console.should_print(s, 10)] == [4, 8, 10]  # and always the last
    finally:
        console.configure()


def test_known_warnings_are_quiet_and_others_still_show():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.quiet_third_party()
        warnings.warn("Apex is not installed. Falling back to Torch Norm", UserWarning, stacklevel=1)
        warnings.warn("Please use DTensor instead and we are deprecating ShardedTensor.", FutureWarning, stacklevel=1)
        warnings.warn("Apex is broken in a new way", UserWarning, stacklevel=1)  # not a known message
    assert [str(w.message) for w in caught] == ["Apex is broken in a new way"]
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("megatron.core.distributed.distributed_data_parallel")
    logger.addHandler(handler)
    try:
        logger.warning("DistributedDataParallel: full_param_layout not provided with use_distributed_optimizer=True.")
        logger.warning("something new")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["something new"]


def test_logging_settings_may_change_on_resume():
    """Console and tracking settings do not alter results: a run dir accepts new ones (a seed change is refused)."""
    from erpd_megatron.config import load_config, to_dict
    from erpd_megatron.pipeline.run import locked_changes

    old = to_dict(load_config(str(PRESETS / "micro.yaml")))
    new = to_dict(load_config(str(PRESETS / "micro.yaml"), ["logging.wandb.mode=offline", "logging.log_every=5",
                                                             "logging.progress=never", "logging.report_kl=sequence"]))
    assert locked_changes(old, new, set()) == []
    assert locked_changes(old, {**new, "seed": 8}, set()) == ["seed: 7 -> 8"]


def test_git_commit_of_this_checkout(tmp_path):
    import re
    import subprocess

    from erpd_megatron.utils.tracking import _PKG_DIR, git_commit

    if subprocess.run(["git", "-C", str(_PKG_DIR), "rev-parse"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout (an installed copy)")
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", git_commit())
    assert git_commit(tmp_path) is None  # outside any checkout


TINY = ["teachers={ce: {loss: ce, steps: 2, mini_batch_size: 16, save_every: 2}}",
        "students={s1: {strategies: [1], teacher: ce, steps: 2, mini_batch_size: 16}}",
        "onpolicy={loss: grpo, prompts_per_step: 8, steps: 2}", "eval.every=0", "data.eval_prompts=8", "eval.k=1"]


@pytest.mark.slow
def test_micro_pipeline_wandb_offline_console_and_report(tmp_path, toy_base):
    from erpd_megatron.utils.tracking import git_commit, offline_runs, read_offline_run

    run = tmp_path / "run"
    out = erpd("run", "--config", str(PRESETS / "micro.yaml"), f"run_dir={run}", f"model.base={toy_base}", *TINY,
               "logging.wandb.mode=offline", "logging.wandb.project=erpd-test", "logging.log_every=2",
               env={"WANDB_SILENT": "true"})
    err = out.stderr
    # console: a header per stage, a step line every 2 steps (and the last), no spurious / known warnings
    for h in ("==== collect batch 0", "==== stage 1: teacher ce", "==== signals of batch 0", "==== stage 2: student s1",
              "==== on-policy baseline onpolicy_grpo", "==== report"):
        assert h in err, h
    assert "[ce] step 2/2 | loss" in err and "[ce] step 1/2" not in err
    assert "Overwriting old incomplete" not in err
    for _cat, message, _why in console.KNOWN_WARNINGS:
        assert message not in err, message
    # W&B offline: one run per method, the JSONL's metric names and values at the same steps
    runs = {read_offline_run(p)["name"]: read_offline_run(p) for p in offline_runs(run).values()}
    assert set(runs) == {"ce", "s1", "onpolicy_grpo"}
    for method, wb in runs.items():
        assert wb["group"] == "run"
        cfg = wb["config"]
        assert cfg["run_dir"] == str(run) and cfg["teachers"]["ce"]["steps"] == 2 and cfg["method"] == method
        assert "git_commit" in cfg and cfg["git_commit"] == git_commit()  # this checkout's HEAD (None outside git)
        jsonl = [json.loads(x) for x in (run / "metrics" / f"{method}.jsonl").read_text().splitlines()]
        train = [h for h in wb["history"] if any(not k.startswith(("eval/", "_")) for k in h)]
        assert [h["_step"] for h in train] == [r["step"] for r in jsonl] == [1, 2]
        for h, r in zip(train, jsonl):
            tracked = {k: v for k, v in h.items() if not k.startswith(("eval/", "_"))}
            assert set(tracked) == set(r) - {"step"}
            for k, v in tracked.items():
                assert v == pytest.approx(r[k], nan_ok=True), (method, k)
        evals = {h["_step"]: h["eval/avg_at_k"] for h in wb["history"] if "eval/avg_at_k" in h}
        files = {int(p.stem.split("_")[1]): json.loads(p.read_text())["avg_at_k"]
                 for p in (run / "eval" / method).glob("step_*.json")}
        assert evals == files and {0, 2} <= set(files)
    info = json.loads((run / "run_info.json").read_text())
    assert info["invocations"][0]["git_commit"] == runs["ce"]["config"]["git_commit"]
    # erpd report rebuilds the same summary (and plot) from the run dir alone
    first = json.loads((run / "summary.json").read_text())
    for f in ("summary.json", "report.md", "accuracy_vs_kl.png"):
        (run / f).unlink()
    erpd("report", str(run))
    again = json.loads((run / "summary.json").read_text())
    assert again["methods"] == first["methods"]
    assert again["methods"]["onpolicy_grpo"]["curve"][-1]["rollouts"] == 2 * 8 * 4  # on-policy: per step
    assert (run / "accuracy_vs_kl.png").stat().st_size > 1000 and (run / "report.md").exists()
    # erpd compare: two runs (the second holds only its summary) in one table and one plot
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(run / "summary.json", other / "summary.json")
    cmp = erpd("compare", str(run), str(other), "--out", str(tmp_path / "cmp"))
    assert "| run | s1 |" in cmp.stdout and "| other | s1 |" in cmp.stdout
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
    bad = erpd("report", str(tmp_path / "nothing"), check=False)
    assert bad.returncode == 2 and "not a run directory" in bad.stderr and "Traceback" not in bad.stderr
