"""``erpd reward``: score responses against a data set with the reward each record routes to (math or code).

    erpd reward --data problems.jsonl --responses responses.jsonl [--code-score fraction] [--sandbox bwrap]

RESPONSES is JSONL, one object per line: ``id`` (string or int), ``prompt_id`` (the record's id in DATA, as
``load_prompts`` gives it: the ``id`` field, else ``<file stem>-<row>``) and ``response`` (text). stdout gets one
JSON line per response, in order: ``{"id", "prompt_id", "kind", "reward", "reason"}``; stderr a summary with the
counts by reason. Exit 0 when every response was scored, 2 when an input is malformed (the message names file and
line) or the sandbox cannot start (the message says why).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from erpd_megatron.utils.cli import HelpFormatter


class UsageError(ValueError):
    """A flag or input the command cannot use; printed as one line, exit 2."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="erpd reward", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--data", required=True, help="JSONL/Parquet data set (math and/or code records)")
    ap.add_argument("--responses", required=True, help="JSONL with id, prompt_id, response")
    ap.add_argument("--math-mode", default="strict", choices=("strict", "loose"), help="math-verify mode")
    ap.add_argument("--code-score", default="binary", choices=("binary", "fraction"), help="code reward score")
    ap.add_argument("--language", default="python", help="fence tag of the program in a response")
    ap.add_argument("--sandbox", default="bwrap", choices=("bwrap", "none"),
                    help="none runs model-written programs UNSANDBOXED")
    ap.add_argument("--workers", type=int, default=2, help="sandboxes at once, >= 1")
    ap.add_argument("--timeout-per-test", type=float, default=6.0, help="wall limit of one test (s)")
    ap.add_argument("--timeout-per-sample", type=float, default=60.0, help="wall limit of one response's tests (s)")
    ap.add_argument("--route", action="append", default=[], metavar="SOURCE=KIND",
                    help="data_source -> math | code (repeat)")
    return ap


def read_responses(path: Path, prompt_ids: set[str]) -> list[dict]:
    """Validated response rows; errors name the file and line."""
    from erpd_megatron.data.prompts import parse_json_line

    rows: list[dict] = []
    seen: dict[str, int] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read ({e})") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        rec = parse_json_line(line, where, UsageError)
        if not isinstance(rec, dict):
            raise UsageError(f"{where}: expected an object with id, prompt_id, response")
        for key in ("id", "prompt_id", "response"):
            if rec.get(key) is None:
                raise UsageError(f"{where}: missing field {key!r}")
        if not isinstance(rec["response"], str):
            raise UsageError(f"{where}: field 'response' must be a string, got {type(rec['response']).__name__}")
        rid, pid = str(rec["id"]), str(rec["prompt_id"])
        if pid not in prompt_ids:
            raise UsageError(f"{where}: prompt_id {pid!r} is not an id of the data set")
        if rid in seen:
            raise UsageError(f"{where}: duplicate id {rid!r} (first at line {seen[rid]})")
        seen[rid] = lineno
        rows.append({"id": rec["id"], "prompt_id": pid, "response": rec["response"]})
    if not rows:
        raise UsageError(f"{path}: no responses")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from erpd_megatron.data.prompts import PromptDataError, load_prompts
    from erpd_megatron.rewards.sandbox import SandboxUnavailable

    try:
        if args.workers < 1 or not args.timeout_per_test > 0 or not args.timeout_per_sample > 0:
            raise UsageError("--workers must be >= 1 and the timeouts > 0")
        routes = {}
        for item in args.route:
            src, _, kind = item.partition("=")
            if kind not in ("math", "code"):
                raise UsageError(f"--route {item!r}: expected SOURCE=math or SOURCE=code")
            routes[src] = kind
        prompts = {p.id: p for p in load_prompts(args.data)}
        rows = read_responses(Path(args.responses), set(prompts))
        return _score(args, prompts, rows, routes)
    except (UsageError, PromptDataError, SandboxUnavailable) as e:
        print(f"erpd reward: error: {e}", file=sys.stderr)
        return 2


def _score(args, prompts: dict, rows: list[dict], routes: dict) -> int:
    from erpd_megatron.rewards.code import CodeReward
    from erpd_megatron.rewards.math import MathReward
    from erpd_megatron.rewards.router import RewardRouter

    router = RewardRouter(
        math_factory=lambda: MathReward(num_workers=2, mode=args.math_mode),
        code_factory=lambda: CodeReward(num_workers=args.workers, score=args.code_score, language=args.language,
                                        timeout_per_test_s=args.timeout_per_test,
                                        timeout_per_sample_s=args.timeout_per_sample, sandbox=args.sandbox),
        routes=routes)
    with router:
        rewards = router.score_batch([r["response"] for r in rows], [prompts[r["prompt_id"]] for r in rows])
        for r, v, why, kind in zip(rows, rewards, router.last_reasons, router.last_kinds):
            print(json.dumps({"id": r["id"], "prompt_id": r["prompt_id"], "kind": kind, "reward": v, "reason": why}))
        stats = router.last_stats
    counts = Counter(router.last_reasons)
    print(f"erpd reward: {len(rows)} responses scored, mean {sum(rewards) / len(rows):.4f}; kinds "
          f"{dict(stats.kinds)}; reasons {dict(sorted(counts.items()))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
