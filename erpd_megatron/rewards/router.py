"""Per-record reward routing: math (math-verify), code (sandboxed execution) or a custom reward, so one batch can
mix them.

Which reward a record gets, first rule that applies:
1. its `data_source` (verl's convention) in `routes` (the user's `reward.routes`, then `DATA_SOURCE_ROUTES`);
2. it carries test cases (`rewards/code_tests.has_tests`: input_output, LiveCodeBench / HumanEval / MBPP tests,
   verl's reward_model.ground_truth with inputs/outputs) -> code;
3. `default` (math, or custom when a custom reward replaces math-verify).

Backends start lazily, on the first record routed to them: a math-only run never needs bubblewrap, a code-only run
never spawns math-verify workers. The custom slot takes any object with
`score_batch(responses: list[str], prompts: list[Prompt]) -> list[float]` (and optionally `close()`).
`score_batch` also accepts plain gold strings instead of prompts (math), as `MathReward` does, so older callers work.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from erpd_megatron.rewards.code_tests import CodeTestError, has_tests, parse_tests

KINDS = ("math", "code", "custom")
# verl's data_source names (verl/utils/reward_score/__init__.py) -> the reward that scores them here
DATA_SOURCE_ROUTES = {
    "openai/gsm8k": "math", "lighteval/MATH": "math", "DigitalLearningGmbH/MATH-lighteval": "math",
    "HuggingFaceH4/MATH-500": "math", "math_dapo": "math", "math": "math", "aime24": "math", "aime25": "math",
    "codecontests": "code", "apps": "code", "codeforces": "code", "taco": "code", "livecodebench": "code",
    "humaneval": "code", "mbpp": "code", "code": "code",
}


@dataclass
class RouterStats:
    """The last batch: items per reward kind and every item's reason, counted (code reasons as in rewards/code.py;
    math: passed / wrong_answer, plus the math pool's soft timeouts and kills)."""

    items: int = 0
    kinds: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    math_soft_timeouts: int = 0
    math_killed: int = 0

    def as_dict(self) -> dict:
        return {"items": self.items, "kinds": dict(self.kinds), "reasons": dict(sorted(self.reasons.items())),
                "math_soft_timeouts": self.math_soft_timeouts, "math_killed": self.math_killed}


