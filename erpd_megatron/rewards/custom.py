"""A user's reward function, verl's signature, run in the reward pool; and the pipeline's reward hook.

    fn(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None) -> float | dict

(verl's `custom_reward_function.path` / `.name`, slime's `--custom-rm-path`). A dict must hold "score"; its other
keys are dropped. `solution_str` is the decoded response (special tokens skipped), `ground_truth` the record's
answer (data.answer_key), `extra_info` its `extra_info` field or None, `data_source` its `data_source` or "".

Spec: "package.module:function" (imported) or "path/to/file.py:function" (loaded from the file). The parent
loads it once to refuse a bad spec in one line before any compute; each pool worker loads it again (spawned
processes share nothing). Failures never stop a run: an exception scores 0 and is counted by its class name, a
return value that is not a finite number (or a dict without one under "score") as "bad return", an item past
its soft deadline (SIGALRM) as a timeout, one past the hard deadline kills the worker (RewardPool in math.py).

Which records it scores is the router's choice (rewards/router.make_router): those whose `data_source` is in
`reward.custom_sources`, or every record when that list is empty.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from erpd_megatron.config import ConfigError
from erpd_megatron.rewards.math import MAX_GOLD_CHARS, MAX_RESPONSE_CHARS, RewardPool, _coerce_text


class RewardSpecError(ConfigError):
    """A custom reward spec that cannot be loaded; one line naming the spec."""


def load_function(spec: str) -> Callable:
    """The function named by "module:function" or "file.py:function"."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise RewardSpecError(f"reward.custom {spec!r}: expected 'module:function' or 'path/to/file.py:function'")
    try:
        if target.endswith(".py"):
            path = Path(target).expanduser().resolve()
            if not path.is_file():
                raise RewardSpecError(f"reward.custom {spec!r}: no such file {path}")
            mod_name = f"erpd_custom_reward_{abs(hash(str(path)))}"
            loader = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(loader)
            sys.modules[mod_name] = module
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except RewardSpecError:
        raise
    except Exception as e:  # the user's module failed to import: say which and why, in one line
        raise RewardSpecError(f"reward.custom {spec!r}: importing {target} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardSpecError(f"reward.custom {spec!r}: {target} has no function {name!r}")
    return fn


def _as_score(value: Any) -> float | None:
    if isinstance(value, dict):
        value = value.get("score")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


class _SoftTimeout(BaseException):
    """BaseException: a user's `except Exception` cannot swallow the deadline."""


def _on_alarm(signum, frame):
    raise _SoftTimeout()


def worker_scorer(spec: str) -> Callable[[tuple, float], tuple[float, str | None]]:
    """What a pool worker runs per item: (data_source, solution_str, ground_truth, extra_info), soft deadline ->
    (score, outcome)."""
    fn = load_function(spec)

    def run(args: tuple, soft_timeout_s: float) -> tuple[float, str | None]:
        old = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, max(soft_timeout_s, 1e-3))
        try:
            value = _as_score(fn(*args))
            return (0.0, "bad return") if value is None else (value, None)
        except _SoftTimeout:
            return 0.0, "timeout"
        except Exception as e:
            return 0.0, type(e).__name__
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)

    return run


class CustomReward(RewardPool):
    """A custom reward function in a RewardPool (same timeouts and failure counts as MathReward)."""

    what = "custom reward"

    def __init__(self, spec: str, num_workers: int = 2, timeout_s: float = 5.0, **kw):
        load_function(spec)  # a bad spec fails here, in one line, not in every worker
        super().__init__(num_workers, timeout_s, custom=spec, **kw)

    def score_batch(self, responses: list[str], prompts: list) -> list[float]:
        """Scores of responses[i] for prompts[i] (data.prompts.Prompt)."""
        if len(responses) != len(prompts):
            raise ValueError(f"score_batch: {len(responses)} responses but {len(prompts)} prompts")
        return self.score_items([(p.data_source, _coerce_text(r, MAX_RESPONSE_CHARS, "tail"),
                                  _coerce_text(p.answer, MAX_GOLD_CHARS, "head"), p.meta.get("extra_info"))
                                 for r, p in zip(responses, prompts)])
