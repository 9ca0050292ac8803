"""The toy code task's data: fixed function-level partition, determinism, records the loader reads as code records,
reference programs passing their hidden tests in the real sandbox and example-memorising programs failing them."""

import json

from erpd_megatron.data.prompts import load_prompts
from erpd_megatron.rewards.code import CodeReward, extract_code
from erpd_megatron.rewards.router import RewardRouter
from erpd_megatron.toy import code_task as ct
from tests.test_sandbox_hostile import _need_bwrap


def test_partition_and_determinism():
    allp = ct.all_problems()
    assert len(allp) == 72_000 and len(set(allp)) == 72_000
    held = [p for p in allp if ct.is_heldout(p)]
    val = [p for p in held if ct.is_validation(p)]
    assert 8_000 < len(held) < 10_000 and 0.4 < len(val) / len(held) < 0.6
    assert ct.pool_size("train") + ct.pool_size("validation") + ct.pool_size("eval") == len(allp)
    tr, va, ev = ct.train_problems(200, seed=3), ct.validation_problems(40, seed=3), ct.eval_problems(40, seed=3)
    assert not set(tr) & (set(va) | set(ev)) and not set(va) & set(ev)
    assert ct.train_problems(200, seed=3) == tr and ct.train_problems(200, seed=4) != tr
    p = ct.CodeProblem(3, 1)
    assert p.problem == "f(0)=1;f(1)=4;f(2)=7;" and p.shown == [0, 1, 2]
    assert ct.CodeProblem(17, 1985).problem == "f(0)=1985;f(1)=2002;f(2)=2019;"  # every shown value has 4 digits
    assert not set(p.shown) & set(p.hidden) and extract_code(p.target) == "def f(x):return x*3+1\n"


def test_records_score_in_the_sandbox(tmp_path):
    _need_bwrap()
    probs = ct.eval_problems(4, seed=0)
    prompts = {p.id: p for p in load_prompts(ct.write_jsonl(probs, tmp_path / "toy_code.jsonl"))}
    assert all(prompts[p.id].problem == p.problem and prompts[p.id].answer == "" for p in probs)
    memorise = ["```python\ndef f(x):\n" + "".join(f"    if x == {x}: return {p.f(x)}\n" for x in p.shown)
                + "    return 0\n```" for p in probs]
    off_by_one = [f"```python\ndef f(x):return x*{p.a}+{p.b + 1}\n```" for p in probs]
    responses = [p.target for p in probs] + memorise + off_by_one
    # A generous per-test limit: nothing here loops, and a loaded 2-core machine once took > 3 s to start one.
    with RewardRouter(code_factory=lambda: CodeReward(num_workers=2, timeout_per_test_s=30)) as router:
        got = router.score_batch(responses, [prompts[p.id] for p in probs * 3])
        assert set(router.last_kinds) == {"code"}
    assert got == [1.0] * 4 + [0.0] * 8
    row = probs[0].row()
    assert json.loads(row["input_output"])["fn_name"] == "f" and row["data_source"] == "toy_code"


def test_code_tokenizer_and_the_warmup_scorer():
    from erpd_megatron.toy.code_base import CODE_VOCAB, VOCAB_SIZE, build_code_tokenizer, correct
    from erpd_megatron.toy.tokenizer import VOCAB

    tok = build_code_tokenizer()
    p = ct.CodeProblem(3, 1)
    ids = tok.encode(p.target, add_special_tokens=False)
    assert tok.decode(ids) == p.target and len(ids) == 7  # HEAD x * 3 + 1 CLOSE
    big = ct.CodeProblem(19, 4999)  # the longest program and prompt
    assert tok.decode(tok.encode(big.target, add_special_tokens=False)) == big.target
    assert len(tok.encode(big.target, add_special_tokens=False)) == 11  # HEAD x * 1 9 + 4 9 9 9 CLOSE
    assert len(tok.encode(p.problem, add_special_tokens=False)) == len(p.problem)
    assert CODE_VOCAB[:6] == VOCAB[:6] and len(CODE_VOCAB) <= VOCAB_SIZE  # same special ids as the math toy
    assert correct(p.target, p) and not correct(p.target.replace("+1", "+2"), p) and not correct("x*3+1", p)


