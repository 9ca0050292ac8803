"""The long-reasoning task (erpd_megatron/toy/chain.py), its base, presets and data names: properties that hold by
construction (determinism, the fixed partition, answers recomputed independently, scratchpad length)."""

import re

import pytest

from erpd_megatron.toy import chain

torch = pytest.importorskip("torch")


def _fold(problem: str) -> list[int]:
    """In-order evaluation of "v 01op d 02op d ... =" written independently of chain.py (numbers checked too)."""
    m = re.fullmatch(r"(\d+)((?: \d\d[+\-*]\d)+)=", problem)
    assert m, problem
    v, out = int(m.group(1)), []
    for i, (n, op, d) in enumerate(re.findall(r" (\d\d)([+\-*])(\d)", m.group(2)), 1):
        assert int(n) == i
        v = {"+": v + int(d), "-": v - int(d), "*": v * int(d)}[op]
        out.append(v)
    return out


def test_draws_are_deterministic_and_seeded():
    a, b = chain.train_problems(50, seed=3), chain.train_problems(50, seed=3)
    assert [p.problem for p in a] == [p.problem for p in b]
    assert [p.problem for p in a] != [p.problem for p in chain.train_problems(50, seed=4)]
    assert len({p.problem for p in a}) == 50  # distinct
    assert [p.problem for p in chain.eval_problems(20, seed=1)] == [p.problem for p in chain.eval_problems(20, seed=1)]


def test_fixed_partition_disjoint_whatever_the_seed():
    train = {p.problem for s in (0, 1) for p in chain.train_problems(300, seed=s)}
    test = {p.problem for s in (0, 1) for p in chain.eval_problems(100, seed=s)}
    val = {p.problem for s in (0, 1) for p in chain.validation_problems(100, seed=s)}
    assert not train & test and not train & val and not test & val
    assert all(not chain.is_heldout(p) for p in chain.train_problems(300, seed=5))
    assert all(chain.is_heldout(p) and not chain.is_validation(p) for p in chain.eval_problems(50, seed=5))
    assert all(chain.is_validation(p) for p in chain.validation_problems(50, seed=5))


def test_answers_and_worked_steps_are_right():
    t = chain.ChainTask()
    for p in chain.train_problems(300, seed=2) + chain.eval_problems(100, seed=2):
        vals = _fold(p.problem)
        assert t.min_ops <= len(vals) <= t.max_ops
        assert all(0 <= v <= t.value_max for v in vals)
        assert p.answer == str(vals[-1])
        steps = p.target.split(";")
        assert steps[-1] == f"\\boxed{{{vals[-1]}}}"
        prev = int(re.match(r"\d+", p.problem).group())
        for i, (line, v) in enumerate(zip(steps[:-1], vals), 1):  # every step is "nn previous op digit = result"
            lhs, rhs = line.split("=")
            assert lhs.startswith(f"{i:02d} {prev}") and len(lhs) == len(f"{i:02d} {prev}") + 2 and int(rhs) == v
            prev = v


def test_scratchpad_length_in_range():
    """The worked solution is 100-300 tokens (the issue's range) and never exceeds the rollout cap."""
    from erpd_megatron.toy.tokenizer import build_tokenizer

    tok = build_tokenizer()
    cap = chain.ChainTask().max_response_tokens
    lengths = [len(tok.encode(p.target)) + 1 for p in chain.train_problems(400, seed=0)]  # + eos
    assert 100 <= min(lengths) and max(lengths) <= cap <= 300


def test_answers_score_one_under_the_reward():
    from erpd_megatron.rewards.math import score

    for p in chain.eval_problems(5, seed=0):  # a long timeout: math-verify's cold import alone can take 5 s under load
        assert score(p.target, p.answer, mode="strict", timeout_s=120) == 1.0
        wrong = p.target.replace(f"\\boxed{{{p.answer}}}", f"\\boxed{{{int(p.answer) + 1}}}")
        assert score(wrong, p.answer, mode="strict", timeout_s=120) == 0.0


