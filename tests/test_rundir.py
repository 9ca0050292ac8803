"""Run-dir helpers: the mini-batch schedule is a pure function, metric logs rewind on resume, reports build."""

import json

import pytest

from erpd_megatron.pipeline.report import build_summary, write_report
from erpd_megatron.pipeline.rundir import MetricLog, RunDir, minibatch_indices


def test_minibatch_schedule_covers_each_epoch_once_and_is_pure():
    n, size = 10, 4  # 2 full mini-batches per epoch, the remainder rows wait for another epoch's permutation
    e0 = minibatch_indices(n, size, 0, seed=3) + minibatch_indices(n, size, 1, seed=3)
    assert len(set(e0)) == 8 and all(0 <= i < n for i in e0)
    assert minibatch_indices(n, size, 2, seed=3) != minibatch_indices(n, size, 0, seed=3)  # new epoch, new order
    assert minibatch_indices(n, size, 5, seed=3) == minibatch_indices(n, size, 5, seed=3)
    assert minibatch_indices(n, size, 0, seed=4) != minibatch_indices(n, size, 0, seed=3)
    assert sorted(minibatch_indices(3, 8, 0, seed=0)) == [0, 1, 2]  # larger than the batch: whole batch


def test_metric_log_rewinds_to_resume_step_and_drops_torn_line(tmp_path):
    path = tmp_path / "m.jsonl"
    log = MetricLog(path, resume_step=0)
    for s in range(1, 6):
        log.log(s, {"loss": s})
    log.close()
    with open(path, "a") as f:
        f.write('{"step": 6, "lo')  # killed mid-line
    log = MetricLog(path, resume_step=3)
    log.log(4, {"loss": 40})
    log.close()
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["loss"] == 40


def test_metric_log_rewind_is_atomic(tmp_path, monkeypatch):
    import errno
    import os

    from erpd_megatron.utils import io

    path = tmp_path / "m.jsonl"
    log = MetricLog(path, resume_step=0)
    for s in range(1, 6):
        log.log(s, {"loss": s})
    log.close()
    before = path.read_text()

    def crash(fd):  # the rewind's write fails (disk full) before its rename
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io.os, "fsync", crash)
    with pytest.raises(OSError, match="No space left"):
        MetricLog(path, resume_step=3)
    monkeypatch.undo()
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["m.jsonl"]
    inode = path.stat().st_ino
    MetricLog(path, resume_step=5).close()  # nothing to drop: the file is left alone
    assert path.stat().st_ino == inode
    MetricLog(path, resume_step=3).close()
    assert path.stat().st_ino != inode and [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]


def test_report_from_eval_files(tmp_path):
    run = RunDir(tmp_path)
    run.write_eval("base", 0, {"avg_at_k": 0.30, "pass_at_k": 0.5, "kl": 0.0, "mean_length": 20})
    for step, acc, kl in ((0, 0.30, 0.0), (10, 0.40, 0.01), (20, 0.35, 0.03)):
        run.write_eval("s1", step, {"avg_at_k": acc, "kl": kl, "pass_at_k": 0.6, "mean_length": 21})
    summary = build_summary(run, {"s1": {"kind": "student", "rollouts": 1024, "wall_s": 12.0}})
    m = summary["methods"]["s1"]
    assert (m["accuracy"], m["kl"], m["steps"]) == (0.35, 0.03, 20)
    assert m["best"] == {"step": 10, "accuracy": 0.40, "kl": 0.01, "kl_token": 0.01 / 21}
    assert summary["base"]["accuracy"] == 0.30
    report = write_report(run, summary)
    text = report.read_text()
    assert "| s1 | student | 1024 | 20 | 35.0% | 0.00143 | 0.0300 | 40.0% (10, 0.00048)" in text
    assert (tmp_path / "accuracy_vs_kl.png").stat().st_size > 1000
