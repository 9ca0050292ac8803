"""Custom rewards (verl's signature) in the reward pool, and the per-record routing by data_source."""

from __future__ import annotations

import pytest

from erpd_megatron.config import ConfigError, RewardConfig
from erpd_megatron.data.prompts import Prompt
from erpd_megatron.rewards.custom import CustomReward, load_function
from erpd_megatron.rewards.router import RewardRouter, make_router

REWARD_PY = '''
import time

def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    if solution_str == "raise":
        raise KeyError("boom")
    if solution_str == "sleep":
        time.sleep(30)
    if solution_str == "none":
        return None
    if solution_str == "dict":
        return {"score": 0.5, "acc": True}
    bonus = (extra_info or {}).get("bonus", 0.0)
    return float(solution_str.strip() == ground_truth) + bonus + (data_source == "src_b") * 10
'''


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(REWARD_PY)
    return f"{path}:compute_score"


def _p(answer, source="", extra=None, i=0):
    meta = {"data_source": source} if source else {}
    if extra is not None:
        meta["extra_info"] = extra
    return Prompt(id=str(i), problem="q", answer=answer, meta=meta)


def test_custom_reward_scores_and_counts_failures(reward_file):
    with CustomReward(reward_file, num_workers=2, timeout_s=3.0, soft_timeout_s=1.0) as r:
        got = r.score_batch(["4", "5", "dict", "raise", "none", "4", "sleep"],
                            [_p("4"), _p("4"), _p("4"), _p("4"), _p("4"), _p("4", "src_b", {"bonus": 0.25}), _p("4")])
        assert got == [1.0, 0.0, 0.5, 0.0, 0.0, 11.25, 0.0]
        st = r.last_stats
        assert st.items == 7 and st.errors == {"KeyError": 1, "bad return": 1} and st.soft_timeouts == 1
        assert st.killed == 0


def test_routing_by_data_source(reward_file):
    class FakeMath:
        def __init__(self):
            self.seen = []

        def score_batch(self, texts, golds):  # the router hands math-verify the gold answers
            self.seen += list(golds)
            return [-1.0] * len(texts)

        def close(self):
            pass

    fake = FakeMath()
    prompts = [_p("4", "src_a", i=0), _p("5", "math", i=1), _p("4", "src_b", i=2)]
    with RewardRouter(math_factory=lambda: fake, custom=CustomReward(reward_file, num_workers=1),
                      routes={"src_a": "custom", "src_b": "custom"}) as r:
        assert r.score_batch(["4", "4", "4"], prompts) == [1.0, -1.0, 11.0]
    assert fake.seen == ["5"]  # only the record whose source is not routed reached math-verify
    with make_router(RewardConfig(custom=reward_file, custom_sources=["src_a", "src_b"])) as r:  # the config's form
        assert r.route(prompts[0]) == r.route(prompts[2]) == "custom" and r.route(prompts[1]) == "math"
    with make_router(RewardConfig(custom=reward_file)) as r:  # no sources: every record is custom's
        assert r.score_batch(["4"], [_p("4", "math")]) == [1.0]
        assert "math" not in r._backends  # math-verify's pool never started


@pytest.mark.parametrize("spec, message", [
    ("nocolon", "expected 'module:function'"),
    ("/no/such/file.py:f", "no such file"),
    ("erpd_megatron.rewards.math:no_such", "has no function 'no_such'"),
    ("no_such_module_xyz:f", "importing no_such_module_xyz failed: ModuleNotFoundError"),
])
def test_bad_spec_is_one_config_error(spec, message):
    with pytest.raises(ConfigError, match=message):
        load_function(spec)


def test_module_spec_loads():
    assert load_function("erpd_megatron.rewards.math:last_boxed")("\\boxed{3}") == "3"
