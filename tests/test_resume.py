"""Resume bookkeeping of the training loop (pipeline/train.py, stages.py): a finished method is skipped from its
completion marker without building a model; which teacher checkpoints `checkpoint.keep_last` must keep."""

import json
from types import SimpleNamespace

import pytest

from erpd_megatron.config import load_config
from erpd_megatron.pipeline import train as T
from erpd_megatron.pipeline.rundir import RunDir
from erpd_megatron.pipeline.stages import teacher_keep_steps


class Built(Exception):
    pass


def _ctx(tmp_path):
    def new_policy(**_):
        raise Built("a model was built")

    return SimpleNamespace(run=RunDir(tmp_path), cfg=load_config(None, []), new_policy=new_policy, is_main=True,
                           barrier=lambda: None)


def _loop(ctx, steps):
    return T.train_loop(ctx, "ce", batch=None, loss_fn=None, steps=steps, mini_batch_size=1, lr=1e-4, save_every=1,
                        init=None)


def test_finished_method_is_skipped_without_building_a_model(tmp_path):
    ctx = _ctx(tmp_path)
    with pytest.raises(Built):  # no marker: the loop builds its policy
        _loop(ctx, 4)
    ck = ctx.run.ckpt("ce")
    ck.mkdir(parents=True)
    (ck / T.FINISHED).write_text(json.dumps({"steps": 4}))
    assert T.finished(ck, 4) and _loop(ctx, 4) is None
    assert not T.finished(ck, 6)  # steps grown on resume: it continues from its last checkpoint
    with pytest.raises(Built):
        _loop(ctx, 6)
    (ck / T.FINISHED).unlink()
    (ck / T.STOPPED).write_text("3\n")  # early-stopped: finished whatever the steps
    assert T.finished(ck, 6) and _loop(ctx, 6) is None
    (ck / T.STOPPED).unlink()
    (ck / T.FINISHED).write_text("{torn")
    assert not T.finished(ck, 4)


def test_keep_last_protects_what_later_stages_read():
    cfg = load_config(None, [
        "teachers={ce: {loss: ce, steps: 40, save_every: 10}, mse: {loss: mse, steps: 40, save_every: 10},"
        " rec: {loss: sft, steps: 10, init: 'ce@20'}}",
        "students={a: {strategies: [1], teacher: ce, teacher_step: 30}, b: {strategies: [2], teacher: mse,"
        " unlearned_step: 10}}", "checkpoint.keep_last=1"])
    assert cfg.checkpoint.keep_last == 1
    assert teacher_keep_steps(cfg, "ce") == {30, 20}
    assert teacher_keep_steps(cfg, "mse") == {10}
    assert teacher_keep_steps(cfg, "rec") == set()
    auto = load_config(None, ["students={b: {strategies: [2], teacher: ce, unlearned_step: -1}}"])
    assert teacher_keep_steps(auto, "ce") is None  # the dip is chosen among every saved checkpoint: keep all
