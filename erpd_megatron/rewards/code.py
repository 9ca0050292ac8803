"""Code reward: run the response's program against the record's tests in the sandbox, compare outside it.

- Program: the last fenced block in the configured language (``python``: ```python / ```py / ```python3), else
  the last untagged block; none -> reward 0, reason ``no_code``. An unclosed fence (a truncated response) is not
  a block.
- Score: ``binary`` (1 when every test passes: the paper's and LiveCodeBench's pass@1) or ``fraction`` (tests
  passed / tests).
- Comparison as LiveCodeBench's: stdout and expected output are stripped and split into lines, each line stripped;
  equal line counts, and each line equal as text or token by token (whitespace-split) as numbers; where the
  reference token is a float (has ``.`` / ``e``) a relative/absolute tolerance of 1e-6 applies (LiveCodeBench
  compares Decimals exactly). Call-based values: tuples are lists (JSON), and as in APPS's harness a value also
  matches ``expected[0]`` when the expected value is a one-element wrapper list; floats within 1e-6.
- A pool of ``num_workers`` threads, each driving one sandbox at a time (bounded concurrency), a wall limit per
  test (inside the sandbox) and per sample (the parent kills the sandbox). Every zero is counted by reason in
  ``last_stats`` (like the math judge's ``BatchStats``).
- De-duplication: within one ``score_batch`` call each distinct (extracted program, tests) pair runs once; every
  duplicate inherits its twin's reward, reason and detail (the harness is deterministic up to timeouts: a duplicate
  of a program that timed out also scores ``timeout``). ``last_runs`` counts the sandboxed runs.

Reasons: passed, wrong_answer, no_code, no_tests, runtime_error, timeout, memory, output_limit, file_limit, exited
(the program ended before the tests finished: sys.exit / os._exit / a crash), bad_value (call-based: returned
something that is not plain data), sample_timeout, sandbox_error. With score=fraction the reason is the first
failing test's.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import re
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from erpd_megatron.rewards.code_tests import CodeTask
from erpd_megatron.rewards.sandbox import Sandbox, SandboxLimits

log = logging.getLogger(__name__)

SCORES = ("binary", "fraction")
# `erpd eval`'s default instruction for code records (math records keep the \boxed{} one)
CODE_INSTRUCTION = ("Write a complete Python 3 solution. Put the whole program in one ```python code block at the "
                    "end of your answer.")
LANGUAGE_TAGS = {"python": ("python", "py", "python3")}  # tag aliases per language (the sandbox runs Python)
MAX_RESPONSE_CHARS = 200_000
_FENCE_RE = re.compile(r"^[ \t]*```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)^[ \t]*```[ \t]*$", re.M | re.S)
_HARNESS_STATUS_TO_REASON = {"failed": "wrong_answer"}


def extract_code(response: Any, language: str = "python") -> str | None:
    """The last fenced block tagged `language` (or an alias), else the last untagged block, else None."""
    text = response if isinstance(response, str) else ("" if response is None else str(response))
    text = text[-MAX_RESPONSE_CHARS:]
    tags = LANGUAGE_TAGS.get(language, (language,))
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE_RE.finditer(text)]
    for wanted in (tags, ("",)):
        found = [body for tag, body in blocks if tag in wanted]
        if found:
            return found[-1]
    return None


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().split("\n")]


def _num_equal(got: str, want: str) -> bool:
    try:
        if re.fullmatch(r"[+-]?\d+", want) and re.fullmatch(r"[+-]?\d+", got):
            return int(got) == int(want)
        g, w = float(got), float(want)
    except ValueError:
        return False
    if not ("." in want or "e" in want.lower()):
        return g == w
    return math.isclose(g, w, rel_tol=1e-6, abs_tol=1e-6)


def outputs_match(got: str, want: str) -> bool:
    """stdout vs expected output, LiveCodeBench style (see the module docstring)."""
    a, b = _lines(got), _lines(want)
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x == y:
            continue
        xs, ys = x.split(), y.split()
        if len(xs) != len(ys) or not all(p == q or _num_equal(p, q) for p, q in zip(xs, ys)):
            return False
    return True


def _value_equal(got: Any, want: Any) -> bool:
    if isinstance(want, float) or (isinstance(got, float) and isinstance(want, int) and not isinstance(want, bool)):
        return isinstance(got, int | float) and not isinstance(got, bool) and \
            math.isclose(float(got), float(want), rel_tol=1e-6, abs_tol=1e-6)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(_value_equal, got, want))
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(_value_equal(got[k], want[k]) for k in want)
    return type(got) is type(want) and got == want


def values_match(got: Any, want: Any) -> bool:
    """A call's returned value (JSON data from the sandbox) vs the expected one."""
    if _value_equal(got, want):
        return True
    return isinstance(want, list) and len(want) == 1 and _value_equal(got, want[0])  # APPS wraps outputs in a list


@dataclass
class CodeStats:
    """What happened in the last `score_batch` call: items and the reason of every item, counted."""

    items: int = 0
    reasons: Counter = field(default_factory=Counter)

    def failures(self) -> dict[str, int]:
        return {k: v for k, v in sorted(self.reasons.items()) if k != "passed"}


