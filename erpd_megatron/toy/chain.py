"""The long-reasoning toy task: chained arithmetic worked out step by step, with a \\boxed{} answer.

A problem is a three-digit start value (190-909) and 8-10 numbered operations applied in order, each an operator in
``+ -`` and one digit 2-9, so every running value stays three-digit (``*`` is supported, ``ChainTask(ops=OPS)``, but the
`long` preset leaves it out: see LONG_OPS). The supervised target writes every step (its number, the running value, the
operation, the result), then boxes the last value::

    problem  621 01+8 02+8 03-2 04+4 ...=
    target   01 621+8=629;02 629+8=637;03 637-2=635;04 635+4=639;...;\\boxed{...}

The step numbers make the next operation a content lookup (" 03" in the prompt) instead of a position count, which a
3-layer model learns far faster (an unnumbered chain did not leave 0 % in 150 warm-up steps, measured under load).

Why this task (docs/toy_task.md, "The long task"): the paper's mechanism is a token-level signal and it reports the
least gain for models with short generations (Tab. 10). The demo's toy answer is ~25 tokens, so a token signal there
is nearly a sequence signal. Here a response is ~100-150 tokens of dependent steps: one wrong step ruins the answer,
and which step went wrong is a token-level fact that an outcome reward does not carry.

Same mechanics as ``task.py``: the problem space is split once by a stable hash of the problem string (one in eight
held out, the held-out half split again into validation and test), so every train draw is disjoint from every
held-out draw whatever the seeds and sizes. Problems are drawn (not enumerated: the space has ~10^11 elements) from
``random.Random`` with a string seed, and a draw keeps only problems of its partition. The character alphabet is the
toy tokenizer's (digits, ``+ - * = ;``, ``\\boxed{``, ``}``), so the toy tokenizer serves both tasks.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

from erpd_megatron.toy.task import write_jsonl  # noqa: F401  (the pipeline calls <task module>.write_jsonl)

HELDOUT_MODULUS = 8
OPS = ("+", "-", "*")
# The `long` preset's operators: + and - only (docs/toy_task.md, "The long task": with * a warmed 3-layer base stayed
# near 0 % after 200 steps, too slow for the 20-minute budget; a 3-digit +/- step is learned within it).
LONG_OPS = ("+", "-")


@dataclass(frozen=True)
class ChainTask:
    """Ranges (inclusive). The defaults are the `long` preset's task."""

    min_ops: int = 8
    max_ops: int = 10
    start_min: int = 190  # with 10 steps of at most 9, every value stays three-digit: a fixed-format step
    start_max: int = 909
    digit_min: int = 2
    digit_max: int = 9
    value_max: int = 999  # every intermediate result stays in [0, value_max]
    ops: tuple[str, ...] = LONG_OPS  # the operators a step may use (a subset of OPS)

    def __post_init__(self):
        if not 1 <= self.min_ops <= self.max_ops <= 99:
            raise ValueError(f"ChainTask: bad op count range [{self.min_ops}, {self.max_ops}]")
        if not 0 <= self.start_min <= self.start_max <= self.value_max:
            raise ValueError(f"ChainTask: bad start range [{self.start_min}, {self.start_max}]")
        if not 1 <= self.digit_min <= self.digit_max <= 9:
            raise ValueError(f"ChainTask: operands must be digits, got [{self.digit_min}, {self.digit_max}]")
        if not self.ops or not set(self.ops) <= set(OPS):
            raise ValueError(f"ChainTask: ops must be a non-empty subset of {OPS}, got {self.ops}")

    @property
    def max_response_tokens(self) -> int:
        """An upper bound on the target's length in toy tokens (one per character, ``\\boxed{`` one), eos
        included: what rollout.max_new_tokens must allow."""
        v = len(str(self.value_max))
        return self.max_ops * (2 * v + 7) + 1 + v + 1 + 1  # steps "nn v+d=r;", \boxed{, v, }, eos


