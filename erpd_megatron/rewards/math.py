"""Math answer reward: math-verify 0.9.0 scoring of (response, gold) pairs.

Two entry points:
- `score(response, gold)`: one pair, in this process (debugging, notebooks). Uses SIGALRM for its
  timeout, so it only times out on the main thread (elsewhere it runs without a timeout).
- `MathReward(...).score_batch(responses, golds)`: a small pool of *spawned* worker processes.
  math-verify times itself out with signal.alarm, which refuses threads, and some sympy work runs in
  C where no signal can interrupt it; so every item runs in a worker under a wall-clock deadline and
  a worker that overruns it is killed and replaced (that item scores 0, the batch goes on).

Modes:
- "loose": math-verify's default extraction (LaTeX, then plain expressions) over the whole response.
  Several \\boxed{} answers parse as a *set*, so "\\boxed{3} ... \\boxed{5}" does not match "5".
- "strict": only the content of the LAST \\boxed{...} counts; no \\boxed{} at all scores 0.

Gold answers are usually bare ("1/2", "\\frac{\\sqrt3}{2}", "[1,2)"); math-verify's LaTeX extractor
needs delimiters, so a bare gold is parsed as "\\boxed{gold}" (then "$gold$", then raw).
Text golds (words of >= 3 letters, e.g. "Monday") are compared as normalised strings: sympy would parse
them as a product of single-letter symbols, which makes "Monday" equal to "dynamo".

Rewards are 1.0 (correct) / 0.0 (wrong, unparsable, timed out, garbage input). Nothing here raises on
the *content* of responses or golds (bytes, None, huge strings are coerced or scored 0).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import re
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache
from multiprocessing.connection import wait as mp_wait
from typing import Any, Literal

Mode = Literal["loose", "strict"]
MODES = ("loose", "strict")

# Responses longer than this keep only their tail (the answer is at the end); goldens are short.
MAX_RESPONSE_CHARS = 100_000
MAX_GOLD_CHARS = 10_000
# The worker's own soft deadline is this fraction of timeout_s, so that it usually answers (score 0)
# before the parent's hard deadline kills it (respawning costs ~1-2 s of imports).
_SOFT_FRACTION = 0.8
_LOGGERS_TO_QUIET = ("math_verify", "latex2sympy2_extended")

logger = logging.getLogger(__name__)


class _ItemTimeout(BaseException):
    """Raised by our SIGALRM handler. BaseException so math-verify's `except Exception` can't eat it."""


def _quiet_math_verify() -> None:
    # math-verify logs whole inputs at WARNING on timeouts and parse errors (megabytes for runaway
    # responses); we count timeouts ourselves instead.
    for name in _LOGGERS_TO_QUIET:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _coerce_text(x: Any, limit: int, keep: Literal["head", "tail"]) -> str:
    """Any input -> str, never raising: bytes are decoded leniently, None -> ""."""
    try:
        if x is None:
            s = ""
        elif isinstance(x, str):
            s = x
        elif isinstance(x, bytes | bytearray | memoryview):
            s = bytes(x).decode("utf-8", errors="replace")
        else:
            s = str(x)
    except Exception:
        return ""
    s = s.replace("\x00", "")
    if len(s) > limit:
        s = s[-limit:] if keep == "tail" else s[:limit]
    return s


_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed(text: str) -> str | None:
    """Content of the \\boxed{...} (or \\fbox{...}) that closes last, with balanced braces; else None.

    One linear pass with a brace stack (a rescan per candidate is quadratic on "\\boxed{" * 5000).
    The box closing last is the final answer, and for nested boxes it is the outer one.
    """
    box_starts = {m.end() - 1 for m in _BOXED_RE.finditer(text)}  # index of each box's "{"
    stack: list[int] = []
    best = None
    for i, c in enumerate(text):
        if c == "{" and (i == 0 or text[i - 1] != "\\"):
            stack.append(i)
        elif c == "}" and (i == 0 or text[i - 1] != "\\") and stack:
            opened = stack.pop()
            if opened in box_starts:
                best = (opened + 1, i)
    return None if best is None else text[best[0] : best[1]]


_TEXT_WRAP_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_TEXT_ANSWER_RE = re.compile(r"[a-z][a-z' -]*[a-z]")


def _normalize_text(s: str) -> str:
    s = _TEXT_WRAP_RE.sub(r"\1", s)
    s = s.replace("$", "").replace("\\,", " ").replace("\\ ", " ").replace("~", " ")
    s = re.sub(r"\s+", " ", s).strip().strip(".").strip().lower()
    return s


def _is_text_answer(gold: str) -> bool:
    norm = _normalize_text(gold)
    return len(norm.replace(" ", "")) >= 3 and _TEXT_ANSWER_RE.fullmatch(norm) is not None


@lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> tuple:
    from math_verify import parse

    candidates = [gold] if ("$" in gold or "\\boxed" in gold) else [f"\\boxed{{{gold}}}", f"${gold}$", gold]
    for cand in candidates:
        parsed = parse(cand, parsing_timeout=None)
        if parsed:
            return tuple(parsed)
    return ()


def _score_unguarded(response: str, gold: str, mode: str) -> float:
    """The scoring itself; no timeout handling (callers arm one). Raises only on timeouts."""
    from math_verify import parse, verify

    if not gold.strip() or not response.strip():
        return 0.0
    boxed = last_boxed(response)
    if mode == "strict":
        if boxed is None:
            return 0.0
        target_text = f"\\boxed{{{boxed}}}"
    else:
        target_text = response

    if _is_text_answer(gold):
        # Text golds: compare strings. Loose mode uses the last boxed answer, else the last line.
        extracted = boxed if boxed is not None else response.strip().splitlines()[-1]
        return float(_normalize_text(extracted) == _normalize_text(gold))

    gold_parsed = _parse_gold(gold)
    if not gold_parsed:
        return 0.0
    target_parsed = parse(target_text, parsing_timeout=None)
    if not target_parsed:
        return 0.0
    return float(bool(verify(list(gold_parsed), target_parsed, timeout_seconds=None)))


def _alarm_handler(signum, frame):
    raise _ItemTimeout()


def _score_with_alarm(response: str, gold: str, mode: str, timeout_s: float) -> tuple[float, bool]:
    """(score, timed_out). Arms SIGALRM (main thread only) for the whole item."""
    old = signal.signal(signal.SIGALRM, _alarm_handler)
    signal.setitimer(signal.ITIMER_REAL, max(timeout_s, 1e-3))
    try:
        return _score_unguarded(response, gold, mode), False
    except _ItemTimeout:
        return 0.0, True
    except Exception:
        return 0.0, False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def score(response: Any, gold: Any, mode: Mode = "loose", timeout_s: float = 5.0) -> float:
    """Score one response against one gold answer in this process: 1.0 correct, 0.0 otherwise.

    Never raises on the inputs' content; raises ValueError only on an unknown `mode`.
    """
    if mode not in MODES:
        raise ValueError(f"reward mode must be one of {MODES}, got {mode!r}")
    _quiet_math_verify()
    r = _coerce_text(response, MAX_RESPONSE_CHARS, "tail")
    g = _coerce_text(gold, MAX_GOLD_CHARS, "head")
    if threading.current_thread() is not threading.main_thread():
        logger.warning("erpd reward.score called off the main thread: running without a timeout")
        try:
            return _score_unguarded(r, g, mode)
        except Exception:
            return 0.0
    return _score_with_alarm(r, g, mode, timeout_s)[0]


# ----------------------------------------------------------------------------- worker pool


def _math_scorer(args: tuple, soft_timeout_s: float) -> tuple[float, str | None]:
    value, timed_out = _score_with_alarm(*args, soft_timeout_s)
    return value, "timeout" if timed_out else None


def _worker_main(conn, soft_timeout_s: float, custom: str | None = None) -> None:
    """Spawned worker: build its scorer (math-verify, warmed up; or the custom reward `custom`, see
    rewards/custom.py), say 'ready', then score items until EOF/None. An item is (index, args); the answer is
    (value, outcome) with outcome None, "timeout" or the failure's reason."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    _quiet_math_verify()
    try:
        if custom is None:
            _score_with_alarm("\\boxed{\\frac{1}{2}}", "0.5", "loose", 30.0)  # lazy imports (antlr, sympy)
            scorer = _math_scorer
        else:
            from erpd_megatron.rewards.custom import worker_scorer

            scorer = worker_scorer(custom)
        conn.send(("ready", None, None))
        parent = os.getppid()
        while True:
            # A SIGKILLed trainer cannot close the pool: poll, and leave when our parent is gone.
            while not conn.poll(1.0):
                if os.getppid() != parent:
                    return
            msg = conn.recv()
            if msg is None:
                return
            idx, args = msg
            conn.send(("done", idx, scorer(args, soft_timeout_s)))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return


