"""Test cases of a code record, in the formats users have, turned into one `CodeTask`.

| format | fields | mode |
|---|---|---|
| LiveCodeBench | `public_test_cases` / `private_test_cases` (JSON text or list of {input, output, testtype}; the private set may be LiveCodeBench's base64 + zlib + pickle packing), `metadata.func_name` for functional tests | stdin `stdio`, functional `call` |
| APPS / TACO / verl | `input_output` (JSON text or object: inputs, outputs, optional fn_name); verl's `reward_model.ground_truth` holding the same | `stdio`, or `call` with fn_name |
| HumanEval | `test` (defines `check(candidate)`) + `entry_point` | `assert` (one test) |
| MBPP | `test_list` (assert lines, one test each) + optional `test_setup_code` / `test_imports`; entry point from `entry_point` or the first assert | `assert` |

Call-based inputs: a list of arguments (APPS), or LiveCodeBench's text with one JSON value per line. Expected outputs
stay here, in the trainer; only inputs (and the assert programs, which hold their own expectations) go into the
sandbox. LiveCodeBench's pickled private tests are read with an unpickler that refuses every global, so only plain
str / list / dict / numbers can come out of it (no code runs).
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import re
import zlib
from dataclasses import dataclass, field
from typing import Any

# a record carrying any of these (non-empty) is a code record
CODE_TEST_KEYS = ("input_output", "public_test_cases", "private_test_cases", "test", "test_list")
# where a code record's prompt text is, in the order tried (LiveCodeBench, APPS / TACO, HumanEval, MBPP)
CODE_PROMPT_KEYS = ("question_content", "question", "prompt", "text")


class CodeTestError(ValueError):
    """A code record's tests cannot be read; the loader prefixes file and row."""


@dataclass
class CodeTask:
    mode: str
    """stdio | call | assert."""
    inputs: list = field(default_factory=list)
    """stdio: stdin text per test; call: argument list per test; assert: test program per test."""
    expected: list = field(default_factory=list)
    """stdio: stdout text; call: the return value (JSON data); assert: unused (the programs assert)."""
    fn_name: str = ""
    """call: function (or method of class Solution) to call; assert: the entry point."""
    setup: str = ""
    """assert: code run before each test program (MBPP test_setup_code / test_imports)."""

    def __len__(self) -> int:
        return len(self.inputs)


def has_tests(meta: dict) -> bool:
    """The record carries test cases (a `test` string counts only when it asserts: "test" is a common column name)."""
    if any(meta.get(k) not in (None, "", [], {}) for k in CODE_TEST_KEYS if k != "test"):
        return True
    t = meta.get("test")
    if isinstance(t, str) and ("assert" in t or "def check" in t):
        return True
    return _verl_ground_truth(meta) is not None


def _verl_ground_truth(meta: dict) -> dict | None:
    rm = meta.get("reward_model")
    gt = rm.get("ground_truth") if isinstance(rm, dict) else None
    if isinstance(gt, str) and gt.lstrip().startswith("{"):
        try:
            gt = json.loads(gt)
        except ValueError:
            return None
    return gt if isinstance(gt, dict) and "inputs" in gt and "outputs" in gt else None


def _json(value: Any, name: str) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError as e:
            raise CodeTestError(f"field {name!r} is not valid JSON: {e}") from None
    return value


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only plain data is allowed)")


def _lcb_cases(value: Any, name: str) -> list:
    if isinstance(value, str) and value and value.lstrip()[:1] not in ("[", "{"):
        try:  # LiveCodeBench code_generation_lite packs private tests: base64(zlib(pickle(json text)))
            value = _NoGlobals(io.BytesIO(zlib.decompress(base64.b64decode(value)))).load()
        except Exception as e:
            raise CodeTestError(f"field {name!r} is neither JSON nor LiveCodeBench's packed form: {e}") from None
    cases = _json(value, name)
    if not isinstance(cases, list) or not all(isinstance(c, dict) and "input" in c and "output" in c for c in cases):
        raise CodeTestError(f"field {name!r} must be a list of {{input, output, testtype}} objects")
    return cases


def _call_args(value: Any, where: str) -> list:
    if isinstance(value, list):
        return value
    if isinstance(value, str):  # LiveCodeBench functional: one JSON value per line
        try:
            return [json.loads(line) for line in value.split("\n") if line.strip()]
        except ValueError as e:
            raise CodeTestError(f"{where}: call arguments are not JSON lines: {e}") from None
    raise CodeTestError(f"{where}: call arguments must be a list or JSON lines, got {type(value).__name__}")


