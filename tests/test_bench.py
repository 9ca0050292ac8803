"""Benchmarks at minimal size: each writes a JSON with the shared schema, and its built-in
correctness check holds (same first-step loss / log-probs for Megatron and transformers on identical
weights; the engine's log-probs after weight sync equal Megatron's). No timing assertions."""

import json

import pytest
import torch

from erpd_megatron.bench.common import MACHINE_KEYS, REQUIRED_KEYS, interleaved, spread
from erpd_megatron.bench.models import BenchModel

TINY = BenchModel(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, ffn_hidden_size=128,
                  vocab_size=256)


@pytest.fixture
def megatron_world():
    """The in-process benchmarks create a world of one; tear it down so other tests start clean."""
    torch.set_num_threads(1)
    yield
    from erpd_megatron.megatron.parallel import destroy_parallel

    destroy_parallel()


def _check_schema(path, name):
    doc = json.loads(path.read_text())
    for k in REQUIRED_KEYS:
        assert k in doc, f"{name}: missing top-level key {k}"
    assert doc["benchmark"] == name
    for k in MACHINE_KEYS:
        assert k in doc["machine"], f"{name}: machine.{k} missing"
    assert isinstance(doc["machine"]["loadavg_start"], list) and len(doc["machine"]["loadavg_start"]) == 3
    assert doc["machine"]["torch"] == torch.__version__
    assert doc["command"]
    return doc


def _check_spread(s):
    assert {"median", "min", "max", "n"} <= set(s)
    assert s["min"] <= s["median"] <= s["max"]


def test_spread_and_interleaving_order():
    assert spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    calls = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, repeats=3,
                        steps=2)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] + ["b", "b", "a", "a"] + ["a", "a", "b", "b"]
    assert len(times["a"]) == len(times["b"]) == 3


def test_train_throughput_minimal(tmp_path, megatron_world):
    from erpd_megatron.bench import train_throughput

    res = train_throughput.run(tmp_path, model=TINY, batch_size=2, seq_len=16, warmup=0, repeats=2, steps=1)
    doc = _check_schema(tmp_path / "train_throughput.json", "train_throughput")
    assert doc["results"] == json.loads(json.dumps(res))
    # same weights, same batch, same loss -> same first-step loss
    assert res["first_step_loss"]["abs_diff"] < 1e-5
    assert abs(res["first_step_loss"]["plain_onednn"] - res["first_step_loss"]["plain"]) < 1e-5  # kernel control
    _check_spread(res["ratio_megatron_over_plain"])
    _check_spread(res["ratio_megatron_over_plain_onednn"])
    for k in ("megatron", "plain", "plain_onednn"):
        _check_spread(res["tokens_per_s"][k])
        assert len(res["seconds_per_step"][k]) == 2


def test_logprob_throughput_minimal(tmp_path, megatron_world):
    from erpd_megatron.bench import logprob_throughput

    res = logprob_throughput.run(tmp_path, model=TINY, batch_size=2, seq_len=16, warmup=0, repeats=2, steps=1)
    _check_schema(tmp_path / "logprob_throughput.json", "logprob_throughput")
    assert res["max_abs_logprob_diff"] < 1e-5
    _check_spread(res["ratio_megatron_over_plain"])
    _check_spread(res["ratio_megatron_over_plain_onednn"])


def test_weight_sync_minimal(tmp_path):
    from erpd_megatron.bench import weight_sync

    res = weight_sync.run(tmp_path, model=TINY, buckets_mib=(0.01, 1), repeats=1, memcpy_mib=4)
    _check_schema(tmp_path / "weight_sync.json", "weight_sync")
    assert res["max_abs_logprob_diff_engine_vs_megatron"] < 1e-4
    small, big = res["per_bucket_mib"]["0.01"], res["per_bucket_mib"]["1.0"]
    assert small["bytes"] == big["bytes"] > 0
    assert small["buckets"] > big["buckets"]  # the cap is honoured
    _check_spread(res["memcpy_gbps"])


def test_sglang_vs_local_without_the_environment(tmp_path, monkeypatch):
    """The real-server benchmark records why it did not run (its run is in docs/benchmarks; a minimal run
    here would cost one more server start: tests/test_sglang_real.py covers the server itself)."""
    from erpd_megatron.bench import sglang_vs_local

    monkeypatch.setattr(sglang_vs_local, "sglang_python", lambda: None)
    res = sglang_vs_local.run(tmp_path, repeats=1)
    _check_schema(tmp_path / "sglang_vs_local.json", "sglang_vs_local")
    assert "make sglang-env" in res["skipped"]


