"""Per-record reward routing (math / code / custom in one batch), code records in the prompt loader (JSONL and
Parquet, errors naming file and row), `erpd reward`, and `erpd eval`'s AVG@K / pass@K on code records."""

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from erpd_megatron.data.prompts import Prompt, PromptDataError, load_prompts
from erpd_megatron.rewards.router import RewardRouter
from tests.test_sandbox_hostile import _need_bwrap

ADD_IO = json.dumps({"inputs": ["1 2\n", "5 7\n"], "outputs": ["3\n", "12\n"]})
RECORDS = [
    {"id": "m1", "problem": "1+1?", "answer": "2"},
    {"id": "apps1", "question": "Add two ints.", "input_output": ADD_IO},
    {"id": "lcb1", "question_content": "Add.", "public_test_cases": json.dumps(
        [{"input": "1\n2", "output": "3", "testtype": "functional"}]), "metadata": json.dumps({"func_name": "add"})},
    {"id": "he1", "prompt": "def add(a, b):\n", "entry_point": "add",
     "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"},
    {"id": "mbpp1", "text": "Add.", "test_list": ["assert add(1, 2) == 3"]},
    {"id": "tagged", "problem": "2+2?", "answer": "4", "data_source": "my_judge"},
]
STDIO_OK = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
FN_OK = "```python\ndef add(a, b):\n    return a + b\n```"


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_loader_reads_code_records(tmp_path):
    prompts = {p.id: p for p in load_prompts(_write_jsonl(tmp_path / "mix.jsonl", RECORDS))}
    assert prompts["apps1"].problem == "Add two ints." and prompts["apps1"].answer == ""
    assert prompts["lcb1"].problem == "Add." and prompts["he1"].problem.startswith("def add")
    assert prompts["mbpp1"].meta["test_list"] == ["assert add(1, 2) == 3"]
    assert prompts["m1"].answer == "2"
    # Parquet: a code file needs no problem / answer columns
    table = pa.Table.from_pylist([{"id": "p1", "question": "Add.", "input_output": ADD_IO}])
    pq.write_table(table, tmp_path / "code.parquet")
    (p,) = load_prompts(tmp_path / "code.parquet")
    assert p.problem == "Add." and p.meta["input_output"] == ADD_IO


@pytest.mark.parametrize("row,match", [
    ({"question": "x", "input_output": "{broken"}, r"bad\.jsonl:2 \(line 2\): field 'input_output' is not valid JSON"),
    ({"input_output": ADD_IO}, r"bad\.jsonl:2 \(line 2\): code record without a prompt"),
    ({"question": "x", "test_list": ["assert f(1) =="]}, r"bad\.jsonl:2 .*not valid Python"),
    ({"question": "x", "input_output": {"inputs": ["1"], "outputs": []}}, r"bad\.jsonl:2 .*1 inputs but 0 outputs"),
])
def test_loader_errors_name_file_and_row(tmp_path, row, match):
    path = _write_jsonl(tmp_path / "bad.jsonl", [RECORDS[0], row])
    with pytest.raises(PromptDataError, match=match):
        load_prompts(path)


def test_parquet_error_names_row(tmp_path):
    table = pa.Table.from_pylist([{"question": "ok", "input_output": ADD_IO}, {"question": "bad", "input_output": "{"}])
    pq.write_table(table, tmp_path / "c.parquet")
    with pytest.raises(PromptDataError, match=r"c\.parquet \(row 2\): field 'input_output'"):
        load_prompts(tmp_path / "c.parquet")


class FakeMath:
    def __init__(self):
        self.seen = []

    def score_batch(self, responses, golds):
        self.seen += list(golds)
        return [1.0 if r.strip() == f"\\boxed{{{g}}}" else 0.0 for r, g in zip(responses, golds)]


class FakeCustom:
    """The custom slot's interface: score_batch(responses, prompts) -> list[float]."""

    def __init__(self):
        self.seen = []

    def score_batch(self, responses, prompts):
        self.seen += [p.id for p in prompts]
        return [0.5 for _ in responses]


def test_router_mixes_math_code_custom_in_one_batch(tmp_path):
    _need_bwrap()
    from erpd_megatron.rewards.code import CodeReward

    prompts = {p.id: p for p in load_prompts(_write_jsonl(tmp_path / "mix.jsonl", RECORDS))}
    math, custom = FakeMath(), FakeCustom()
    router = RewardRouter(math_factory=lambda: math, code_factory=lambda: CodeReward(num_workers=2, timeout_per_test_s=3),
                          custom=custom, routes={"my_judge": "custom"})
    batch = [("\\boxed{2}", "m1"), (STDIO_OK, "apps1"), (FN_OK, "apps1"), (FN_OK, "lcb1"), (FN_OK, "he1"),
             (FN_OK, "mbpp1"), ("\\boxed{4}", "tagged"), ("\\boxed{3}", "m1")]
    with router:
        got = router.score_batch([r for r, _ in batch], [prompts[i] for _, i in batch])
        assert router.last_kinds == ["math", "code", "code", "code", "code", "code", "custom", "math"]
        assert got == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.5, 0.0]
        assert router.last_reasons[2] == "wrong_answer" and router.last_reasons[-1] == "wrong_answer"
        assert router.last_stats.as_dict()["kinds"] == {"math": 2, "code": 5, "custom": 1}
        assert math.seen == ["2", "2"] and custom.seen == ["tagged"]
        # a verl data_source routes even without tests; without tests a code record scores 0 with a reason
        p = Prompt("x", "Add.", "", {"data_source": "codecontests"})
        assert router.score_batch([FN_OK], [p]) == [0.0] and router.last_reasons == ["no_tests"]
        # plain gold strings (the MathReward calling convention) go to math
        assert router.score_batch(["\\boxed{5}"], ["5"]) == [1.0]