def _dedup_key(response: Any, task: CodeTask | None, language: str) -> tuple:
    """Two items with equal keys get the same result: same extracted program (None: no code) and same tests (the
    task's every field; `id` of a missing task is None). Responses differing only outside the code block share."""
    tk = None if task is None else json.dumps([task.mode, task.inputs, task.expected, task.fn_name, task.setup],
                                              sort_keys=True, default=repr)
    return extract_code(response, language), tk


class CodeReward:
    """Executes programs against tests in the sandbox; `score_batch(responses, tasks)` -> rewards in [0, 1]."""

    def __init__(self, num_workers: int = 2, score: str = "binary", language: str = "python",
                 timeout_per_test_s: float = 6.0, timeout_per_sample_s: float = 60.0, sandbox: str = "bwrap",
                 python: str = "/usr/bin/python3", limits: SandboxLimits | None = None):
        if score not in SCORES:
            raise ValueError(f"code reward score must be one of {SCORES}, got {score!r}")
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not (timeout_per_test_s > 0 and timeout_per_sample_s > 0):
            raise ValueError("code reward timeouts must be > 0")
        self.num_workers, self.score, self.language = num_workers, score, language
        self.timeout_per_test_s, self.timeout_per_sample_s = float(timeout_per_test_s), float(timeout_per_sample_s)
        self.sandbox = Sandbox(sandbox, python=python, limits=limits)
        self.last_stats = CodeStats()
        self.last_reasons: list[str] = []
        self.last_details: list[str] = []
        self.last_runs = 0  # sandboxed runs of the last score_batch (duplicates share one)
        self._slots: queue.Queue[int] = queue.Queue()
        for s in range(num_workers):
            self._slots.put(s)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def start(self) -> CodeReward:
        """Check the sandbox (raises SandboxUnavailable with the reason) and start the threads."""
        self.sandbox.check()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="erpd-code-reward")
        return self

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> CodeReward:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def score_batch(self, responses: list[Any], tasks: list[CodeTask | None]) -> list[float]:
        if len(responses) != len(tasks):
            raise ValueError(f"score_batch: {len(responses)} responses but {len(tasks)} tasks")
        if not responses:
            self.last_stats, self.last_reasons, self.last_details, self.last_runs = CodeStats(), [], [], 0
            return []
        self.start()
        if self.sandbox.mode == "none":
            log.warning("code reward: running %d model-written programs UNSANDBOXED (reward.sandbox=none): they can "
                        "read, write and kill whatever this user can", len(responses))
        # De-duplication: the harness is deterministic up to timeouts, so each distinct (program, tests) pair runs
        # once and every duplicate inherits its twin's (reward, reason, detail). RL groups (n_samples per prompt)
        # and evaluation repeat programs often; a tiny policy's group is mostly one or two distinct programs.
        keys = [_dedup_key(r, t, self.language) for r, t in zip(responses, tasks)]
        first: dict = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        uniq = list(first.values())
        ran = dict(zip(uniq, self._pool.map(self._score_one, [responses[i] for i in uniq], [tasks[i] for i in uniq])))
        out = [ran[first[k]] for k in keys]
        self.last_runs = sum(keys[i][0] is not None and tasks[i] is not None and len(tasks[i]) > 0 for i in uniq)
        self.last_reasons = [r for _, r, _ in out]
        self.last_details = [d for _, _, d in out]
        self.last_stats = CodeStats(items=len(out), reasons=Counter(self.last_reasons))
        return [v for v, _, _ in out]

    def _score_one(self, response: Any, task: CodeTask | None) -> tuple[float, str, str]:
        if task is None or not len(task):
            return 0.0, "no_tests", ""
        program = extract_code(response, self.language)
        if program is None:
            return 0.0, "no_code", ""
        job = {"mode": task.mode, "fn_name": task.fn_name, "entry_point": task.fn_name, "setup": task.setup,
               "tests": [{"input": x} if task.mode == "stdio" else {"args": x} if task.mode == "call" else {"code": x}
                         for x in task.inputs]}
        slot = self._slots.get()
        try:
            outcome = self.sandbox.run(job, program, wall_s=self.timeout_per_sample_s, slot=slot,
                                       timeout_per_test_s=self.timeout_per_test_s)
        finally:
            self._slots.put(slot)
        if outcome.results is None or len(outcome.results) != len(task):
            return 0.0, outcome.failure or "sandbox_error", outcome.detail[-300:]
        passed, first_fail, detail = 0, "", ""
        for i, res in enumerate(outcome.results):
            status = res.get("status")
            if status == "ok":
                if task.mode == "stdio":
                    ok = outputs_match(str(res.get("stdout", "")), task.expected[i])
                elif task.mode == "call":
                    ok = values_match(res.get("value"), task.expected[i])
                else:
                    ok = True
                status = "passed" if ok else "wrong_answer"
            reason = _HARNESS_STATUS_TO_REASON.get(status, status)
            if reason == "passed":
                passed += 1
            elif not first_fail:
                first_fail, detail = reason, f"test {i}: {res.get('detail', '')}"[:300]
        if passed == len(task):
            return 1.0, "passed", ""
        value = passed / len(task) if self.score == "fraction" else 0.0
        return value, first_fail, detail
