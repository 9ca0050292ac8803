"""Figures people read: the run report's plot and the benchmark plots, from small synthetic files.

Checked on the matplotlib objects (the figure is captured before it is closed): title, accuracy axis in %,
per-token KL by default, the base marked, legends outside the data area, one labelled line per seed and a
median per method in the benchmark plot.
"""

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from erpd_megatron.bench import plots  # noqa: E402
from erpd_megatron.pipeline import report  # noqa: E402
from erpd_megatron.pipeline.rundir import RunDir  # noqa: E402


@pytest.fixture
def captured(monkeypatch):
    """The figures saved during the test, kept open for inspection."""
    figs, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
    yield figs
    for f in figs:
        close(f)


def _legend_outside(fig, ax) -> bool:
    fig.canvas.draw()
    leg = ax.get_legend() or fig.legends[0]
    return not leg.get_window_extent().overlaps(ax.get_window_extent())


def _synthetic_run(root) -> dict:
    run = RunDir(root)
    run.write_eval("base", 0, {"avg_at_k": 0.30, "pass_at_k": 0.5, "kl": 0.0, "mean_length": 20})
    paths = {"ce": [(0, 0.30, 0.0), (10, 0.36, 0.4), (20, 0.40, 1.0)],
             "s1_ce": [(0, 0.30, 0.0), (10, 0.33, -0.01), (20, 0.35, 0.2)],
             "onpolicy_grpo": [(0, 0.30, 0.0), (2, 0.31, 0.05), (4, 0.33, 0.1)]}
    for name, pts in paths.items():
        for step, acc, kl in pts:
            run.write_eval(name, step, {"avg_at_k": acc, "kl": kl, "pass_at_k": 0.6, "mean_length": 40})
    methods = {n: {"kind": n, "rollouts": 256, "rollouts_per_step": 64 if n.startswith("onpolicy") else 0}
               for n in paths}
    return report.build_summary(run, methods)


def test_report_plot_percent_axis_token_kl_base_marker_and_legend_outside(tmp_path, captured):
    summary = _synthetic_run(tmp_path)
    m = summary["methods"]["ce"]
    assert m["kl_token"] == pytest.approx(1.0 / 40)  # per-token KL = per-sequence KL / mean length
    assert [c["rollouts"] for c in summary["methods"]["onpolicy_grpo"]["curve"]] == [0, 128, 256]
    assert {c["rollouts"] for c in m["curve"]} == {256}  # offline: the fixed batch, up front
    text = report.write_report(RunDir(tmp_path), summary, title="synthetic").read_text()
    assert "KL/token (last)" in text and "0.02500" in text
    assert "k1 estimator is unbiased but not >= 0" in text  # s1_ce logged a negative KL: the report says why
    fig = captured[-1]
    ax_r, ax_k = fig.axes
    assert fig._suptitle.get_text() == "synthetic"
    assert ax_k.get_xlabel().startswith("reverse KL to the base, per token")
    assert "%" in ax_r.yaxis.get_major_formatter()(0.25, 0)
    assert any(line.get_marker() == "*" and list(line.get_xdata()) == [0] for line in ax_k.lines)  # the base
    ce_line = next(line for line in ax_k.lines if line.get_label() == "ce")
    assert max(ce_line.get_xdata()) == pytest.approx(1.0 / 40)
    assert ce_line.get_markerfacecolor() == "none"  # hollow: a point under another stays visible
    assert _legend_outside(fig, ax_k)
    # offline methods at the same rollout count are moved apart sideways
    fixed = [set(line.get_xdata()) for line in ax_r.lines if len(set(line.get_xdata())) == 1 and
             line.get_marker() != "*" and line.get_linestyle() != "None"]
    assert len(fixed) == 2 and fixed[0] != fixed[1]


def test_report_plot_per_sequence_option(tmp_path, captured):
    summary = _synthetic_run(tmp_path)
    report.write_report(RunDir(tmp_path), summary, kl="sequence")
    ax_k = captured[-1].axes[1]
    assert ax_k.get_xlabel().startswith("reverse KL to the base, per response")
    assert max(next(ln for ln in ax_k.lines if ln.get_label() == "ce").get_xdata()) == pytest.approx(1.0)


def test_compare_plot_reads_summaries_written_before_per_token_kl(tmp_path, captured):
    old = {"base": {"accuracy": 0.3, "kl": 0.0},
           "methods": {"s1": {"kind": "student", "accuracy": 0.35, "kl": 0.2, "steps": 10, "rollouts": 512,
                              "best": {"step": 10, "accuracy": 0.35, "kl": 0.2},
                              "curve": [{"step": 0, "accuracy": 0.3, "kl": 0.0, "mean_length": 20},
                                        {"step": 10, "accuracy": 0.35, "kl": 0.2, "mean_length": 20}]}}}
    report.plot_summaries({"old": old, "new": _synthetic_run(tmp_path)}, tmp_path / "c.png")
    ax_r, ax_k = captured[-1].axes
    line = next(ln for ln in ax_k.lines if ln.get_label() == "old: s1")
    assert list(line.get_xdata()) == pytest.approx([0.0, 0.01])  # 0.2 / 20 tokens
    assert "| old | s1 | student | 512 | 10 | 35.0% | +5.0 pt | n/a |" in report.compare_table({"old": old})
    assert any(set(ln.get_xdata()) == {512} for ln in ax_r.lines)  # the method's total rollouts


