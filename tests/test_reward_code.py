"""Code reward: program extraction, LiveCodeBench-style comparison, the test formats, and one real sandboxed batch
over every format (right and wrong programs, binary and fraction scores)."""

import base64
import json
import pickle
import zlib
from collections import Counter

import pytest

from erpd_megatron.rewards.code import CodeReward, extract_code, outputs_match, values_match
from erpd_megatron.rewards.code_tests import CodeTestError, has_tests, parse_tests
from tests.test_sandbox_hostile import _need_bwrap


def test_extract_code_last_python_block_then_untagged():
    r = "```python\nold()\n```\ntext\n```py\nnew()\n```\n```\nuntagged()\n```\n```cpp\nint main(){}\n```"
    assert extract_code(r) == "new()\n"
    assert extract_code("```\nx = 1\n```\n```cpp\nint x;\n```") == "x = 1\n"
    assert extract_code("```cpp\nint x;\n```", language="cpp") == "int x;\n"
    assert extract_code("no code here") is None
    assert extract_code("```python\nprint(1)\n") is None  # truncated: the fence never closes
    assert extract_code(None) is None


@pytest.mark.parametrize("got,want,ok", [
    ("3\n", "3", True), ("  3  \n\n", "3\n", True), ("1 2\n3", "1  2\n3", True), ("3", "4", False),
    ("1\n2", "1 2", False), ("0.3333333", "0.333333333", True), ("0.34", "0.333333333", False),
    ("3.0", "3", True), ("3.000001", "3", False),  # equal as numbers (LiveCodeBench: Decimal), exact for ints
    ("007", "7", True), ("YES", "yes", False), ("", "", True),
])
def test_outputs_match_livecodebench_style(got, want, ok):
    assert outputs_match(got, want) is ok


def test_values_match():
    assert values_match([1, 2], [1, 2]) and values_match([1, 2], [[1, 2]])  # APPS wraps outputs in a list
    assert values_match(0.1 + 0.2, 0.3) and not values_match(0.31, 0.3)
    assert not values_match(True, 1) and not values_match("1", 1) and not values_match([1], [1, 2])
    assert values_match({"a": [1]}, {"a": [1]}) and not values_match({"a": 1}, {"b": 1})


def _lcb_pack(cases) -> str:
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(cases)))).decode()


