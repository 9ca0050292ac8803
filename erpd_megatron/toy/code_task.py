"""Toy code task (data only): write a one-line Python function from input/output examples; hidden tests judge it.

    problem  f(0)=1985;f(1)=2002;f(2)=2019;
    target   ```python
             def f(x):return x*17+1985
             ```

A function is `f(x) = x*a+b` (a in 2-19, b in 1000-4999: 72,000 functions, so the base's warm-up sees each train
function about once and cannot memorise them; every shown value has 4 digits). The prompt shows it at x = 0, 1, 2
(b is read off; a is a subtraction of the last two digits away: a tiny model learns it slowly and not perfectly); the
record's hidden tests call it at 4 other inputs (APPS / verl call-based `input_output` with `fn_name` "f"), so a
program that only memorises the shown examples (`if x == 3: return 10 ...`) fails them. Records are code records as
`data/prompts.py` reads them (`question`, `input_output`, `id`, `data_source: "toy_code"`) and are scored by the
sandboxed code reward (`rewards/code.py`). (Before: a 2-19, b 0-99, 1,800 functions; the base memorised the train
functions, docs/code_tasks.md.)

Train / validation / test come from a fixed partition of the FUNCTIONS (crc32 of "a,b" mod 8 == 0 is held out,
split again by hash into validation and test halves), as in `toy/task.py`: a held-out function is never shown in
training with any examples, so a gain on it is generalisation, not recall.

The tokenizer and the warmed tiny base that writes these programs: `toy/code_base.py`; the preset running the ERPD
pipeline on them with sandboxed rewards: `presets/toy_code.yaml` (`model.base: toy_code`, `data.train: toy_code`).
"""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import dataclass

from erpd_megatron.toy.task import write_jsonl  # noqa: F401  (the pipeline calls <task module>.write_jsonl)

A_RANGE = range(2, 20)
B_RANGE = range(1000, 5000)
SHOWN_X = (0, 1, 2)  # inputs shown in the prompt
HIDDEN_X = range(21, 61)  # inputs of the hidden tests: never shown, so memorising examples cannot pass
N_HIDDEN = 4
HELDOUT_MODULUS = 8


@dataclass(frozen=True)
class CodeProblem:
    a: int
    b: int

    def f(self, x: int) -> int:
        return x * self.a + self.b

    @property
    def id(self) -> str:
        return f"toycode-{self.a}-{self.b}"

    def _rng(self, what: str) -> random.Random:
        return random.Random(f"{self.id}/{what}")  # string seed: independent of PYTHONHASHSEED

    @property
    def shown(self) -> list[int]:
        return list(SHOWN_X)

    @property
    def hidden(self) -> list[int]:
        return sorted(self._rng("hidden").sample(list(HIDDEN_X), N_HIDDEN))

    @property
    def problem(self) -> str:
        return "".join(f"f({x})={self.f(x)};" for x in self.shown)

    @property
    def target(self) -> str:
        """The SFT target: the whole program in one python fence."""
        return f"```python\ndef f(x):return x*{self.a}+{self.b}\n```"

    def row(self) -> dict:
        tests = {"inputs": [[x] for x in self.hidden], "outputs": [self.f(x) for x in self.hidden], "fn_name": "f"}
        return {"id": self.id, "question": self.problem, "input_output": json.dumps(tests), "data_source": "toy_code"}


def _bucket(p: CodeProblem) -> int:
    return zlib.crc32(f"{p.a},{p.b}".encode())


def is_heldout(p: CodeProblem) -> bool:
    return _bucket(p) % HELDOUT_MODULUS == 0


def is_validation(p: CodeProblem) -> bool:
    """Held-out functions split in two by another hash digit: validation (tuning) and test (reporting)."""
    return is_heldout(p) and (_bucket(p) // HELDOUT_MODULUS) % 2 == 0


def all_problems() -> list[CodeProblem]:
    return [CodeProblem(a, b) for a in A_RANGE for b in B_RANGE]


def _draw(pool: list[CodeProblem], n: int, seed: int, what: str) -> list[CodeProblem]:
    if n > len(pool):
        raise ValueError(f"toy code task: {n} {what} problems requested, only {len(pool)} exist")
    return random.Random(f"toy_code/{what}/{seed}").sample(pool, n)


def pool_size(split: str) -> int:
    """How many distinct problems `train_problems` / `eval_problems` / `validation_problems` ("train", "eval",
    "validation") can return (as toy/task.py's)."""
    keep = {"train": lambda p: not is_heldout(p), "validation": is_validation,
            "eval": lambda p: is_heldout(p) and not is_validation(p)}[split]
    return sum(map(keep, all_problems()))


def train_problems(n: int, seed: int = 0) -> list[CodeProblem]:
    return _draw([p for p in all_problems() if not is_heldout(p)], n, seed, "train")


def validation_problems(n: int, seed: int = 0) -> list[CodeProblem]:
    return _draw([p for p in all_problems() if is_validation(p)], n, seed, "validation")


def eval_problems(n: int, seed: int = 0) -> list[CodeProblem]:
    """The test half of the held-out functions (named as in toy/task.py)."""
    return _draw([p for p in all_problems() if is_heldout(p) and not is_validation(p)], n, seed, "eval")