class RewardRouter:
    """`score_batch(responses, prompts)`: each item scored by the reward its record routes to, results in order."""

    def __init__(self, math_factory=None, code_factory=None, custom: Any = None, routes: dict | None = None,
                 default: str = "math", custom_takes_all: bool = False):
        routes = dict(routes or {})
        bad = {k: v for k, v in [*routes.items(), ("default", default)] if v not in KINDS}
        if bad:
            raise ValueError(f"reward routes must map to one of {KINDS}, got {bad}")
        if custom is None and "custom" in [*routes.values(), default]:
            raise ValueError("a reward route says 'custom' but no custom reward is configured")
        self.routes = {**DATA_SOURCE_ROUTES, **routes}
        self.default = default
        self.custom_takes_all = custom_takes_all and custom is not None  # reward.custom without custom_sources
        self._factories = {"math": math_factory, "code": code_factory}
        self._backends: dict[str, Any] = {"custom": custom} if custom is not None else {}
        self._tasks: dict[int, tuple] = {}  # id(prompt) -> (prompt, CodeTask | error text), parsed once
        self.last_stats = RouterStats()
        self.last_reasons: list[str] = []
        self.last_kinds: list[str] = []

    def route(self, prompt: Any) -> str:
        if isinstance(prompt, str):
            return "math"
        if self.custom_takes_all:
            return "custom"
        meta = getattr(prompt, "meta", None) or {}
        ds = meta.get("data_source")
        if isinstance(ds, str) and ds in self.routes:
            return self.routes[ds]
        if has_tests(meta):
            return "code"
        return self.default

    def backend(self, kind: str):
        if kind not in self._backends:
            factory = self._factories.get(kind)
            if factory is None:
                raise ValueError(f"no {kind} reward is configured")
            b = factory()
            if hasattr(b, "start"):
                b.start()  # code: raises SandboxUnavailable (with the reason) before anything runs
            self._backends[kind] = b
        return self._backends[kind]

    def _task(self, prompt):
        hit = self._tasks.get(id(prompt))
        if hit is None or hit[0] is not prompt:
            try:
                task = parse_tests(getattr(prompt, "meta", None) or {})
            except CodeTestError as e:
                task = f"{e}"
            hit = self._tasks[id(prompt)] = (prompt, task)
        return hit[1]

    def score_batch(self, responses: list, prompts: list) -> list[float]:
        if len(responses) != len(prompts):
            raise ValueError(f"score_batch: {len(responses)} responses but {len(prompts)} prompts")
        kinds = [self.route(p) for p in prompts]
        out, reasons = [0.0] * len(responses), [""] * len(responses)
        stats = RouterStats(items=len(responses), kinds=Counter(kinds))
        for kind in KINDS:
            idx = [i for i, k in enumerate(kinds) if k == kind]
            if not idx:
                continue
            b = self.backend(kind)
            resp = [responses[i] for i in idx]
            if kind == "math":
                golds = [p if isinstance(p, str) else getattr(p, "answer", "") for p in (prompts[i] for i in idx)]
                vals = b.score_batch(resp, golds)
                why = ["passed" if v > 0 else ("no_answer" if not str(g).strip() else "wrong_answer")
                       for v, g in zip(vals, golds)]
                ms = getattr(b, "last_stats", None)
                stats.math_soft_timeouts += getattr(ms, "soft_timeouts", 0)
                stats.math_killed += getattr(ms, "killed", 0)
            elif kind == "code":
                tasks = [self._task(prompts[i]) for i in idx]
                runnable = [j for j, t in enumerate(tasks) if not isinstance(t, str)]
                vals, why = [0.0] * len(idx), ["no_tests"] * len(idx)
                if runnable:
                    got = b.score_batch([resp[j] for j in runnable], [tasks[j] for j in runnable])
                    for j, v, r in zip(runnable, got, b.last_reasons):
                        vals[j], why[j] = v, r
            else:
                vals = b.score_batch(resp, [prompts[i] for i in idx])
                why = list(getattr(b, "last_reasons", None) or ["passed" if v > 0 else "wrong_answer" for v in vals])
            for i, v, r in zip(idx, vals, why):
                out[i], reasons[i] = float(v), r
        stats.reasons = Counter(reasons)
        self.last_stats, self.last_reasons, self.last_kinds = stats, reasons, kinds
        return out

    def close(self) -> None:
        for b in self._backends.values():
            if hasattr(b, "close"):
                b.close()
        self._backends = {k: v for k, v in self._backends.items() if k == "custom"}

    def __enter__(self) -> RewardRouter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_router(r, mode: str = "strict") -> RewardRouter:
    """The router of a `reward` config section (config.RewardConfig), math-verify in `mode` (rollout.reward_mode).
    `reward.custom` (rewards/custom.py) takes the records whose data_source is in `reward.custom_sources`, or every
    record when that list is empty; `reward.routes` still wins for the data sources it names."""
    from erpd_megatron.rewards.code import CodeReward
    from erpd_megatron.rewards.custom import CustomReward
    from erpd_megatron.rewards.math import MathReward
    from erpd_megatron.rewards.sandbox import SandboxLimits

    custom = CustomReward(r.custom, num_workers=2, timeout_s=r.timeout_s) if r.custom else None
    routes = {**{s: "custom" for s in r.custom_sources}, **r.routes} if custom is not None else dict(r.routes)
    return RewardRouter(
        math_factory=lambda: MathReward(num_workers=2, timeout_s=r.timeout_s, mode=mode),
        code_factory=lambda: CodeReward(num_workers=r.code_workers, score=r.code_score, language=r.code_language,
                                        timeout_per_test_s=r.code_timeout_per_test_s,
                                        timeout_per_sample_s=r.code_timeout_per_sample_s, sandbox=r.sandbox,
                                        python=r.sandbox_python, limits=SandboxLimits(memory_mb=r.code_memory_mb)),
        custom=custom, routes=routes, default=r.default,
        custom_takes_all=custom is not None and not r.custom_sources and not r.routes)
