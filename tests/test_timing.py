"""Per-stage wall time (utils/timing.py, issue 15 item 3): nested sections are charged to the innermost one,
records of several invocations add up, and summary.json / report.md carry them. No timing thresholds: the
checks are on structure (keys, counts, sums, non-negative values), true whatever the machine's speed."""

import json

import pytest

from erpd_megatron.pipeline.report import build_summary, write_report
from erpd_megatron.pipeline.rundir import RunDir
from erpd_megatron.utils import timing


def test_nested_stages_are_exclusive():
    clock = timing.StageClock()
    with clock.stage("train"):
        with clock.stage("checkpoint_save"):
            pass
        with clock.stage("eval"):
            with clock.stage("weight_sync"):
                pass
    with clock.stage("train"):
        pass
    rec = clock.record()
    assert rec["counts"] == {"train": 2, "checkpoint_save": 1, "eval": 1, "weight_sync": 1}
    assert all(v >= 0.0 for v in rec["stages"].values()) and all(v >= 0.0 for v in rec["cpu"].values())
    assert set(rec["cpu"]) == set(rec["stages"])
    # exclusive times never add up to more than the clock's own totals
    assert sum(rec["stages"].values()) <= rec["wall_s"] and sum(rec["cpu"].values()) <= rec["cpu_s"]


def test_exception_still_counts_and_unwinds():
    clock = timing.StageClock()
    with pytest.raises(RuntimeError):
        with clock.stage("collect"):
            raise RuntimeError("boom")
    with clock.stage("train"):
        pass
    assert clock.counts == {"collect": 1, "train": 1} and not clock._stack


def test_invocations_add_up_and_summary_fields(tmp_path):
    run = RunDir(tmp_path / "run")
    for i in range(2):  # two invocations (a resumed run): hand-made records, so the sums are exact
        d = timing.times_dir(run.root)
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i}_1.json").write_text(json.dumps({"started": i, "wall_s": 10.0, "cpu_s": 4.0, "stages": {
            "model_build": 1.0, "train": 2.0 + i, "base_import": 0.5}, "cpu": {"train": 1.5},
            "counts": {"model_build": 2, "train": 1}}))
    s = timing.summarize(run.root)
    assert s["invocations"] == 2 and s["wall_s"] == 20.0
    assert list(s["stages"])[: len(timing.STAGES)] == list(timing.STAGES)  # every stage listed, in order
    assert s["stages"]["model_build"] == 2.0 and s["stages"]["train"] == 5.0 and s["stages"]["base_import"] == 1.0
    assert s["stages"]["collect"] == 0.0 and s["stages"]["other"] == 20.0 - 8.0
    assert s["counts"]["model_build"] == 4 and s["counts"]["train"] == 2
    assert s["cpu_s"] == 8.0 and s["cpu"]["train"] == 3.0 and s["cpu"]["other"] == 5.0 and s["cpu"]["collect"] == 0.0
    assert set(s["cpu"]) == set(s["stages"])
    summary = build_summary(run, {})
    assert summary["stage_times"] == s
    report = write_report(run, summary).read_text()
    assert "Wall time by stage (exclusive): model build 2.0 s (10 %)" in report and "over 2 invocation(s)" in report
    assert json.loads((run.root / "summary.json").read_text())["stage_times"]["stages"]["train"] == 5.0


def test_live_clock_saved_and_read_back(tmp_path):
    clock = timing.reset()
    with timing.stage("signals"):
        pass
    path = timing.save(tmp_path, clock)
    timing.save(tmp_path, clock)  # rewritten in place: one record per invocation
    assert list(timing.times_dir(tmp_path).glob("*.json")) == [path]
    s = timing.summarize(tmp_path)
    assert s["counts"]["signals"] == 1 and s["invocations"] == 1
    assert all(v >= 0.0 for v in s["stages"].values())
    assert timing.summarize(tmp_path / "none") is None