def _bench_json(out):
    curves = []
    for seed in (1, 2, 3):
        curves.append({"seed": seed, "method": "s1", "kind": "erpd",
                       "points": [{"step": 0, "accuracy": 0.3, "kl": 0.0, "rollouts": 512, "compute_s": 0.0},
                                  {"step": 4, "accuracy": 0.3 + 0.01 * seed, "kl": 0.1 * seed, "rollouts": 512,
                                   "compute_s": 10.0 * seed}]})
        curves.append({"seed": seed, "method": "onpolicy_grpo", "kind": "onpolicy",
                       "points": [{"step": s, "accuracy": 0.3 + 0.005 * s * seed, "kl": 0.02 * s, "rollouts": 128 * s,
                                   "compute_s": 3.0 * s} for s in range(5)]})
    doc = {"results": {"seeds": [1, 2, 3], "curves": curves,
                       "base_accuracy": {"median": 0.3, "min": 0.28, "max": 0.32, "n": 3}}}
    (out / "erpd_vs_onpolicy.json").write_text(json.dumps(doc))
    ws = {"results": {"memcpy_gbps": {"median": 8.0},
                      "per_bucket_mib": {str(b): {"gbps": {"median": 1.0, "min": 0.9, "max": 1.1}} for b in (1.0, 4.0)}}}
    (out / "weight_sync.json").write_text(json.dumps(ws))


def test_bench_plots_label_seeds_draw_median_and_keep_legends_off_the_data(tmp_path, captured):
    _bench_json(tmp_path)
    plots.erpd_vs_onpolicy(tmp_path)
    fig = captured[-1]
    ax_r, ax_c, ax_k = fig.axes  # vs rollouts, vs compute seconds (Table 4's wall-clock view), vs KL
    assert "compute seconds" in ax_c.get_xlabel()
    assert any(list(ln.get_xdata()) == [0.0, 3.0, 6.0, 9.0, 12.0] for ln in ax_c.lines if ln.get_linewidth() == 2.5)
    labels = [t.get_text() for t in ax_k.get_legend().get_texts()]
    assert {"seed 1", "seed 2", "seed 3"} <= set(labels)
    assert any("median" in x for x in labels) and any("base" in x for x in labels)
    assert "%" in ax_r.yaxis.get_major_formatter()(0.25, 0)
    # the median line of the on-policy method: accuracy at step 4 is the median over seeds (0.3 + 0.02 * 2)
    med = [ln for ln in ax_r.lines if ln.get_linewidth() == 2.5 and ln.get_linestyle() == "-" and len(ln.get_xdata()) == 5]
    assert len(med) == 1 and med[0].get_ydata()[-1] == pytest.approx(0.34)
    assert _legend_outside(fig, ax_k)
    plots.weight_sync(tmp_path)
    fig = captured[-1]
    assert _legend_outside(fig, fig.axes[0])


def test_compare_styles_distinct_bases_once_and_flat_plot_not_zoomed(tmp_path, captured):
    """erpd compare: every (run, method) series has its own colour x marker, runs of the same base on the same
    eval set share one base marker, different bases get different ones; a flat plot keeps a 10-point y axis."""
    a = _synthetic_run(tmp_path / "a")
    runs = {}
    for name, model in (("r1", "m1"), ("r2", "m1"), ("r3", "m2")):
        runs[name] = {**json.loads(json.dumps(a)), "setup": {"model": model, "eval": "e.jsonl", "train": "t"}}
    runs["r3"]["base"]["accuracy"] = 0.2
    table = report.compare_table(runs)  # every compare table names each run's model, train set and eval set
    assert "| run | model | train set | eval set |" in table and "| r3 | m2 | t | e.jsonl (K = n/a) |" in table
    styles = report.series_styles(runs)
    assert len(styles) == 9 and len(set(styles.values())) == 9
    many = {f"r{i}": a for i in range(8)}  # 24 series: colours come round, the pairs still differ
    assert len(set(report.series_styles(many).values())) == 24
    assert [(g[0], g[2]) for g in report.base_groups(runs)] == [("base m1", ["r1", "r2"]), ("base m2", ["r3"])]
    report.plot_summaries(runs, tmp_path / "c.png")
    ax_k = captured[-1].axes[1]
    bases = [ln for ln in ax_k.lines if ln.get_marker() in report.BASE_MARKERS]
    assert len(bases) == 2 and bases[0].get_marker() != bases[1].get_marker()
    pairs = [(ln.get_color(), ln.get_marker()) for ln in ax_k.lines if ln.get_label().startswith("r")]
    assert len(pairs) == len(set(pairs)) == 9
    # a flat run: every accuracy 0 -> the axis shows 0..10 %, not a 0.1 % zoom
    flat = json.loads(json.dumps(a))
    flat["base"]["accuracy"] = 0.0
    for m in flat["methods"].values():
        for c in m["curve"]:
            c["accuracy"] = 0.0
    report.plot_summaries({"flat": flat}, tmp_path / "f.png")
    lo, hi = captured[-1].axes[0].get_ylim()
    assert lo <= 0.0 and hi >= 0.1 and hi - lo < 0.2
    assert report.y_limits([0.4, 0.41]) is not None and report.y_limits([0.2, 0.5]) is None
    assert report.y_limits([1.0, 1.0])[1] >= 1.0 and report.y_limits([1.0, 1.0])[0] <= 0.9


def test_bench_long_json_gets_its_own_plot(tmp_path, captured):
    """`--preset bench_long` writes erpd_vs_onpolicy_bench_long.json: all_plots draws it beside the toy's, named by
    its task, without overwriting the toy's PNG."""
    _bench_json(tmp_path)
    (tmp_path / "erpd_vs_onpolicy.json").rename(tmp_path / "erpd_vs_onpolicy_bench_long.json")
    paths = plots.all_plots(tmp_path)
    assert tmp_path / "erpd_vs_onpolicy_bench_long.png" in paths
    assert not (tmp_path / "erpd_vs_onpolicy.png").exists()
    assert "long-reasoning task" in captured[-1]._suptitle.get_text()
