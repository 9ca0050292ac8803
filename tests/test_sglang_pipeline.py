"""The micro pipeline end to end with ``rollout.engine=sglang``: a real sglang 0.5.23 server on CPU (the
environment `make sglang-env` builds) generates every rollout and evaluation, and receives every weight push
through the tensor transport; SIGKILLed during teacher training and rerun, the run resumes and finishes.

Shrunk from micro.yaml to one teacher, one student and the on-policy baseline (every stage still runs:
build, load, save, collect, train, signals, eval, weight sync). The killed run leaves its server behind (it
runs in its own session); the rerun, on the same port, stops it by the pid file in the run directory and
starts its own -- if it did not, the port would be taken and the rerun would fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sglang_env import free_port, require_sglang
from test_pipeline import PRESETS, erpd

pytestmark = pytest.mark.slow

# 8 prompts x 4 samples per batch, 4 eval prompts x 2: CPU sglang generates slowly (~30 tok/s), and what is
# tested here is the plumbing, not the learning
SHRUNK = ["data.prompts_per_batch=8",
          "teachers={ce: {loss: ce, steps: 4, mini_batch_size: 16, lr: 1.0e-4, save_every: 2}}",
          "students={s1: {strategies: [1], teacher: ce, steps: 2, mini_batch_size: 16, lr: 3.0e-5}}",
          "onpolicy={loss: grpo, prompts_per_step: 4, lr: 3.0e-5, steps: 2}", "eval.every=2", "eval.k=2",
          "data.eval_prompts=4"]


def test_micro_pipeline_on_real_sglang_with_kill_and_resume(tmp_path, toy_base):
    python = require_sglang()
    run = tmp_path / "sgl_micro"
    args = ["run", "--config", str(PRESETS / "micro.yaml"), f"run_dir={run}", f"model.base={toy_base}",
            "rollout.engine=sglang", f"rollout.sglang_python={python}", f"rollout.sglang_port={free_port()}",
            *SHRUNK]
    r1 = erpd(*args, env={"ERPD_TEST_KILL_AT": "ce:3"}, check=False)
    assert r1.returncode == -9, r1.stderr[-3000:]  # SIGKILL after the teacher's step 3
    r2 = erpd(*args, env={"ERPD_TEST_KILL_AT": "ce:3"})  # resumes (the kill fires once) and finishes
    assert "stopped the server an earlier, killed run left behind" in r2.stderr, r2.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["methods"]) == {"ce", "s1", "onpolicy_grpo"}
    for name, m in summary["methods"].items():
        assert m["curve"][-1]["step"] == m["steps"], name
    from erpd_megatron.utils.timing import STAGES

    times = summary["stage_times"]
    assert all(times["counts"][k] > 0 for k in STAGES), times["counts"]
    steps = [json.loads(x)["step"] for x in (run / "metrics" / "ce.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # each step once across the kill
    log = (run / "logs" / "sglang_server0.log").read_text()
    assert log.count("=== start (epoch 0)") == 2  # one server per invocation; the orphan was stopped
    assert "sglang.launch_server" in log and "--device cpu" in log
    assert not Path(str(run / "logs" / "sglang_server0.log") + ".pid").exists()  # shut down at the end