@dataclass
class _Worker:
    proc: Any
    conn: Any
    ready: bool = False
    item: int | None = None
    deadline: float = 0.0
    started_at: float = field(default_factory=time.monotonic)


@dataclass
class BatchStats:
    """What happened in the last `score_batch` call."""

    items: int = 0
    soft_timeouts: int = 0  # worker's own deadline fired: scored 0, worker kept
    killed: int = 0  # worker overran the hard deadline (or died): killed, replaced, item scored 0
    errors: dict[str, int] = field(default_factory=dict)
    """items whose scorer failed (scored 0), by reason: an exception's class name, "bad return" (custom reward)"""


class RewardPool:
    """A small spawn-context process pool that scores items under a per-item wall-clock deadline; the shared
    machinery of MathReward and rewards/custom.py's CustomReward (`custom`: its "module:function" spec).

    `timeout_s` is the wall-clock budget per item, measured from the moment a ready worker gets it:
    past it the parent kills the worker and starts a new one. `soft_timeout_s` (default 0.8 * timeout_s)
    is the worker's own SIGALRM deadline, which normally ends a runaway item first without a respawn.
    Use as a context manager or call `close()`; the workers are daemonic, so they also die with us.
    Scripts using it need the usual `if __name__ == "__main__":` guard (spawn re-imports __main__).
    """

    what = "reward"

    def __init__(
        self,
        num_workers: int = 2,
        timeout_s: float = 5.0,
        soft_timeout_s: float | None = None,
        startup_timeout_s: float = 180.0,
        custom: str | None = None,
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.soft_timeout_s = _SOFT_FRACTION * self.timeout_s if soft_timeout_s is None else float(soft_timeout_s)
        self.startup_timeout_s = startup_timeout_s
        self.custom = custom
        self.last_stats = BatchStats()
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = []
        self._closed = False

    # -- lifecycle
    def start(self):
        """Start the workers now (otherwise the first `score_batch` does)."""
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")
        while len(self._workers) < self.num_workers:
            self._workers.append(self._spawn())
        return self

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_worker_main, args=(child, self.soft_timeout_s, self.custom), daemon=True,
            name=f"erpd-{self.what.replace(' ', '-')}"
        )
        proc.start()
        child.close()
        return _Worker(proc=proc, conn=parent)

    def _kill(self, w: _Worker) -> None:
        try:
            w.conn.close()
        except OSError:
            pass
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join(timeout=5)

    def close(self) -> None:
        """Ask idle workers to exit (they take ~0.7 s to tear down sympy), then kill what is left."""
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            try:
                if w.ready and w.item is None:
                    w.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        deadline = time.monotonic() + 2.0
        for w in self._workers:
            w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
            self._kill(w)
        self._workers = []

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- scoring
    def score_items(self, items: list[tuple]) -> list[float]:
        """Score every item (the scorer's argument tuple) in the pool; floats in order, 0.0 for any failure."""
        n = len(items)
        if n == 0:
            return []
        self.start()
        stats = BatchStats(items=n)
        results = [0.0] * n
        pending = deque(range(n))
        while pending or any(w.item is not None for w in self._workers):
            now = time.monotonic()
            for w in self._workers:  # hand out work to idle, ready workers
                if w.ready and w.item is None and pending:
                    i = pending.popleft()
                    try:
                        w.conn.send((i, items[i]))
                    except (OSError, BrokenPipeError):
                        pending.appendleft(i)
                        self._replace(w, stats, count=False)
                        continue
                    w.item, w.deadline = i, time.monotonic() + self.timeout_s
            deadlines = [w.deadline for w in self._workers if w.item is not None]
            wait_s = max(0.0, min(deadlines) - now) if deadlines else 1.0
            handles = [w.conn for w in self._workers] + [w.proc.sentinel for w in self._workers]
            mp_wait(handles, timeout=min(wait_s, 1.0))
            now = time.monotonic()
            for w in list(self._workers):
                self._poll(w, results, stats, now)
        self.last_stats = stats
        if stats.errors:
            logger.warning("%s: %d of %d items failed and scored 0 (%s)", self.what, sum(stats.errors.values()), n,
                           ", ".join(f"{k}: {v}" for k, v in sorted(stats.errors.items())))
        return results

    def _poll(self, w: _Worker, results: list[float], stats: BatchStats, now: float) -> None:
        try:
            while w.conn.poll():
                kind, idx, payload = w.conn.recv()
                if kind == "ready":
                    w.ready = True
                elif kind == "done" and idx == w.item:
                    value, outcome = payload
                    results[idx] = float(value)
                    if outcome == "timeout":
                        stats.soft_timeouts += 1
                    elif outcome:
                        stats.errors[outcome] = stats.errors.get(outcome, 0) + 1
                    w.item = None
        except (EOFError, OSError):
            self._replace(w, stats)  # died (OOM kill, segfault): its item stays 0
            return
        if w.item is not None and now > w.deadline:
            self._replace(w, stats)  # stuck past the hard deadline (e.g. C-level bignum work)
        elif not w.ready and not w.proc.is_alive():
            self._replace(w, stats, count=False, startup_failure=True)
        elif not w.ready and now - w.started_at > self.startup_timeout_s:
            raise RuntimeError(f"{self.what} worker did not start within {self.startup_timeout_s:.0f} s")

    def _replace(self, w: _Worker, stats: BatchStats, count: bool = True, startup_failure: bool = False) -> None:
        if startup_failure:
            code = w.proc.exitcode
            self._kill(w)
            raise RuntimeError(
                f"{self.what} worker exited during start-up (exit code {code}); "
                "is math-verify installed, and does the calling script have a __main__ guard?"
            )
        self._kill(w)
        if count:
            stats.killed += 1
        self._workers[self._workers.index(w)] = self._spawn()


