"""HF <-> Megatron converters and the Qwen3.5 modules, on tiny random models built from configs.

References are independent of the code under test: transformers' own models (logits), the input
safetensors files (bit-identity), a step-by-step float64 recurrence (gated delta rule), explicit
per-rank constructions (TP layouts). Multi-process checks share spawned worlds: a world of 1 does
every import/export, a world of 2 runs (TP,PP) = (1,1)[DP=2], (2,1), (1,2) and the training-step check,
a world of 4 runs (2,2).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed
from safetensors.torch import load_file, save_file

from checkpoints_conv import layouts, maps
from checkpoints_conv.config import ConvConfig, ConversionError

torch.set_num_threads(1)
TOL = 1e-4
FAMILIES = ("qwen3", "llama", "qwen35")
SMALL = dict(vocab_size=250, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, initializer_range=0.08)  # vocab 250: padding is exercised
LINEAR = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
              layer_types=["linear_attention"] * 3 + ["full_attention"])
ROPE35 = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25, "mrope_section": [1, 1, 0]}


# ----------------------------------------------------------------------------- tiny HF checkpoints
def _perturb_norms(model):
    # HF initialises norms to 0 / 1 and dt_bias to 1: perturb them so a wrong (1 + w) or w - 1 shows up.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or "A_log" in n or "dt_bias" in n:
                p.add_(torch.randn_like(p) * 0.2)


def make_hf(family: str, path: Path) -> Path:
    import transformers as tf

    torch.manual_seed({"qwen3": 1, "llama": 2, "qwen35": 3, "qwen35vl": 4}[family])
    if family == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**SMALL, tie_word_embeddings=False))
    elif family == "llama":  # tied embeddings (Llama-3.2 style)
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL, tie_word_embeddings=True))
    elif family == "qwen35":
        model = tf.Qwen3_5ForCausalLM(tf.Qwen3_5TextConfig(**SMALL, **LINEAR, rope_parameters=ROPE35,
                                                           tie_word_embeddings=False))
    else:  # released layout: model.language_model.*, model.visual.*, plus mtp.* the HF class does not load
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16)
        text = dict(**SMALL, **LINEAR, rope_parameters=ROPE35)
        model = tf.Qwen3_5ForConditionalGeneration(tf.Qwen3_5Config(text_config=text, vision_config=vision))
    _perturb_norms(model)
    if family == "qwen35vl":
        model = model.to(torch.bfloat16)
    model.save_pretrained(path)
    if family == "qwen35vl":  # mixed dtypes (fp32 A_log in a bf16 checkpoint) and MTP weights
        sd = load_file(path / "model.safetensors")
        for k in [k for k in sd if k.endswith("A_log")]:
            sd[k] = torch.randn(sd[k].shape, dtype=torch.float32)
        sd["mtp.fc.weight"] = torch.randn(64, 128, dtype=torch.bfloat16)
        sd["mtp.norm.weight"] = torch.randn(64, dtype=torch.bfloat16)
        sd["mtp.layers.0.self_attn.q_proj.weight"] = torch.randn(128, 64, dtype=torch.bfloat16)
        save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {f: str(make_hf(f, root / f)) for f in (*FAMILIES, "qwen35vl")}


# ----------------------------------------------------------------------------- pure functions
def test_gated_delta_rule_chunked_equals_recurrent_and_transformers():
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule

    from erpd_megatron.models.qwen35.gated_delta_rule import chunk_gated_delta_rule, recurrent_gated_delta_rule

    g = torch.Generator().manual_seed(0)
    b, t, h, dk, dv = 2, 45, 3, 8, 6  # 45 = 2 full chunks of 16 + a partial one

    def l2(x):
        return x / x.norm(dim=-1, keepdim=True)

    q, k = l2(torch.randn(b, t, h, dk, generator=g)), l2(torch.randn(b, t, h, dk, generator=g))
    v = torch.randn(b, t, h, dv, generator=g)
    gate = -torch.rand(b, t, h, generator=g) * 3
    beta = torch.rand(b, t, h, generator=g)

    # float64 reference written from the recurrence S_t = e^g (I - b k k^T) S + b k v^T, o = S^T q / sqrt(dk)
    ref = torch.zeros(b, t, h, dv, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            s = torch.zeros(dk, dv, dtype=torch.float64)
            for ti in range(t):
                kk, vv, qq = k[bi, ti, hi].double(), v[bi, ti, hi].double(), q[bi, ti, hi].double()
                bb = beta[bi, ti, hi].double()
                s = gate[bi, ti, hi].double().exp() * (s - bb * torch.outer(kk, kk @ s)) + bb * torch.outer(kk, vv)
                ref[bi, ti, hi] = s.T @ qq / dk**0.5
    chunked = chunk_gated_delta_rule(q, k, v, gate, beta, chunk_size=16)
    recurrent = recurrent_gated_delta_rule(q, k, v, gate, beta)
    hf, _ = torch_chunk_gated_delta_rule(q, k, v, gate, beta)
    assert (chunked.double() - ref).abs().max() < 1e-5
    assert (recurrent.double() - ref).abs().max() < 1e-5
    assert (hf.double() - ref).abs().max() < 1e-5


def test_qkv_layouts_against_explicit_construction():
    heads, groups, d, hid = 6, 2, 3, 5
    q = torch.randn(heads * 2 * d, hid)  # gated: per head [query, gate]
    k, v = torch.randn(groups * d, hid), torch.randn(groups * d, hid)
    rows = []
    for gi in range(groups):  # Megatron: per group [q heads, gate heads, k, v]
        hs = range(gi * 3, gi * 3 + 3)
        rows += [q[h * 2 * d: h * 2 * d + d] for h in hs] + [q[h * 2 * d + d: (h + 1) * 2 * d] for h in hs]
        rows += [k[gi * d:(gi + 1) * d], v[gi * d:(gi + 1) * d]]
    fused = layouts.merge_qkv(q, k, v, heads, groups, d, gated=True)
    assert torch.equal(fused, torch.cat(rows))
    assert all(torch.equal(a, b) for a, b in zip(layouts.split_qkv(fused, heads, groups, d, gated=True), (q, k, v)))


def test_gdn_in_proj_per_rank_layout():
    cfg = ConvConfig.from_hf({"architectures": ["Qwen3_5ForCausalLM"], **SMALL, **LINEAR})
    kd, vd, hv = 2 * 16, 4 * 16, 4
    full = torch.randn(2 * kd + 2 * vd + 2 * hv, 64)
    qs, ks, vs, zs, bs, as_ = torch.split(full, [kd, kd, vd, vd, hv, hv])
    for rank in range(2):  # rank r: [Q_r, K_r, V_r, Z_r, B_r, A_r], each the r-th half of its section
        want = torch.cat([x.chunk(2)[rank] for x in (qs, ks, vs, zs, bs, as_)])
        got = maps.shard_param(cfg, "decoder.layers.0.self_attention.in_proj.weight", full, 2, rank)
        assert torch.equal(got, want)
    shards = [maps.shard_param(cfg, "decoder.layers.0.mlp.linear_fc1.weight", torch.randn(256, 64), 4, r)
              for r in range(4)]
    assert torch.equal(maps.unshard_param(cfg, "decoder.layers.0.mlp.linear_fc1.weight", shards)[:32], shards[0][:32])


# ----------------------------------------------------------------------------- errors (no megatron world)
def _copy(src, dst) -> Path:
    shutil.copytree(src, dst)
    return Path(dst)


def _import_error(hf, out, **kw) -> str:
    from checkpoints_conv.convert import import_hf

    with pytest.raises(ConversionError) as e:
        import_hf(str(hf), str(out), **kw)
    assert not Path(out).exists() and not list(Path(out).parent.glob(f".{Path(out).name}.incomplete*"))
    return str(e.value)


def test_errors_are_named_and_nothing_is_written(hf_dirs, tmp_path):
    from checkpoints_conv.__main__ import main

    d = _copy(hf_dirs["qwen3"], tmp_path / "arch")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["MistralForCausalLM"],
                                               "model_type": "mistral"}))
    assert "MistralForCausalLM" in _import_error(d, tmp_path / "o1")
    assert main(["import", "--hf", str(d), "--out", str(tmp_path / "o1b")]) == 2

    assert "TP=3 does not divide num_attention_heads=4" in _import_error(hf_dirs["qwen3"], tmp_path / "o2", tp=3)

    d = _copy(hf_dirs["qwen3"], tmp_path / "trunc")
    f = d / "model.safetensors"
    os.truncate(f, f.stat().st_size - 100)
    assert "truncated" in _import_error(d, tmp_path / "o3") and "model.safetensors" in _import_error(d, tmp_path / "o3")

    d = _copy(hf_dirs["qwen3"], tmp_path / "mismatch")
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    msg = _import_error(d, tmp_path / "o4")
    assert "config/weights mismatch" in msg and "mlp" in msg

    d = _copy(hf_dirs["qwen3"], tmp_path / "extra")
    sd = load_file(d / "model.safetensors")
    sd["model.layers.0.self_attn.mystery.weight"] = torch.zeros(2)
    del sd["model.layers.3.mlp.up_proj.weight"]
    save_file(sd, d / "model.safetensors")
    assert "model.layers.3.mlp.up_proj.weight" in _import_error(d, tmp_path / "o5")  # missing first
    sd["model.layers.3.mlp.up_proj.weight"] = torch.zeros(128, 64)
    save_file(sd, d / "model.safetensors")
    assert "mystery" in _import_error(d, tmp_path / "o6")


# ----------------------------------------------------------------------------- world of 1: import / export
def _convert_world(rank, hf_dirs, out):
    from checkpoints_conv import convert
    from checkpoints_conv.hf_io import HFCheckpoint

    mc, report = {}, {}
    for fam, src in hf_dirs.items():
        mc[fam] = f"{out}/{fam}-mcore"
        convert.import_hf(src, mc[fam], tp=2, pp=1)
        convert.export_mcore(mc[fam], f"{out}/{fam}-back", max_shard_bytes=200_000)  # several shards
        with HFCheckpoint(src) as a, HFCheckpoint(f"{out}/{fam}-back") as b:
            names_equal = sorted(a.names()) == sorted(b.names())
            diff = [n for n in a.names() if n not in b.meta or a.get(n).dtype != b.get(n).dtype
                    or not torch.equal(a.get(n), b.get(n))]
            report[fam] = {"names_equal": names_equal, "diff": diff, "shards": len(set(v[0] for v in b.meta.values()))}
    convert.export_mcore(mc["qwen35vl"], f"{out}/qwen35vl-nomtp", drop_mtp=True)  # test_export_can_drop_...
    # an exception in the middle of writing leaves neither the output nor a temporary directory behind
    calls = {"n": 0}
    real_get = HFCheckpoint.get

    def failing_get(self, name):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError("disk vanished")
        return real_get(self, name)

    HFCheckpoint.get = failing_get
    try:
        convert.import_hf(hf_dirs["qwen3"], f"{out}/crash")
        report["crash"] = "no error"
    except BaseException:  # DCP re-raises it wrapped in CheckpointException (a BaseException)
        report["crash"] = sorted(p.name for p in Path(out).iterdir() if "crash" in p.name)
    finally:
        HFCheckpoint.get = real_get
    return mc, report


@pytest.fixture(scope="module")
def converted(hf_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv")
    mc, report = run_distributed(_convert_world, 1, args=(hf_dirs, str(out)), timeout=600, init_pg=False)[0]
    return mc, report, out


def test_import_export_bit_identical(converted, hf_dirs):
    import transformers as tf

    _, report, out = converted
    assert report["crash"] == []
    for fam in (*FAMILIES, "qwen35vl"):
        assert report[fam]["names_equal"] and report[fam]["diff"] == [], (fam, report[fam])
        assert report[fam]["shards"] > 1
    vl = Path(out) / "qwen35vl-back"
    assert json.loads((vl / "config.json").read_text())["architectures"] == ["Qwen3_5ForConditionalGeneration"]
    model = tf.Qwen3_5ForConditionalGeneration.from_pretrained(vl)  # the exported directory loads
    assert model.model.visual is not None


# ----------------------------------------------------------------------------- worlds of 2 and 4: logits
def _logits_world(rank, jobs, train_job):
    from checkpoints_conv.verify import verify_in_world

    out = {(fam, tp, pp): verify_in_world(hf, mc, tp, pp, dp, batch=2, seq_len=24) for fam, hf, mc, tp, pp, dp in jobs}
    if train_job:
        out["train"] = _train_then_export(rank, *train_job)
    return out


def _train_then_export(rank, hf_dir, mc_dir, out):
    """TP=2: load the import, one Adam step, save; export (world of 1) and compare transformers' logits."""
    import torch.distributed as dist

    from checkpoints_conv.verify import hf_logits, megatron_logits
    from erpd_megatron.megatron.checkpoint import load_model_weights, read_checkpoint_meta
    from erpd_megatron.megatron.engine import OptimConfig, PolicyEngine
    from erpd_megatron.megatron.model import ModelConfig
    from erpd_megatron.megatron.parallel import ParallelConfig, destroy_parallel, init_parallel

    cfg = ModelConfig.from_dict(read_checkpoint_meta(mc_dir)["model_cfg"])
    init_parallel(ParallelConfig(tp=2))  # the world was last set up for another layout
    engine = PolicyEngine(cfg, ParallelConfig(tp=2), OptimConfig(lr=3e-2, micro_batch_size=2))
    load_model_weights(engine.modules, mc_dir)
    tokens = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(5))
    before = megatron_logits(engine.modules, tokens, cfg.vocab_size)
    batch = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "response_mask": torch.ones_like(tokens)}

    def loss_fn(lp, mb, ent):
        m = mb["response_mask"][:, 1:].float()
        return -(lp[:, 1:] * m).sum() / m.sum(), {}

    engine.train_step(batch, loss_fn)
    after = megatron_logits(engine.modules, tokens, cfg.vocab_size)
    saved = engine.save(f"{out}/trained")
    destroy_parallel()
    if rank != 0:
        return None
    from checkpoints_conv import convert, mcore_io

    mcore_io.ensure_single_process()
    convert.export_mcore(saved, f"{out}/trained-hf", hf_template=f"{mc_dir}/iter_0000000/hf")
    exported = hf_logits(f"{out}/trained-hf", tokens)
    dist.destroy_process_group()
    return {"moved": (after - before).abs().max().item(), "diff": (exported - after).abs().max().item()}


