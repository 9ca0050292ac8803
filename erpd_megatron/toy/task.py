"""Synthetic toy math task with \\boxed{} answers, for CPU demos and tests.

A problem is ``a*b+c=`` and the supervised target is a worked scratchpad ending in a boxed answer::

    problem  37*4+15=
    target   37*4=148;148+15=163;\\boxed{163}

This is the task of DESIGN.md section 6 (a two-digit times one-digit product, then a two-digit sum).
Nothing here differs from that prototype except that train and held-out problems come from a fixed
partition of the whole problem space (a stable hash of the problem string), so they are disjoint for
every seed and every sample size.

Everything is deterministic given a seed (``random.Random(seed)``, no global state).
"""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# One problem in eight is held out (8,100 of the 64,800 default problems), half of them for validation.
HELDOUT_MODULUS = 8


@dataclass(frozen=True)
class ToyTask:
    """Ranges of the operands (inclusive). The defaults are the task used by the demo."""

    a_min: int = 10
    a_max: int = 99
    b_min: int = 2
    b_max: int = 9
    c_min: int = 10
    c_max: int = 99

    def __post_init__(self):
        for lo, hi, name in ((self.a_min, self.a_max, "a"), (self.b_min, self.b_max, "b"), (self.c_min, self.c_max, "c")):
            if not 0 <= lo <= hi:
                raise ValueError(f"ToyTask: bad range for {name}: [{lo}, {hi}] (need 0 <= min <= max)")

    @property
    def size(self) -> int:
        return (self.a_max - self.a_min + 1) * (self.b_max - self.b_min + 1) * (self.c_max - self.c_min + 1)


@dataclass(frozen=True)
class Problem:
    a: int
    b: int
    c: int

    @property
    def problem(self) -> str:
        """The prompt text (what the ``problem`` field of the JSONL holds)."""
        return f"{self.a}*{self.b}+{self.c}="

    @property
    def answer(self) -> str:
        return str(self.a * self.b + self.c)

    @property
    def id(self) -> str:
        return f"toy-{self.a}-{self.b}-{self.c}"

    @property
    def target(self) -> str:
        """The SFT target: scratchpad then the boxed answer (no end-of-sequence marker)."""
        p = self.a * self.b
        return f"{self.a}*{self.b}={p};{p}+{self.c}={p + self.c};\\boxed{{{p + self.c}}}"

    def row(self) -> dict[str, str]:
        return {"problem": self.problem, "answer": self.answer, "id": self.id}


def is_heldout(p: Problem) -> bool:
    """Fixed train / held-out partition of the problem space (independent of any seed)."""
    return zlib.crc32(p.problem.encode()) % HELDOUT_MODULUS == 0


def is_validation(p: Problem) -> bool:
    """The held-out partition is split again in two halves: validation (for choosing hyper-parameters)
    and test (what ``eval_problems`` reports on), so tuning never sees the reported problems."""
    return is_heldout(p) and (zlib.crc32(p.problem.encode()) // HELDOUT_MODULUS) % 2 == 1


@lru_cache(maxsize=8)
def _all_problems(task: ToyTask, heldout: bool) -> tuple[Problem, ...]:
    out = []
    for a in range(task.a_min, task.a_max + 1):
        for b in range(task.b_min, task.b_max + 1):
            for c in range(task.c_min, task.c_max + 1):
                p = Problem(a, b, c)
                if is_heldout(p) == heldout:
                    out.append(p)
    return tuple(out)


def train_pool(task: ToyTask = ToyTask()) -> list[Problem]:
    """Every training problem, in a fixed order (the warm-up samples from it)."""
    return list(_all_problems(task, heldout=False))


def heldout_pool(task: ToyTask = ToyTask()) -> list[Problem]:
    """Every held-out problem, in a fixed order."""
    return list(_all_problems(task, heldout=True))


def pool_size(split: str, task: ToyTask = ToyTask()) -> int:
    """How many distinct problems `train_problems` / `eval_problems` / `validation_problems` ("train", "eval",
    "validation") can return: asking for more is a ValueError."""
    if split == "train":
        return len(train_pool(task))
    held = heldout_pool(task)
    return sum(is_validation(p) == (split == "validation") for p in held)


def _sample(pool: list[Problem], n: int, rng: random.Random, what: str) -> list[Problem]:
    if n > len(pool):
        raise ValueError(f"{what}: asked for {n} distinct problems, the task has only {len(pool)}")
    return rng.sample(pool, n)


def train_problems(n: int, seed: int = 0, task: ToyTask = ToyTask()) -> list[Problem]:
    """``n`` distinct training problems (e.g. the prompts of one rollout batch)."""
    return _sample(train_pool(task), n, random.Random(f"toy-train-{seed}"), "train_problems")


def eval_problems(n: int, seed: int = 0, task: ToyTask = ToyTask()) -> list[Problem]:
    """``n`` distinct held-out test problems (sampled without replacement; disjoint from every train and
    every validation draw)."""
    test = [p for p in heldout_pool(task) if not is_validation(p)]
    return _sample(test, n, random.Random(f"toy-eval-{seed}"), "eval_problems")


def validation_problems(n: int, seed: int = 0, task: ToyTask = ToyTask()) -> list[Problem]:
    """``n`` distinct held-out validation problems (for tuning; disjoint from ``eval_problems`` and train)."""
    val = [p for p in heldout_pool(task) if is_validation(p)]
    return _sample(val, n, random.Random(f"toy-val-{seed}"), "validation_problems")


def write_jsonl(problems: list, path: str | Path) -> Path:
    """Write one ``p.row()`` per line (here ``{"problem", "answer", "id"}``, the fields the dataset loader reads);
    the long and code tasks (`toy/chain.py`, `toy/code_task.py`) write their rows with this too."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for p in problems:
            f.write(json.dumps(p.row()) + "\n")
    return path


def sft_pairs(problems: list[Problem]) -> list[tuple[str, str]]:
    """(problem, target) pairs for the supervised warm-up."""
    return [(p.problem, p.target) for p in problems]