class MathReward(RewardPool):
    """Batch math-verify reward over a RewardPool (see there for the timeouts)."""

    what = "math reward"

    def __init__(
        self,
        num_workers: int = 2,
        timeout_s: float = 5.0,
        mode: Mode = "loose",
        soft_timeout_s: float | None = None,
        startup_timeout_s: float = 180.0,
    ):
        if mode not in MODES:
            raise ValueError(f"reward mode must be one of {MODES}, got {mode!r}")
        super().__init__(num_workers, timeout_s, soft_timeout_s, startup_timeout_s)
        self.mode: Mode = mode

    def score_batch(self, responses: list[Any], golds: list[Any]) -> list[float]:
        """Score responses[i] against golds[i] (a gold answer, or a data.prompts.Prompt: its `answer`); returns
        floats in {0.0, 1.0}, in order."""
        if len(responses) != len(golds):
            raise ValueError(f"score_batch: {len(responses)} responses but {len(golds)} golds")
        return self.score_items([(_coerce_text(r, MAX_RESPONSE_CHARS, "tail"),
                                  _coerce_text(getattr(g, "answer", g), MAX_GOLD_CHARS, "head"), self.mode)
                                 for r, g in zip(responses, golds)])


def make_reward(mode: Mode = "loose", num_workers: int = 2, timeout_s: float = 5.0) -> MathReward:
    """Convenience constructor (the pipeline config calls this)."""
    return MathReward(num_workers=num_workers, timeout_s=timeout_s, mode=mode)