def test_import_writes_checksums_and_export_refuses_an_altered_file(converted, tmp_path, capsys):
    import shutil

    from test_checkpoint_integrity import _alter_in_place, _largest_distcp

    from checkpoints_conv.__main__ import main

    mc, _, _ = converted
    it = Path(mc["qwen3"]) / "iter_0000000"
    marker = json.loads((it / "erpd_checkpoint.json").read_text())
    assert marker["format_version"] == 2 and "hf/config.json" in marker["files"]
    assert all(len(r["sha256"]) == 64 for r in marker["files"].values())
    bad = tmp_path / "bad"
    shutil.copytree(mc["qwen3"], bad)
    victim = _largest_distcp(bad / "iter_0000000")
    _alter_in_place(bad / "iter_0000000" / victim)  # 64 bytes, same size: loaded silently before
    assert main(["export", "--mcore", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert victim in err and "does not match its checksum" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_megatron_logits_equal_transformers_tp_pp(hf_dirs, converted, tmp_path):
    mc, _, _ = converted
    two = [(f, hf_dirs[f], mc[f], tp, pp, dp) for f in FAMILIES for tp, pp, dp in [(1, 1, 2), (2, 1, 1), (1, 2, 1)]]
    two.append(("qwen35vl", hf_dirs["qwen35vl"], mc["qwen35vl"], 2, 1, 1))  # model.language_model.* layout
    four = [(f, hf_dirs[f], mc[f], 2, 2, 1) for f in FAMILIES]
    two = run_distributed(_logits_world, 2, args=(two, (hf_dirs["qwen35"], mc["qwen35"], str(tmp_path))),
                          timeout=900, init_pg=False)[0]
    four = run_distributed(_logits_world, 4, args=(four, None), timeout=900, init_pg=False)[0]
    results = {**{k: v for k, v in two.items() if k != "train"}, **four}
    assert len(results) == 13
    for key, r in results.items():
        assert r["max_abs_logit_diff"] < TOL, (key, r)
        assert r["max_abs_logit"] > 0.1 and r["tokens"] == 48  # the comparison is not vacuous
    assert two["train"]["moved"] > 1e-2, two["train"]  # the step changed the model...
    assert two["train"]["diff"] < TOL, two["train"]  # ...and the exported HF model has exactly that change


@pytest.mark.parametrize("tp", [4, 8])
def test_qwen35_per_rank_layouts_at_tp4_and_tp8(tp):
    """Every Qwen3.5 tensor at TP 4 and 8 (no processes needed): shard -> unshard is the identity, the GDN
    in_proj / conv1d shards are [Q_r, K_r, V_r, (Z_r, B_r, A_r)] per rank, and each rank's fused QKV+gate rows
    are exactly its own query groups. Head counts follow the 27B's GDN (16 key / 48 value heads); the full
    attention has 16 heads / 8 KV groups (the 27B's 4 KV groups cannot be split 8 ways by megatron-core)."""
    hf = dict(vocab_size=250, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=16,
              num_key_value_heads=8, head_dim=4, linear_num_key_heads=16, linear_num_value_heads=48,
              linear_key_head_dim=2, linear_value_head_dim=2, linear_conv_kernel_dim=4,
              layer_types=["linear_attention"] * 3 + ["full_attention"])
    cfg = ConvConfig.from_hf({"architectures": ["Qwen3_5ForCausalLM"], **hf})
    cfg.check_tp(tp)
    g = torch.Generator().manual_seed(tp)
    for name in maps.mcore_names(cfg):
        full = torch.randn(maps.expected_shape(cfg, name), generator=g)
        shards = [maps.shard_param(cfg, name, full, tp, r) for r in range(tp)]
        assert torch.equal(maps.unshard_param(cfg, name, shards), full), name
        kind, sections = maps.tp_kind(cfg, name)
        if sections is not None:  # per-rank fused layout: the r-th slice of every section, in order
            parts = torch.split(full, sections)
            for r, shard in enumerate(shards):
                assert torch.equal(shard, torch.cat([p.chunk(tp)[r] for p in parts])), (name, r)
        if name.endswith("self_attention.linear_qkv.weight"):  # 16 heads / 8 groups: 2 groups per rank
            per_group = full.shape[0] // 8
            for r, shard in enumerate(shards):
                assert torch.equal(shard, full[r * per_group * 8 // tp: (r + 1) * per_group * 8 // tp]), r


def test_qwen35_27b_heads_at_tp8_fewer_kv_groups_than_ranks():
    """Qwen3.5-27B head counts at TP=8: 24 heads / 4 KV groups (fewer groups than ranks), GDN 16 key / 48 value
    heads. megatron-core 0.19.2 (transformer/attention.py, get_query_key_value_tensors) splits linear_qkv rows
    evenly over the ranks, all-gathers them, keeps query group r // (tp / groups) and the (r % (tp / groups))-th
    share of that group's query (and gate) heads. Replaying those steps on maps.shard_param's shards must give rank
    r exactly HF query / gate heads [3r, 3r + 3) and K/V head r // 2, matching its linear_proj columns. The
    trainer, the planner and the converter accept the layout."""
    from erpd_megatron.megatron.model import ModelConfig
    from erpd_megatron.megatron.parallel import ParallelConfig, validate_layout
    from erpd_megatron.model_shapes import MODELS
    from erpd_megatron.planner import Layout, plan

    tp, nh, ng, d, h = 8, 24, 4, 2, 16
    hf = dict(model_type="qwen3_5_text", vocab_size=250, hidden_size=h, intermediate_size=64, num_hidden_layers=4,
              num_attention_heads=nh, num_key_value_heads=ng, head_dim=d, linear_num_key_heads=16,
              linear_num_value_heads=48, linear_key_head_dim=2, linear_value_head_dim=2, linear_conv_kernel_dim=4,
              layer_types=["linear_attention"] * 3 + ["full_attention"])
    cfg = ConvConfig.from_hf({"architectures": ["Qwen3_5ForCausalLM"], **hf})
    cfg.check_tp(tp)
    validate_layout(ModelConfig.from_hf(hf), ParallelConfig(tp=tp), tp)
    real = MODELS["qwen3.5-27b"]["text_config"]
    assert (real["num_attention_heads"], real["num_key_value_heads"]) == (nh, ng)
    assert (real["linear_num_key_heads"], real["linear_num_value_heads"]) == (16, 48)
    assert not any("KV groups" in r or "heads" in r for r in plan(MODELS["qwen3.5-27b"], Layout(tp=tp)).reasons)

    # every row labelled by (tensor, row): q_proj rows per head are [query (d), gate (d)]
    q = torch.arange(nh * 2 * d).unsqueeze(1).expand(-1, h).float()
    k = 1000 + torch.arange(ng * d).unsqueeze(1).expand(-1, h).float()
    v = 2000 + torch.arange(ng * d).unsqueeze(1).expand(-1, h).float()
    name = "decoder.layers.3.self_attention.linear_qkv.weight"
    full = maps.to_mcore(cfg, name, maps.entry(cfg, name)[0], [q, k, v])
    shards = [maps.shard_param(cfg, name, full, tp, r) for r in range(tp)]
    assert torch.equal(maps.unshard_param(cfg, name, shards), full)
    gathered = torch.cat(shards)  # the all-gather of the rank outputs' last dim = these rows
    per, share = nh // ng, tp // ng
    for r in range(tp):
        size = gathered.shape[0] // ng
        grp = gathered[(r // share) * size:(r // share + 1) * size]
        query, gate, key, value = torch.split(grp, [per * d, per * d, d, d])
        mine = slice((r % share) * per // share, (r % share + 1) * per // share)
        heads = range(r * nh // tp, (r + 1) * nh // tp)
        assert torch.equal(query.view(per, d, h)[mine].reshape(-1, h),
                           torch.cat([q[j * 2 * d: j * 2 * d + d] for j in heads])), r
        assert torch.equal(gate.view(per, d, h)[mine].reshape(-1, h),
                           torch.cat([q[j * 2 * d + d: (j + 1) * 2 * d] for j in heads])), r
        assert torch.equal(key, k[(r // share) * d:(r // share + 1) * d]), r
        assert torch.equal(value, v[(r // share) * d:(r // share + 1) * d]), r
    # linear_proj (row parallel): rank r's input columns are the outputs of its own heads
    o = torch.arange(nh * d).unsqueeze(0).expand(h, -1).float()
    o_name = "decoder.layers.3.self_attention.linear_proj.weight"
    for r in range(tp):
        cols = maps.shard_param(cfg, o_name, o, tp, r)[0]
        assert cols.tolist() == [float(c) for j in range(r * nh // tp, (r + 1) * nh // tp) for c in
                                 range(j * d, (j + 1) * d)]
    for n in maps.mcore_names(cfg):  # GDN and MLP tensors at TP=8: shard -> unshard is the identity
        t = torch.randn(maps.expected_shape(cfg, n))
        assert torch.equal(maps.unshard_param(cfg, n, [maps.shard_param(cfg, n, t, tp, r) for r in range(tp)]), t)


def test_malformed_index_json_is_a_conversion_error(hf_dirs, tmp_path):
    from checkpoints_conv.__main__ import main

    d = _copy(hf_dirs["qwen3"], tmp_path / "badindex")
    (d / "model.safetensors.index.json").write_text('{"weight_map": {"model.norm.weight": ')
    msg = _import_error(d, tmp_path / "o1")
    assert "model.safetensors.index.json" in msg and "not valid JSON" in msg
    assert main(["import", "--hf", str(d), "--out", str(tmp_path / "o2")]) == 2  # one line on stderr, exit 2


def test_model_config_layer_types_fall_back_like_the_converter():
    from erpd_megatron.megatron.model import ModelConfig

    hf = dict(model_type="qwen3_5_text", **{k: v for k, v in SMALL.items() if k != "initializer_range"},
              **{k: v for k, v in LINEAR.items() if k != "layer_types"}, full_attention_interval=2)
    hf["num_hidden_layers"] = 6
    conv = ConvConfig.from_hf({"architectures": ["Qwen3_5ForCausalLM"], **hf})
    assert list(conv.layer_types) == ["linear_attention", "full_attention"] * 3
    assert ModelConfig.from_hf(hf).hybrid.layer_types == list(conv.layer_types)


def test_export_can_drop_the_untrained_mtp_head(converted, hf_dirs):
    from checkpoints_conv.hf_io import HFCheckpoint

    _, _, root = converted
    out = Path(root) / "qwen35vl-nomtp"  # written by _convert_world with drop_mtp=True
    with HFCheckpoint(hf_dirs["qwen35vl"]) as src, HFCheckpoint(out) as got:
        assert any(n.startswith("mtp.") for n in src.names())
        assert sorted(got.names()) == sorted(n for n in src.names() if not n.startswith("mtp."))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["text_config"]["mtp_num_hidden_layers"] == 0


def test_verify_default_sequence_crosses_a_gdn_chunk():
    import inspect

    from checkpoints_conv import __main__ as cli
    from checkpoints_conv import verify

    assert verify.VERIFY_SEQ_LEN > 64  # chunk_gated_delta_rule's default chunk
    assert inspect.signature(verify.verify).parameters["seq_len"].default == verify.VERIFY_SEQ_LEN
    assert cli.VERIFY_SEQ_LEN == verify.VERIFY_SEQ_LEN
