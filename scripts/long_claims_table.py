"""The tables of docs/demo.md's "C1-C5 on the long task under issue 22's protocol" from `long_claims` run dirs.

    python scripts/long_claims_table.py RUN_DIR [RUN_DIR ...] [--json OUT.json]

One column per run dir (a seed of `erpd run --config long_claims`); paired differences in points with their
standard error over the eval problems (scripts/paired_diff.py) and the reverse KL / seq of each side; AVG@4 per
method and step. pi_U's step is the dip the run chose on its training batch (`iter_0/unlearned_mse.json`), not
anything read on the eval set. Reading aid only, not part of the product.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired_diff import load, paired  # noqa: E402

ROWS = [  # (label, A, B); "mse@U" = the MSE run's checkpoint that strategy 2 used as pi_U
    ("C1: s1 (SAPO) - SAPO@6 (the teacher's validated best step)", "s1_sapo", "sapo@6"),
    ("C1: s1 (SAPO) - SAPO@8 (the teacher it distils, last)", "s1_sapo", "sapo@8"),
    ("C1: s1 (SAPO) - base", "s1_sapo", "base"),
    ("C1: s1 (SAPO) - on-policy GRPO (512 rollouts each)", "s1_sapo", "onpolicy_grpo"),
    ("C3: SAPO@8 - GRPO@8 (teachers, same batch)", "sapo@8", "grpo@8"),
    ("C3: CE@8 - GRPO@8", "ce@8", "grpo@8"),
    ("C3: SAPO@6 (validated best) - GRPO@8", "sapo@6", "grpo@8"),
    ("C3': SAPO@8 - on-policy GRPO (512 rollouts each)", "sapo@8", "onpolicy_grpo"),
    ("C3': CE@8 - on-policy GRPO", "ce@8", "onpolicy_grpo"),
    ("teachers: GRPO@8 - base", "grpo@8", "base"),
    ("teachers: CE@8 - base", "ce@8", "base"),
    ("teachers: SAPO@8 - base", "sapo@8", "base"),
    ("on-policy GRPO - base", "onpolicy_grpo", "base"),
    ("C2: pi_T = MSE@8 - base", "mse@8", "base"),
    ("C2: pi_U = MSE@dip - base", "mse@U", "base"),
    ("**C2: s2 student - base**", "s2_mse", "base"),
    ("**C2: s2 student - pi_T (MSE@8)**", "s2_mse", "mse@8"),
    ("C5: s1 (MSE) - base", "s1_mse", "base"),
    ("s1 (MSE) - pi_T (MSE@8): strategy 1 over a weak teacher", "s1_mse", "mse@8"),
    ("C5: ensemble s1+s2 - base", "s12_mse", "base"),
    ("**C5: ensemble - s1 (MSE)**", "s12_mse", "s1_mse"),
    ("**C5: ensemble - s2**", "s12_mse", "s2_mse"),
]
METHODS = ["base", "ce@4", "ce@8", "sapo@2", "sapo@4", "sapo@6", "sapo@8", "grpo@4", "grpo@8", "mse@2", "mse@4",
           "mse@6", "mse@8", "s1_sapo@2", "s1_sapo@4", "s2_mse@2", "s2_mse@4", "s1_mse@2", "s1_mse@4", "s12_mse@2",
           "s12_mse@4", "onpolicy_grpo@2", "onpolicy_grpo@4"]


def dip(run: Path) -> int:
    return int(json.loads((run / "iter_0" / "unlearned_mse.json").read_text())["step"])


def ref(run: Path, name: str) -> str:
    return name.replace("@U", f"@{dip(run)}") if name.endswith("@U") else name


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    out = {"runs": [str(r) for r in a.runs], "dip_step": {r.name: dip(r) for r in a.runs}, "pairs": {}, "avg": {}}
    head = " | ".join(r.name for r in a.runs)
    print(f"| paired difference, points (se) [KL / seq of each] | {head} | median [min, max] |")
    print("|---|" + "---|" * (len(a.runs) + 1))
    for label, x, y in ROWS:
        cells, ds = [], []
        for run in a.runs:
            ex, ey = load(run, ref(run, x)), load(run, ref(run, y))
            d, se, n = paired(ex, ey)
            ds.append(d)
            out["pairs"].setdefault(label, {})[run.name] = {"diff": round(d, 2), "se": round(se, 2), "n": n,
                                                             "kl_a": ex.get("kl"), "kl_b": ey.get("kl")}
            kb = "" if y == "base" else f", {ey.get('kl') or 0:.2f}"
            cells.append(f"{d:+.1f} ({se:.1f}) [{ex.get('kl') or 0:.2f}{kb}]")
        print(f"| {label} | " + " | ".join(cells) +
              f" | {statistics.median(ds):+.1f} [{min(ds):+.1f}, {max(ds):+.1f}] |")
    print(f"\n| AVG@4 % (KL / seq) | {head} |")
    print("|---|" + "---|" * len(a.runs))
    for m in METHODS:
        cells = []
        for run in a.runs:
            try:
                e = load(run, m)
            except (SystemExit, FileNotFoundError):
                cells.append("-")
                continue
            out["avg"].setdefault(m, {})[run.name] = {"avg_at_k": e["avg_at_k"], "kl": e.get("kl")}
            cells.append(f"{100 * e['avg_at_k']:.1f} ({e.get('kl') or 0:.2f})")
        print(f"| {m} | " + " | ".join(cells) + " |")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