LCB_STDIN = {"question_content": "Add two numbers.",
             "public_test_cases": json.dumps([{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]),
             "private_test_cases": _lcb_pack([{"input": "5 7\n", "output": "12\n", "testtype": "stdin"}]),
             "metadata": "{}"}
LCB_FUNC = {"public_test_cases": json.dumps([{"input": "[1, 2]\n3", "output": "[1, 2, 3]", "testtype": "functional"}]),
            "metadata": json.dumps({"func_name": "append"})}
APPS_STDIO = {"input_output": json.dumps({"inputs": ["1 2\n", "5 7\n"], "outputs": ["3\n", "12\n"]})}
APPS_CALL = {"input_output": {"inputs": [[[1, 2], 3], [[], 0]], "outputs": [[[1, 2, 3]], [[0]]], "fn_name": "append"}}
HUMANEVAL = {"prompt": "def append(xs, x):\n", "entry_point": "append",
             "test": "def check(candidate):\n    assert candidate([1], 2) == [1, 2]\n    assert candidate([], 0) == [0]\n"}
MBPP = {"text": "Append x.", "test_list": ["assert append([1], 2) == [1, 2]", "assert append([], 0) == [0, 0]"]}
VERL = {"data_source": "taco", "reward_model": {"ground_truth": APPS_STDIO["input_output"]}}


def test_parse_tests_formats():
    t = parse_tests(LCB_STDIN)
    assert (t.mode, t.inputs, t.expected) == ("stdio", ["1 2\n", "5 7\n"], ["3\n", "12\n"])
    t = parse_tests(LCB_FUNC)
    assert (t.mode, t.inputs, t.expected, t.fn_name) == ("call", [[[1, 2], 3]], [[1, 2, 3]], "append")
    assert parse_tests(APPS_STDIO).mode == "stdio" and parse_tests(VERL).expected == ["3\n", "12\n"]
    t = parse_tests(APPS_CALL)
    assert (t.mode, t.inputs[0], t.fn_name) == ("call", [[1, 2], 3], "append")
    t = parse_tests(HUMANEVAL)
    assert (t.mode, len(t), t.fn_name) == ("assert", 1, "append")
    t = parse_tests(MBPP)
    assert (t.mode, len(t), t.fn_name) == ("assert", 2, "append")
    assert all(has_tests(r) for r in (LCB_STDIN, LCB_FUNC, APPS_STDIO, APPS_CALL, HUMANEVAL, MBPP, VERL))
    assert not has_tests({"problem": "1+1", "answer": "2"})


def test_parse_tests_errors_and_no_pickle_globals():
    evil = base64.b64encode(zlib.compress(pickle.dumps(print))).decode()  # a global: refused, never loaded
    for bad, match in [({"input_output": "{not json"}, "not valid JSON"),
                       ({"input_output": {"inputs": ["1"], "outputs": []}}, "1 inputs but 0 outputs"),
                       ({"public_test_cases": "[]", "private_test_cases": evil}, "refusing to load"),
                       ({"public_test_cases": json.dumps([{"input": "1", "output": "2", "testtype": "functional"}])},
                        "func_name"),
                       ({"test": "assert f(1) ==", "entry_point": "f"}, "not valid Python"),
                       ({"test_list": ["x = 1"]}, "entry_point"),
                       ({"input_output": {"inputs": [], "outputs": []}}, "empty")]:
        with pytest.raises(CodeTestError, match=match):
            parse_tests(bad)


RIGHT_STDIO = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
WRONG_STDIO = "```python\na, b = map(int, input().split())\nprint(a + b if a == 1 else 0)\n```"
RIGHT_FN = "```python\ndef append(xs, x):\n    return xs + [x]\n```"
LCB_CLASS = "```python\nclass Solution:\n    def append(self, xs: List[int], x: int) -> List[int]:\n        return xs + [x]\n```"
WRONG_FN = "```python\ndef append(xs, x):\n    return xs + [x] if xs else [x, x]\n```"


def test_every_format_in_the_real_sandbox():
    _need_bwrap()
    rows = [(RIGHT_STDIO, LCB_STDIN, 1.0, 1.0), (WRONG_STDIO, LCB_STDIN, 0.0, 0.5), (LCB_CLASS, LCB_FUNC, 1.0, 1.0),
            (RIGHT_FN, LCB_FUNC, 1.0, 1.0), (RIGHT_STDIO, APPS_STDIO, 1.0, 1.0), (WRONG_STDIO, VERL, 0.0, 0.5),
            (RIGHT_FN, APPS_CALL, 1.0, 1.0), (WRONG_FN, APPS_CALL, 0.0, 0.5), (RIGHT_FN, HUMANEVAL, 1.0, 1.0),
            (WRONG_FN, HUMANEVAL, 0.0, 0.0), (RIGHT_FN, MBPP, 0.5, 0.5), ("no code", MBPP, 0.0, 0.0)]
    tasks = [parse_tests(rec) for _, rec, _, _ in rows]
    responses = [r for r, _, _, _ in rows]
    with CodeReward(num_workers=2, timeout_per_test_s=3, score="fraction") as frac:
        got_frac = frac.score_batch(responses, tasks)
        reasons = frac.last_reasons
    with CodeReward(num_workers=2, timeout_per_test_s=3) as binary:
        got_bin = binary.score_batch(responses, tasks)
        assert sum(binary.last_stats.reasons.values()) == len(rows)
    # MBPP's second assert expects [0, 0] from append([], 0): a test that no right program passes
    assert got_bin == [1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert got_frac == [f for _, _, _, f in rows]
    assert reasons[1] == "wrong_answer" and reasons[-1] == "no_code" and reasons[0] == "passed"


def test_large_inputs_pass_within_the_limits():
    """LiveCodeBench-sized inputs (10^5 numbers) through stdin and through a call: arguments and values travel as
    JSON for call-based tests (ast.literal_eval would take seconds), and the harness's writes keep their deadline."""
    _need_bwrap()
    big = list(range(100_000))
    call = parse_tests({"input_output": {"inputs": [[big]], "outputs": [[sum(big), len(big)]], "fn_name": "stats"}})
    stdio = parse_tests({"input_output": {"inputs": [" ".join(map(str, big)) + "\n"], "outputs": [str(sum(big))]}})
    progs = ["```python\ndef stats(xs):\n    return (sum(xs), len(xs))\n```",
             "```python\nprint(sum(map(int, input().split())))\n```",
             "```python\nimport time\ntime.sleep(60)\ndef stats(xs):\n    return 0\n```"]  # never reads the call
    with CodeReward(num_workers=2, timeout_per_test_s=6, timeout_per_sample_s=30) as r:
        assert r.score_batch(progs, [call, stdio, call]) == [1.0, 1.0, 0.0]
        assert r.last_reasons == ["passed", "passed", "timeout"]


def test_duplicates_run_once_and_share_the_result():
    """Within one score_batch each distinct (program, tests) pair runs once (counted at the sandbox); duplicates get
    their twin's reward and reason, in order; the same program against other tests runs again; a hostile duplicate
    still scores 0."""
    _need_bwrap()
    call, other = parse_tests(APPS_CALL), parse_tests(LCB_FUNC)
    hostile = "```python\nimport os\nos._exit(0)\ndef append(xs, x):\n    return xs + [x]\n```"
    right_chatty = "Here it is:\n" + RIGHT_FN + "\ndone"  # same program, other text around it
    items = [(RIGHT_FN, call), (hostile, call), (WRONG_FN, call), (right_chatty, call), (hostile, call),
             (RIGHT_FN, other), (RIGHT_FN, call), ("no code", call), (WRONG_FN, call)]
    with CodeReward(num_workers=2, timeout_per_test_s=3) as r:
        runs = []
        real = r.sandbox.run
        r.sandbox.run = lambda job, program, **kw: (runs.append(program), real(job, program, **kw))[1]
        got = r.score_batch([x for x, _ in items], [t for _, t in items])
        assert got == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
        assert r.last_reasons == ["passed", "exited", "wrong_answer", "passed", "exited", "passed", "passed",
                                  "no_code", "wrong_answer"]
        assert len(runs) == r.last_runs == 4  # right x call, hostile, wrong, right x other; no_code never runs
        assert Counter(runs) == {extract_code(RIGHT_FN): 2, extract_code(hostile): 1, extract_code(WRONG_FN): 1}
        assert r.last_stats.items == len(items)