def test_toy_cache_key_unchanged_by_the_task_field():
    """Adding WarmupConfig.task (and the code base's stop rule, off by default) must not invalidate bases cached
    before them: the toy's key is computed as before."""
    import hashlib
    import json
    from dataclasses import asdict

    from erpd_megatron.toy import warmup as W

    old = {k: v for k, v in asdict(W.DEMO_BASE).items() if k not in ("task", "stop_t1", "stop_from")}
    blob = json.dumps({"version": W.CACHE_VERSION, **old}, sort_keys=True)
    assert W.cache_key(W.DEMO_BASE) == hashlib.sha256(blob.encode()).hexdigest()[:16]
    assert W.cache_key(W.LONG_BASE) != W.cache_key(W.DEMO_BASE) and W.config_dict(W.LONG_BASE)["task"] == "long"


def test_long_warmup_runs_on_the_long_task(tmp_path):
    """Two warm-up steps of a small model on the long task: the training and eval paths use chain problems (the
    saved generation config carries the long cap), not the toy's."""
    import json

    from erpd_megatron.toy import warmup as W

    cfg = W.WarmupConfig(steps=2, batch_size=4, eval_prompts=2, eval_samples=1, task="long",
                         model={"max_position_embeddings": 256})
    res = W.warmup(tmp_path / "b", cfg, log=lambda m: None)
    assert res["config"]["task"] == "long" and res["final"]["n_prompts"] == 2
    gen = json.loads((tmp_path / "b" / "generation_config.json").read_text())
    assert gen["max_new_tokens"] == chain.ChainTask().max_response_tokens
    with pytest.raises(ValueError, match="task"):
        W.warmup(tmp_path / "c", W.WarmupConfig(steps=0, task="nope"))


@pytest.mark.parametrize("preset", ["long", "bench_long", "long_claims"])
def test_long_presets_load_and_validate(preset):
    from erpd_megatron.config import load_config
    from erpd_megatron.pipeline.context import TOY_BASES, TOY_DATA
    from erpd_megatron.pipeline.run import config_path

    cfg = load_config(config_path(preset))
    assert cfg.model.base == "toy_long" and TOY_BASES[cfg.model.base] == "LONG_BASE"
    assert TOY_DATA[cfg.data.train] == "chain" and TOY_DATA[cfg.data.eval] == "chain"
    assert cfg.data.eval == "long"  # reported on the test split; tuning overrides data.eval=long_val
    assert cfg.rollout.max_new_tokens >= chain.ChainTask().max_response_tokens


def test_long_data_names_write_the_chain_splits(tmp_path):
    """data.train=long draws training problems, data.eval=long / long_val the test / validation split."""
    import json

    from erpd_megatron.config import load_config
    from erpd_megatron.pipeline.context import load_prompts
    from erpd_megatron.pipeline.rundir import RunDir

    for spec, check in (("long", lambda p: not chain.is_validation(p)), ("long_val", chain.is_validation)):
        cfg = load_config(overrides=[f"run_dir={tmp_path / spec}", "data.train=long", f"data.eval={spec}",
                                     "data.prompts_per_batch=4", "data.eval_prompts=6", "teachers.ce.mini_batch_size=8"])
        load_prompts(cfg, RunDir(tmp_path / spec))
        rows = [json.loads(x) for x in (tmp_path / spec / "data" / f"{spec}_eval.jsonl").read_text().splitlines()]
        by_problem = {p.problem: p for p in chain.eval_problems(6, cfg.seed) + chain.validation_problems(6, cfg.seed)}
        assert len(rows) == 6 and all(check(by_problem[r["problem"]]) for r in rows)
        train = (tmp_path / spec / "data" / "long_train.jsonl").read_text().splitlines()
        assert all(r["id"].startswith("chain-") for r in map(json.loads, train))


def test_default_task_is_plus_minus_with_three_digit_values():
    """The `long` preset's task (LONG_OPS): + and - only, every running value three-digit (a fixed-format step);
    the operator set is validated and * still draws when asked for."""
    for p in chain.train_problems(200, seed=7):
        assert {op for op, _ in p.steps} <= {"+", "-"}
        assert all(100 <= v <= 999 for v in [p.start, *p.values])
    with pytest.raises(ValueError, match="ops"):
        chain.ChainTask(ops=("/",))
    import random

    t = chain.ChainTask(ops=chain.OPS)
    assert any(op == "*" for _ in range(20) for op, _ in chain.random_problem(random.Random(_), t).steps)