def test_pipeline_generates_toy_code_data(tmp_path):
    from erpd_megatron.config import load_config
    from erpd_megatron.pipeline.context import load_prompts as ctx_load
    from erpd_megatron.pipeline.rundir import RunDir

    cfg = load_config("erpd_megatron/presets/toy_code.yaml", [f"run_dir={tmp_path}", "data.eval=toy_code_val"])
    train, evals = ctx_load(cfg, RunDir(tmp_path))
    assert len(evals) == cfg.data.eval_prompts and all(p.meta["input_output"] for p in train + evals)
    tr, ev = {p.id for p in train}, {p.id for p in evals}
    assert not tr & ev and all(ct.is_validation(ct.CodeProblem(*map(int, i.split("-")[1:]))) for i in ev)


def test_collect_stage_scores_code_in_the_sandbox(tmp_path):
    """`erpd collect` on the toy code task: a briefly warmed base samples programs, the real sandbox scores them
    (stored rewards are 0 / 1), and the base's evaluation records the code reward's stats."""
    _need_bwrap()
    import dataclasses

    from erpd_megatron.data.rollout_store import RolloutStore
    from erpd_megatron.pipeline.run import main_collect
    from erpd_megatron.toy.code_base import CODE_BASE, warmup_code_base

    base = warmup_code_base(tmp_path / "base", dataclasses.replace(CODE_BASE, steps=60, eval_prompts=8, eval_samples=1),
                            log=lambda *a: None)
    run = tmp_path / "run"
    rc = main_collect(["--config", "toy_code", f"run_dir={run}", f"model.base={base}", "data.prompts_per_batch=8",
                       "rollout.n_samples=2", "data.eval_prompts=6", "eval.k=1", "teachers.ce.mini_batch_size=16"])
    assert rc in (0, None)
    batch = RolloutStore(run / "rollouts").load_tensors(0)
    assert batch["rewards"].numel() == 16 and set(batch["rewards"].tolist()) <= {0.0, 1.0}
    (res,) = [json.loads(p.read_text()) for p in (run / "eval").rglob("step_*.json")]
    assert res["reward_stats"]["kinds"] == {"code": 6} and sum(res["reward_stats"]["reasons"].values()) == 6


def test_code_base_is_cached_per_config_and_task(tmp_path, monkeypatch):
    """A second run dir copies the warmed code base from the shared cache, and the run dir itself is found cached
    (its warmup.json holds the config as the cache check builds it); the task's ranges are part of the key."""
    import dataclasses

    from erpd_megatron.toy.code_base import CODE_BASE, CODE_TASK_NAME, warmup_code_base
    from erpd_megatron.toy.warmup import _cached, cache_key

    monkeypatch.setenv("ERPD_CACHE", str(tmp_path / "cache"))
    cfg = dataclasses.replace(CODE_BASE, steps=2, batch_size=8, eval_prompts=4, eval_samples=1)
    warmup_code_base(tmp_path / "a", cfg, log=lambda *_: None)
    assert _cached(tmp_path / "a", cfg) is not None
    msgs = []
    warmup_code_base(tmp_path / "b", cfg, log=msgs.append)
    assert any("copied cached base" in m for m in msgs) and not any("saved" in m for m in msgs)
    assert "a2-19,b1000-4999" in CODE_TASK_NAME
    assert cache_key(cfg) != cache_key(dataclasses.replace(cfg, task="toy_code:a2-19,b0-99"))


def test_code_base_stop_rule_stops_at_first_point_reaching_the_threshold(tmp_path, monkeypatch):
    """`stop_t1`: the warm-up ends at the first stop point (every `eval_every` steps from `stop_from`) whose
    validation T=1 reaches the threshold. The measurement is replaced (1.0 from step 4 on, 0 before), so where it
    stops holds by construction; with the rule off the cache key is the one from before the rule existed."""
    import dataclasses

    from erpd_megatron.toy import code_base
    from erpd_megatron.toy.warmup import WarmupConfig, config_dict

    monkeypatch.setenv("ERPD_CACHE", str(tmp_path / "cache"))
    seen = []

    def fake_headroom(model, tokenizer, problems, **kw):
        seen.append(1)
        return {"t1": 1.0 if len(seen) >= 2 else 0.0, "greedy": 0.0, "mixed": 0.0}

    monkeypatch.setattr(code_base, "headroom", fake_headroom)
    cfg = dataclasses.replace(code_base.CODE_BASE, steps=10, batch_size=4, eval_prompts=2, eval_samples=1,
                              eval_every=2, stop_from=2, stop_t1=0.5)
    out = code_base.warmup_code_base(tmp_path / "b", cfg, log=lambda *_: None)
    rec = json.loads((out / "warmup.json").read_text())
    assert rec["steps_trained"] == 4 and [c["step"] for c in rec["curve"]] == [2, 4]
    assert "stop_t1" not in config_dict(WarmupConfig()) and config_dict(cfg)["stop_t1"] == 0.5