def _text(value: Any) -> str:
    return "\n".join(map(str, value)) if isinstance(value, list) else str(value)


def _livecodebench(meta: dict) -> CodeTask:
    cases = []
    for key in ("public_test_cases", "private_test_cases"):
        if meta.get(key) not in (None, "", []):
            cases += _lcb_cases(meta[key], key)
    md = _json(meta.get("metadata") or {}, "metadata")
    fn = md.get("func_name", "") if isinstance(md, dict) else ""
    kinds = {c.get("testtype", "stdin") for c in cases}
    if kinds - {"stdin", "functional"} or len(kinds) > 1:
        raise CodeTestError(f"test cases mix or use unknown testtype(s) {sorted(kinds)} (stdin | functional)")
    if kinds == {"functional"}:
        if not fn:
            raise CodeTestError("functional test cases need metadata.func_name")
        out = []
        for i, c in enumerate(cases):
            try:
                out.append(json.loads(c["output"]) if isinstance(c["output"], str) else c["output"])
            except ValueError as e:
                raise CodeTestError(f"test case {i}: output is not JSON: {e}") from None
        return CodeTask("call", [_call_args(c["input"], f"test case {i}") for i, c in enumerate(cases)], out, fn)
    return CodeTask("stdio", [_text(c["input"]) for c in cases], [_text(c["output"]) for c in cases])


def _input_output(io_obj: Any, name: str) -> CodeTask:
    io_obj = _json(io_obj, name)
    if not isinstance(io_obj, dict) or not isinstance(io_obj.get("inputs"), list) \
            or not isinstance(io_obj.get("outputs"), list):
        raise CodeTestError(f"field {name!r} must hold lists 'inputs' and 'outputs'")
    ins, outs = io_obj["inputs"], io_obj["outputs"]
    if len(ins) != len(outs):
        raise CodeTestError(f"field {name!r}: {len(ins)} inputs but {len(outs)} outputs")
    fn = io_obj.get("fn_name")
    if fn:
        return CodeTask("call", [_call_args(x, f"{name} input {i}") for i, x in enumerate(ins)], list(outs), str(fn))
    return CodeTask("stdio", [_text(x) for x in ins], [_text(x) for x in outs])


_CALL_RE = re.compile(r"assert\s+(?:not\s+)?\(?\s*(?:math\.isclose\(|abs\(|set\(|sorted\()?\s*([A-Za-z_]\w*)\s*\(")


def _asserts(meta: dict) -> CodeTask:
    setup = "\n".join([*(meta.get("test_imports") or []), meta.get("test_setup_code") or ""])
    entry = meta.get("entry_point") or ""
    if meta.get("test_list"):
        tests = meta["test_list"]
        if not isinstance(tests, list) or not all(isinstance(t, str) for t in tests):
            raise CodeTestError("field 'test_list' must be a list of assert strings")
    else:
        if not isinstance(meta.get("test"), str):
            raise CodeTestError("field 'test' must be a string (a test program)")
        tests = [meta["test"]]
    if not entry:
        m = _CALL_RE.search("\n".join(tests))
        if not m:
            raise CodeTestError("no 'entry_point' and none found in the asserts (assert name(...))")
        entry = m.group(1)
    for i, t in enumerate(tests):
        try:
            compile(t, "<test>", "exec")
        except SyntaxError as e:
            raise CodeTestError(f"test {i} is not valid Python: {e.msg} (line {e.lineno})") from None
    return CodeTask("assert", list(tests), [], str(entry), setup)


def parse_tests(meta: dict) -> CodeTask:
    """The record's tests as one CodeTask; raises CodeTestError (without file / row: the caller adds them)."""
    if meta.get("input_output") not in (None, "", {}):
        task = _input_output(meta["input_output"], "input_output")
    elif meta.get("public_test_cases") not in (None, "", []) or meta.get("private_test_cases") not in (None, "", []):
        task = _livecodebench(meta)
    elif meta.get("test_list") or meta.get("test"):
        task = _asserts(meta)
    elif _verl_ground_truth(meta) is not None:
        task = _input_output(_verl_ground_truth(meta), "reward_model.ground_truth")
    else:
        raise CodeTestError(f"no test cases (one of {CODE_TEST_KEYS} or reward_model.ground_truth)")
    if not len(task):
        raise CodeTestError("the test case list is empty")
    return task
