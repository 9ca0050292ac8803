"""erpd eval: pass@k estimator, AVG@K / pass@K / length against a hand count, judge fallback, CLI end to end."""

from __future__ import annotations

import json

import pytest
import torch

from erpd_megatron.rollout.engine import Sample, SamplingParams
from erpd_megatron.rollout.eval import evaluate, main, pass_at_k


def test_pass_at_k_hand_values():
    assert pass_at_k(4, 0, 1) == 0.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # C(3,2)/C(4,2)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # C(3,3)/C(5,3)
    assert pass_at_k(4, 3, 2) == 1.0
    assert pass_at_k(4, 4, 4) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


@pytest.fixture(scope="module")
def tokenizer():
    from erpd_megatron.toy.tokenizer import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def reward():
    from erpd_megatron.rewards.math import MathReward

    with MathReward(num_workers=1, mode="strict") as r:
        yield r


# Problem i, sample j -> response text. Answers 12, 7, 30. Correct counts: 0, 1 (+1 judge), 4.
RESPONSES = {
    0: ["\\boxed{11}", "\\boxed{13}", "1+1=2", "\\boxed{21}"],
    1: ["\\boxed{7}", "\\boxed{8}", "3+4= 7", "\\boxed{9}"],
    2: ["\\boxed{30}", "5*6=30;\\boxed{30}", "\\boxed{30}", "\\boxed{30}"],
}
PROBLEMS = [{"id": "a", "problem": "5+7", "answer": "12"}, {"id": "b", "problem": "3+4", "answer": "7"},
            {"id": "c", "problem": "5*6", "answer": "30"}]


class FakeEngine:
    """Returns the RESPONSES table, encoded with the real tokenizer (deterministic; counting test only)."""

    def __init__(self, tok):
        self.tok = tok
        self.calls = []

    def generate(self, prompt_ids, sampling):
        self.calls.append((len(prompt_ids), sampling.n))
        out = []
        for i in range(len(prompt_ids)):
            for j in range(sampling.n):
                ids = self.tok.encode(RESPONSES[i][j], add_special_tokens=False)
                out.append(Sample(i, ids, [-0.1] * len(ids), "stop" if j % 2 else "length", None, sample_index=j))
        return out


def test_counts_match_hand_count(tokenizer, reward):
    judged = []

    def judge(problem, answer, response):
        judged.append(response)
        return response == "3+4= 7"  # the judge accepts one answer math-verify (strict) rejects

    eng = FakeEngine(tokenizer)
    res = evaluate(eng, tokenizer, PROBLEMS, SamplingParams(temperature=0.5, seed=1), k=4, reward=reward, judge=judge)
    t, per = res["total"], res["per_problem"]
    assert eng.calls == [(3, 4)]
    assert [q["correct"] for q in per] == [0, 2, 4]
    assert [q["math_verify"] for q in per][1] == [1.0, 0.0, 0.0, 0.0]
    assert per[1]["judge"] == [None, False, True, False]
    assert len(judged) == 4 + 3 + 0  # only samples math-verify scored 0
    assert t["avg_at_k"] == pytest.approx(6 / 12)
    assert t["avg_at_k_math_verify"] == pytest.approx(5 / 12)
    assert t["judge_flips"] == 1 and t["judge_calls"] == 7
    assert t["pass_at_k"] == pytest.approx(2 / 3)
    assert t["pass_at"]["1"] == pytest.approx((0 + 2 / 4 + 1) / 3)
    assert t["pass_at"]["2"] == pytest.approx((0 + (1 - 1 / 6) + 1) / 3)  # b: 1 - C(2,2)/C(4,2)
    lengths = [len(tokenizer.encode(r, add_special_tokens=False)) for i in range(3) for r in RESPONSES[i]]
    assert t["mean_length"] == pytest.approx(sum(lengths) / 12)
    assert t["truncated_frac"] == 0.5
    json.dumps(res)  # serialisable
    # Without a judge: math-verify alone.
    res2 = evaluate(FakeEngine(tokenizer), tokenizer, PROBLEMS, SamplingParams(), k=4, reward=reward)
    assert res2["total"]["avg_at_k"] == pytest.approx(5 / 12) and res2["per_problem"][0]["judge"] is None


def _tiny_model(tokenizer):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                      tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
    torch.manual_seed(0)
    return Qwen3ForCausalLM(cfg).eval()


def test_real_local_engine_and_cli(tmp_path, tokenizer, reward):
    from erpd_megatron.rollout.local_engine import LocalEngine

    torch.set_num_threads(1)
    model = _tiny_model(tokenizer)
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    eng = LocalEngine(model, tokenizer)
    sp = SamplingParams(temperature=1.0, max_new_tokens=6, seed=3)
    res = evaluate(eng, tokenizer, PROBLEMS, sp, k=3, reward=reward, instruction=None)
    # Hand recount from an independent generate + score with the same seed.
    from erpd_megatron.data.prompts import encode_prompts

    samples = eng.generate(encode_prompts(tokenizer, [p["problem"] for p in PROBLEMS], instruction=None),
                           SamplingParams(n=3, temperature=1.0, max_new_tokens=6, seed=3))
    texts = [tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples]
    scores = reward.score_batch(texts, [PROBLEMS[s.prompt_index]["answer"] for s in samples])
    assert res["total"]["avg_at_k"] == pytest.approx(sum(scores) / 9)
    assert res["total"]["mean_length"] == pytest.approx(sum(len(s.response_ids) for s in samples) / 9)
    assert [q["responses"] for q in res["per_problem"]] == [texts[3 * i:3 * i + 3] for i in range(3)]

    # `erpd eval` end to end on a saved HF directory.
    model_dir = tmp_path / "hf"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "eval.json"
    assert main(["--benchmark", str(bench), "--model", str(model_dir), "--k", "3", "--max-new-tokens", "6",
                 "--seed", "3", "--instruction", "", "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["total"]["problems"] == 3 and got["total"]["k"] == 3
    assert [q["id"] for q in got["per_problem"]] == ["a", "b", "c"]
    assert got["total"]["mean_length"] == pytest.approx(res["total"]["mean_length"])