def test_router_refuses_bad_routes():
    with pytest.raises(ValueError, match="no custom reward"):
        RewardRouter(routes={"a": "custom"})
    with pytest.raises(ValueError, match="must map to one of"):
        RewardRouter(routes={"a": "sql"})


def test_erpd_reward_cli(tmp_path, capsys):
    _need_bwrap()
    from erpd_megatron.rewards.score_cli import main

    data = _write_jsonl(tmp_path / "data.jsonl", RECORDS[1:5])  # code only: no math-verify start-up
    resp = _write_jsonl(tmp_path / "resp.jsonl", [
        {"id": 1, "prompt_id": "apps1", "response": STDIO_OK},
        {"id": "b", "prompt_id": "he1", "response": FN_OK},
        {"id": 3, "prompt_id": "mbpp1", "response": "```python\nimport sys\nsys.exit(0)\n```"},
        {"id": 4, "prompt_id": "lcb1", "response": "I don't know."}])
    assert main(["--data", str(data), "--responses", str(resp), "--timeout-per-test", "3"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(x["id"], x["reward"], x["reason"], x["kind"]) for x in lines] == [
        (1, 1.0, "passed", "code"), ("b", 1.0, "passed", "code"), (3, 0.0, "exited", "code"), (4, 0.0, "no_code", "code")]
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"id": 1, "prompt_id": "apps1", "response": "x"},
                                                {"id": 2, "prompt_id": "nope", "response": "x"}])
    assert main(["--data", str(data), "--responses", str(bad)]) == 2
    assert "bad.jsonl:2: prompt_id 'nope' is not an id of the data set" in capsys.readouterr().err


class _Tok:
    """Stands in for a tokenizer: a prompt is one token, a response token is an index into TEXTS."""

    chat_template = None
    pad_token_id = 0
    TEXTS = ["no code", STDIO_OK, FN_OK, "```python\ndef add(a, b):\n    return a - b\n```"]

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1]}

    def decode(self, ids, skip_special_tokens=True):
        return self.TEXTS[ids[0]]


class _Engine:
    PLAN = {0: [1, 1, 0, 3], 1: [2, 3, 3, 3], 2: [0, 0, 0, 0]}  # problem -> response index per sample

    def generate(self, prompt_ids, sampling):
        from erpd_megatron.rollout.engine import Sample

        return [Sample(i, [self.PLAN[i][j]], [-0.1], "stop", None, sample_index=j)
                for i in range(len(prompt_ids)) for j in range(sampling.n)]


def test_eval_avg_and_pass_at_k_on_code(tmp_path):
    _need_bwrap()
    from erpd_megatron.rewards.code import CodeReward
    from erpd_megatron.rollout.engine import SamplingParams
    from erpd_megatron.rollout.eval import evaluate, pass_at_k

    prompts = {p.id: p for p in load_prompts(_write_jsonl(tmp_path / "b.jsonl", RECORDS[1:4]))}
    problems = [prompts["apps1"], prompts["he1"], prompts["lcb1"]]
    with RewardRouter(code_factory=lambda: CodeReward(num_workers=2, timeout_per_test_s=3)) as router:
        res = evaluate(_Engine(), _Tok(), problems, SamplingParams(), k=4, reward=router)
    per = {p["id"]: p for p in res["per_problem"]}
    assert [per[i]["correct"] for i in ("apps1", "he1", "lcb1")] == [2, 1, 0]
    assert per["apps1"]["kind"] == "code" and per["lcb1"]["reasons"] == ["no_code"] * 4
    assert res["total"]["avg_at_k"] == pytest.approx(3 / 12)
    assert res["total"]["pass_at"]["1"] == pytest.approx((pass_at_k(4, 2, 1) + pass_at_k(4, 1, 1)) / 3)
    assert res["total"]["pass_at_k"] == pytest.approx(2 / 3)
    assert res["total"]["reasons"] == {"no_code": 5, "passed": 3, "wrong_answer": 4}


def test_erpd_reward_responses_bad_json_is_one_message(tmp_path):
    """The responses file is read like a data set (data/prompts.parse_json_line): malformed or absurdly nested
    JSON is an error naming file and line (deep nesting was a RecursionError traceback)."""
    from erpd_megatron.rewards.score_cli import UsageError, read_responses

    path = tmp_path / "resp.jsonl"
    path.write_text(json.dumps({"id": 1, "prompt_id": "p", "response": "x"}) + "\n" + "[" * 100_000 + "\n")
    with pytest.raises(UsageError, match=re.escape(f"{path}:2: invalid JSON: nested too deeply")):
        read_responses(path, {"p"})
    path.write_text('{"id": 1, "prompt_id": "p", "response": \n')
    with pytest.raises(UsageError, match=re.escape(f"{path}:1: invalid JSON: Expecting value")):
        read_responses(path, {"p"})