def test_plots_from_jsons(tmp_path, megatron_world):
    from erpd_megatron.bench import logprob_throughput, plots

    logprob_throughput.run(tmp_path, model=TINY, batch_size=2, seq_len=8, warmup=0, repeats=1, steps=1)
    paths = plots.all_plots(tmp_path)
    assert [p.name for p in paths] == ["throughput.png"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("temperature,entropy", [(1.0, False), (0.7, True)])
def test_single_rank_logprob_fast_path_without_padding(temperature, entropy):
    """The TP=1 fast path added for benchmark 2 returns its softmax buffer as the gradient when there is
    one chunk and no vocabulary padding; check that branch against a float64 reference."""
    from erpd_megatron.megatron.logprobs import vocab_parallel_logprobs

    torch.manual_seed(3)
    logits = (torch.randn(5, 7, 32) * 3).requires_grad_()
    targets = torch.randint(0, 32, (5, 7))
    w1, w2 = torch.randn(5, 7), torch.randn(5, 7)
    lp, ent = vocab_parallel_logprobs(logits, targets, vocab_size=32, temperature=temperature, with_entropy=entropy)
    loss = (lp * w1).sum() + ((ent * w2).sum() if entropy else 0.0)
    (g,) = torch.autograd.grad(loss, logits)
    ref = logits.detach().double().requires_grad_()
    logp = torch.log_softmax(ref / temperature, -1)
    r_lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    r_loss = (r_lp * w1.double()).sum()
    if entropy:
        r_ent = -(logp.exp() * logp).sum(-1)
        r_loss = r_loss + (r_ent * w2.double()).sum()
        assert torch.allclose(ent.double(), r_ent, atol=1e-5)
    (g_ref,) = torch.autograd.grad(r_loss, ref)
    assert torch.allclose(lp.double(), r_lp, atol=1e-5)
    assert torch.allclose(g.double(), g_ref, atol=1e-5)


def test_erpd_vs_onpolicy_minimal(tmp_path):
    """Two seeds of a tiny pipeline run (base = a 2-step warm-up, 4 prompts x 2 samples, 2 steps each)."""
    from erpd_megatron.bench import erpd_vs_onpolicy
    from erpd_megatron.toy.warmup import WarmupConfig, warmup

    base = tmp_path / "base"
    warmup(base, WarmupConfig(steps=2, batch_size=8, eval_prompts=4, eval_samples=1), log=lambda m: None)
    overrides = [f"model.base={base}", "model.micro_batch_size=8", "data.prompts_per_batch=4", "data.eval_prompts=4",
                 "rollout.n_samples=2", "rollout.max_new_tokens=8", "teachers.sapo.steps=2", "teachers.sapo.save_every=2",
                 "teachers.sapo.mini_batch_size=8", "teachers.rft.steps=2", "teachers.rft.save_every=2",
                 "teachers.rft.mini_batch_size=8", "students.s1_sapo.steps=2", "students.s1_sapo.mini_batch_size=8",
                 "onpolicy.prompts_per_step=2", "onpolicy.steps=4", "eval.k=1", "eval.every=2", "iterations=2"]
    try:
        res = erpd_vs_onpolicy.run(tmp_path / "out", seeds=(1, 2), overrides=overrides, work_dir=tmp_path / "work")
    finally:
        from erpd_megatron.megatron.parallel import destroy_parallel

        destroy_parallel()
    doc = _check_schema(tmp_path / "out" / "erpd_vs_onpolicy.json", "erpd_vs_onpolicy")
    assert doc["results"]["seeds"] == [1, 2] and len(doc["results"]["per_seed"]) == 2
    kinds = {n: m["kind"] for n, m in res["methods"].items()}
    assert kinds == {"sapo": "teacher", "rft": "rft", "s1_sapo": "erpd", "onpolicy_grpo": "onpolicy",
                     "sapo_promoted": "teacher_only"}
    for m in res["methods"].values():
        _check_spread(m["final_accuracy"])
        assert m["final_accuracy"]["n"] == 2
    # on-policy reaches its own final accuracy by definition; rollouts grow along its path
    assert res["methods"]["onpolicy_grpo"]["seeds_reaching_onpolicy_final"] == 2
    op = [c for c in res["curves"] if c["method"] == "onpolicy_grpo"][0]["points"]
    assert [p["rollouts"] for p in op] == [p["step"] * 2 * 2 for p in op] and op[-1]["rollouts"] == 16
    for c in res["curves"]:
        assert all(p["compute_s"] >= 0 for p in c["points"])
    # the ERPD chain over 2 batches: the second batch's points count 2 x 8 rollouts, steps run on (no repeated
    # step-0 point of the promoted policy), compute seconds grow along the chain; equal rollouts with on-policy
    erpd = [c for c in res["curves"] if c["method"] == "s1_sapo" and c["seed"] == 1][0]["points"]
    assert [(p["iteration"], p["step"], p["rollouts"]) for p in erpd] == [(0, 0, 8), (0, 2, 8), (1, 4, 16)]
    assert erpd[-1]["compute_s"] > erpd[1]["compute_s"] and erpd[-1]["rollouts"] == op[-1]["rollouts"]
    assert "s1_sapo" in res["paired_erpd_minus_onpolicy"] and "s1_sapo - rft" in res["paired_erpd_minus_rft"]
    # the teacher promoted itself (no distillation, paper Table 2 (a) / (b)): its own run, a chain of its own
    # checkpoints at the same rollouts; iteration 1 starts from the teacher's last checkpoint, not a student's
    import json

    solo = [c for c in res["curves"] if c["method"] == "sapo_promoted" and c["seed"] == 1][0]["points"]
    assert [(p["iteration"], p["step"], p["rollouts"]) for p in solo] == [(0, 0, 8), (0, 2, 8), (1, 4, 16)]
    promoted = json.loads((tmp_path / "work" / "seed_1_teacher_only" / "iter_0" / "promoted.json").read_text())
    assert promoted["teacher"] == "sapo" and promoted["step"] == 2 and promoted["checkpoint"].endswith("iter_0000002")
    assert not (tmp_path / "work" / "seed_1_teacher_only" / "ckpt" / "s1_sapo").exists()  # no student there
    assert "s1_sapo - sapo_promoted" in res["paired_erpd_minus_teacher_only"]


def test_erpd_vs_onpolicy_eval_points_kl_per_token(tmp_path):
    """Each eval point carries KL per response (the eval's) and per token = KL / mean response length."""
    import json

    from erpd_megatron.bench.erpd_vs_onpolicy import _eval_points

    d = tmp_path / "eval" / "s1"
    d.mkdir(parents=True)
    (d / "step_000004.json").write_text(json.dumps({"step": 4, "avg_at_k": 0.5, "kl": 2.0, "mean_length": 20.0}))
    (d / "step_000008.json").write_text(json.dumps({"step": 8, "avg_at_k": 0.6, "kl": None, "mean_length": 20.0}))
    pts = _eval_points(tmp_path, "s1")
    assert pts[0]["kl"] == 2.0 and pts[0]["kl_token"] == pytest.approx(0.1) and pts[1]["kl_token"] is None


def test_erpd_vs_onpolicy_merge_recomputes_the_aggregate(tmp_path):
    """Seeds run as separate processes merge into one JSON whose aggregate is that of all their seeds; parts of
    different presets / overrides, or a seed twice, are refused. Synthetic per-seed numbers: no pipeline run."""
    from erpd_megatron.bench import erpd_vs_onpolicy as b
    from erpd_megatron.bench.common import Recorder

    def part(name, seeds, overrides=()):
        per_seed = []
        for s in seeds:
            curves = {"s1": {"kind": "erpd", "points": [{"step": 2, "accuracy": 0.4 + 0.01 * s, "kl": 0.5,
                                                         "rollouts": 16, "compute_s": 1.0}]},
                      "onpolicy_grpo": {"kind": "onpolicy", "points": [{"step": 2, "accuracy": 0.4, "kl": 1.0,
                                                                        "rollouts": 16, "compute_s": 1.0}]}}
            methods = {n: {"kind": c["kind"], "final_accuracy": c["points"][-1]["accuracy"], "final_kl":
                           c["points"][-1]["kl"], "final_kl_token": None, "best_accuracy": None, "gain_over_base": None,
                           "gain_per_1k_rollouts": None, "gain_per_unit_kl": None, "compute_s_to_onpolicy_final": None,
                           "compute_s_total": 1.0, "reaches_onpolicy_final": True, "rollouts_to_onpolicy_final": 16}
                       for n, c in curves.items()}
            per_seed.append({"seed": s, "base_accuracy": 0.3, "onpolicy_improved_over_base": True, "methods": methods,
                             "curves": curves})
        Recorder("erpd_vs_onpolicy_bench_long", {"preset": "p.yaml", "overrides": list(overrides), "seeds": seeds}
                 ).write(b._results(per_seed, 0.0), tmp_path / name)
        return tmp_path / name / "erpd_vs_onpolicy_bench_long.json"

    res = b.merge([part("a", [2]), part("b", [3, 4])], tmp_path / "out", log=lambda m: None)
    doc = _check_schema(tmp_path / "out" / "erpd_vs_onpolicy_bench_long.json", "erpd_vs_onpolicy_bench_long")
    assert doc["config"]["seeds"] == [2, 3, 4] and [p["seeds"] for p in doc["config"]["merged_from"]] == [[2], [3, 4]]
    assert res["methods"]["s1"]["final_accuracy"] == pytest.approx({"median": 0.43, "min": 0.42, "max": 0.44, "n": 3})
    assert res["paired_erpd_minus_onpolicy"]["s1"]["kl_ratio_vs_onpolicy"]["median"] == 0.5
    assert {(c["seed"], c["method"]) for c in res["curves"]} == {(s, m) for s in (2, 3, 4) for m in ("s1", "onpolicy_grpo")}
    with pytest.raises(ValueError, match="differ"):
        b.merge([part("a", [2]), part("c", [5], ["x=1"])], tmp_path / "out2")
    with pytest.raises(ValueError, match="twice"):
        b.merge([part("a", [2]), part("d", [2])], tmp_path / "out3")