def _apply(v: int, op: str, d: int) -> int:
    return v + d if op == "+" else v - d if op == "-" else v * d


@dataclass(frozen=True)
class ChainProblem:
    start: int
    steps: tuple[tuple[str, int], ...]

    @property
    def values(self) -> list[int]:
        """The intermediate results, one per step."""
        out, v = [], self.start
        for op, d in self.steps:
            v = _apply(v, op, d)
            out.append(v)
        return out

    @property
    def problem(self) -> str:
        return f"{self.start}" + "".join(f" {i:02d}{op}{d}" for i, (op, d) in enumerate(self.steps, 1)) + "="

    @property
    def answer(self) -> str:
        return str(self.values[-1])

    @property
    def id(self) -> str:
        return f"chain-{zlib.crc32(self.problem.encode()):08x}-{len(self.steps)}"

    @property
    def target(self) -> str:
        """The SFT target: every step ``nn prev op d=result;`` then the boxed answer (no end-of-sequence marker)."""
        parts, v = [], self.start
        for i, ((op, d), r) in enumerate(zip(self.steps, self.values), 1):
            parts.append(f"{i:02d} {v}{op}{d}={r};")
            v = r
        return "".join(parts) + f"\\boxed{{{v}}}"

    def row(self) -> dict[str, str]:
        return {"problem": self.problem, "answer": self.answer, "id": self.id}


def random_problem(rng: random.Random, task: ChainTask = ChainTask()) -> ChainProblem:
    """One problem: a start value, then for each step an operator drawn uniformly among those that keep the
    result in [0, value_max], and a digit drawn uniformly among those that do."""
    start = v = rng.randint(task.start_min, task.start_max)
    steps = []
    for _ in range(rng.randint(task.min_ops, task.max_ops)):
        choices = [(op, d) for op in task.ops for d in range(task.digit_min, task.digit_max + 1)
                   if 0 <= _apply(v, op, d) <= task.value_max]
        op = rng.choice(sorted({op for op, _ in choices}))
        d = rng.choice([d for o, d in choices if o == op])
        steps.append((op, d))
        v = _apply(v, op, d)
    return ChainProblem(start, tuple(steps))


def is_heldout(p: ChainProblem) -> bool:
    return zlib.crc32(p.problem.encode()) % HELDOUT_MODULUS == 0


def is_validation(p: ChainProblem) -> bool:
    return is_heldout(p) and (zlib.crc32(p.problem.encode()) // HELDOUT_MODULUS) % 2 == 1


def pool_size(split: str, task: ChainTask = ChainTask()) -> int:
    """As toy/task.py's: how many distinct problems a split can return. Every split holds far more than any run
    asks for (>= 900 starts x 24^min_ops op sequences, 1/16 of them validation), so a fixed bound."""
    return 10**9


def _draw(n: int, rng: random.Random, keep, task: ChainTask) -> list[ChainProblem]:
    out, seen = [], set()
    while len(out) < n:
        p = random_problem(rng, task)
        if keep(p) and p.problem not in seen:
            seen.add(p.problem)
            out.append(p)
    return out


def train_problems(n: int, seed: int = 0, task: ChainTask = ChainTask()) -> list[ChainProblem]:
    """``n`` distinct training problems (never held out)."""
    return _draw(n, random.Random(f"chain-train-{seed}"), lambda p: not is_heldout(p), task)


def eval_problems(n: int, seed: int = 0, task: ChainTask = ChainTask()) -> list[ChainProblem]:
    """``n`` distinct held-out test problems (disjoint from every train and validation draw)."""
    return _draw(n, random.Random(f"chain-eval-{seed}"), lambda p: is_heldout(p) and not is_validation(p), task)


def validation_problems(n: int, seed: int = 0, task: ChainTask = ChainTask()) -> list[ChainProblem]:
    """``n`` distinct held-out validation problems (for tuning; disjoint from ``eval_problems`` and train)."""
    return _draw(n, random.Random(f"chain-val-{seed}"), is_validation, task)
