"""Paired accuracy differences between two evaluated policies of run dirs, from their per-problem scores.

    python scripts/paired_diff.py RUN_DIR [RUN_DIR ...] --pair A[@STEP] B[@STEP] [--pair ...]

For each run dir and pair: AVG@K of A and B on the same eval problems (the run's `eval/<method>/step_*.json`,
`per_problem`: K rewards per problem), the difference A - B in points and its paired standard error over problems
(std of the per-problem differences / sqrt(n)), and the reverse KL / seq of each. STEP defaults to the method's last
evaluated step; `base` is `eval/base/step_000000.json`. A method of another run dir is `RUN_DIR::METHOD[@STEP]`
(e.g. `{run}_teacher_only::sapo_it2`, the bench's teacher-only chain beside the seed's run dir; `{run}` is
replaced by each RUN_DIR). Prints one line per (run, pair); this is
what docs/demo.md and docs/benchmarks.md quote as "+x (se)". Reading aid only, not part of the product.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def load(run: Path, ref: str) -> dict:
    if "::" in ref:
        other, ref = ref.split("::", 1)
        run = Path(other)
    name, _, step = ref.partition("@")
    files = sorted((run / "eval" / name).glob("step_*.json"))
    if not files:
        raise SystemExit(f"{run}: no eval of {name!r}")
    path = files[-1] if not step else run / "eval" / name / f"step_{int(step):06d}.json"
    return json.loads(path.read_text())


def paired(a: dict, b: dict) -> tuple[float, float, int]:
    pa, pb = a["per_problem"], b["per_problem"]
    keys = sorted(set(pa) & set(pb))
    if len(keys) != len(pa) or len(keys) != len(pb):
        raise SystemExit("the two evaluations are not on the same problems")
    d = [sum(pa[k]) / len(pa[k]) - sum(pb[k]) / len(pb[k]) for k in keys]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1)
    return 100 * mean, 100 * math.sqrt(var / n), n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--pair", nargs=2, action="append", required=True, metavar=("A", "B"))
    a = ap.parse_args(argv)
    for run in a.runs:
        for x, y in a.pair:
            ex, ey = load(run, x.replace("{run}", str(run))), load(run, y.replace("{run}", str(run)))
            diff, se, n = paired(ex, ey)
            x, y = (r.split("::")[-1].partition("@")[0] for r in (x, y))
            print(f"{run.name}: {x}@{ex['step']} {100 * ex['avg_at_k']:.1f} (KL {ex.get('kl') or 0:.3f}) - "
                  f"{y}@{ey['step']} {100 * ey['avg_at_k']:.1f} (KL {ey.get('kl') or 0:.3f}) = "
                  f"{diff:+.1f} (se {se:.2f}, {n} problems)")


if __name__ == "__main__":
    main()
