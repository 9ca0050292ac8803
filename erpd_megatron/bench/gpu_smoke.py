"""Smoke test of one GPU (H100 / H200): torch + megatron-core, plus Transformer Engine's checks when TE is installed.

Run it through `scripts/gpu_smoke.sh`; it writes one JSON (`$OUT/gpu_smoke.json`) and exits 0 when every check
passed (checks that need TE are listed under "skipped" without it), 1 when one failed, 0 with status "skipped"
when there is no CUDA device. Checks, in order:

1. nccl: a world of one over NCCL (init_parallel), one all_reduce on the GPU.
2. logprobs: PolicyEngine (local spec, bf16) log-probs of a right-padded batch against a CPU fp32 reference,
   transformers' Qwen3ForCausalLM with the very same weights (exported through rollout.weight_sync).
3. train_step: the same loss (masked policy-gradient surrogate) on both: loss difference, and the Megatron
   gradients (fp32 main_grad, mapped to HF names by checkpoints_conv.maps) against the reference's, per tensor
   (cosine similarity) and overall (relative error); then one optimizer step that must update the weights.
4. weight_sync: sync_weights into a LocalEngine on the GPU (bf16): every HF tensor equal to the exported one
   bit for bit, and its log-probs against Megatron's.
5-8. what breaks only with Transformer Engine installed (bench/gpu_smoke_te.py; 7 and 8 need TE and are listed
   as skipped, not failed, without it; 5 and 6 then run on torch Adam): 5. optimizer_resume, a resume that loads
   FusedAdam's state continues like the uninterrupted engine; 6. reuse_vs_fresh, a reset engine equals a fresh
   build; 7. fp8_pipeline, model.fp8 through the pipeline's own build (Context.new_policy), a train step at an odd
   length; 8. sp_fp8_rows, the rows one TP rank holds under SP + FP8 at odd lengths through TE's FP8 GEMM.
9. mfu: gpu_backend_check's local-spec variant on the Qwen3-1.7B shape (seq 4096): train / log-prob tokens/s,
   model TFLOP/s, MFU against 989 TFLOP/s dense bf16 (H100 SXM; H200 has the same), peak memory.

Thresholds are for bf16 against fp32 on a small random model (noted per check in the JSON); they catch wrong
layouts, wrong masks and broken kernels (errors of O(1)), not bf16 rounding.
`SMOKE_CPU=1` runs checks 2-6 and 9 on the CPU in fp32 at toy size over gloo (7 and 8 are skipped: no TE).
Environment: SMOKE_MFU=0 skips check 9, SMOKE_TE=0 checks 5-8; SEQ / STEPS as in gpu_backend_check.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import torch

# Small random Qwen3 for checks 2-4 (untied, vocabulary padding exercised: 1000 -> 1024 rows). init_std 0.05, not
# 0.02: at 0.02 the random model's distributions are so flat that a wrong tensor moves log-probs by less than
# bf16 noise (measured on CPU: a 3x down_proj moved the mean |diff| by 0.014); at 0.05 it moves it by 0.12.
SMOKE_MODEL = dict(family="qwen3", vocab_size=1000, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
                   head_dim=32, ffn_hidden_size=512, tie_embeddings=False, init_std=0.05)
# bf16 against fp32 at this size, measured on CPU bf16 (no GPU yet): log-prob mean |diff| 0.008, max 0.034, loss
# 5e-4, gradient cosine >= 0.9996 per tensor, relative error 0.019. Thresholds leave ~3-4x room for GPU kernels.
TOL = {"logprob_mean_abs": 0.03, "logprob_max_abs": 0.3, "loss_abs": 0.02, "grad_cos_min": 0.98,
       "grad_rel_err": 0.1, "sync_logprob_max_abs": 0.3}


def _batch(cfg, device, B: int = 4, T: int = 48, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    am = torch.ones_like(ids)
    for r in range(1, B):  # right padding of different lengths
        am[r, T - 5 * r:] = 0
    ids = ids * am
    resp = am.clone()
    resp[:, : T // 4] = 0
    adv = torch.randn(B, 1, generator=g).expand(B, T).contiguous()
    return {k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=am, response_mask=resp, adv=adv).items()}


def loss_fn(lp, mb, ent):
    m = mb["response_mask"].float()
    return -(lp * m * mb["adv"]).sum() / m.sum().clamp(min=1), {}


def hf_logprobs(model, batch) -> torch.Tensor:
    """Token log-probs [B, T] in the engine's layout (0 at position 0 and at padding) from an HF causal LM."""
    ids, am = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=am).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.cat([lp.new_zeros(lp.shape[0], 1), lp], 1) * am


def _hf_model(cfg, device, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    d = dict(cfg.to_hf())
    hf_cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    hf_cfg._attn_implementation = "sdpa"
    with torch.device(device):
        return AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)


def _exported(eng) -> dict[str, torch.Tensor]:
    from erpd_megatron.rollout.weight_sync import iter_hf_buckets

    return {n: t.detach().clone() for b in iter_hf_buckets(eng, receivers="all", copy=True) for n, t in b}


def check_nccl(cuda: bool) -> dict:
    import torch.distributed as dist

    x = torch.ones(4, device="cuda" if cuda else "cpu")
    dist.all_reduce(x)
    backend = dist.get_backend()
    ok = float(x.sum()) == 4.0 and (backend == "nccl" or not cuda)
    return {"pass": ok, "backend": backend, "world_size": dist.get_world_size(),
            "nccl_version": _nccl_version() if cuda else None}


def _nccl_version() -> str | None:
    try:  # a tuple in recent torch, an int in older ones: informational only, never a failure
        v = torch.cuda.nccl.version()
        return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception:  # noqa: BLE001
        return None


def check_logprobs_and_train(eng, ref, batch) -> tuple[dict, dict]:
    from checkpoints_conv import maps

    cpu = {k: v.cpu() for k, v in batch.items()}
    am = cpu["attention_mask"].float()
    lp_meg = eng.forward_logprobs(batch).float().cpu()
    with torch.no_grad():
        lp_ref = hf_logprobs(ref, cpu)
    diff = (lp_meg - lp_ref).abs() * am
    lp_res = {"mean_abs": float(diff.sum() / am.sum()), "max_abs": float(diff.max()),
              "ref_mean_logprob": float((lp_ref * am).sum() / am.sum()),
              "tolerance": {"mean_abs": TOL["logprob_mean_abs"], "max_abs": TOL["logprob_max_abs"]}}
    lp_res["pass"] = lp_res["mean_abs"] < TOL["logprob_mean_abs"] and lp_res["max_abs"] < TOL["logprob_max_abs"]

    metrics = eng.forward_backward(batch, loss_fn)  # gradients only (no step): compare them first
    ref.zero_grad(set_to_none=True)
    ref_loss, _ = loss_fn(hf_logprobs(ref, cpu), cpu, None)
    ref_loss.backward()
    ref_grads = dict(ref.named_parameters())
    cos, num, den = {}, 0.0, 0.0
    for name, p in eng.named_parameters_global():
        g = getattr(p, "main_grad", None)
        g = (g if g is not None else p.grad).detach().float().cpu()
        for hf_name, hg in maps.mcore_to_hf(eng.model_cfg, name, g):
            rg = ref_grads[hf_name].grad.float()
            cos[hf_name] = float(torch.nn.functional.cosine_similarity(hg.flatten(), rg.flatten(), dim=0))
            num += float((hg - rg).pow(2).sum())
            den += float(rg.pow(2).sum())
    before = {n: p.detach().float().clone() for n, p in eng.named_parameters_global()}
    step = eng.train_step(batch, loss_fn)
    moved = max(float((p.detach().float() - before[n]).abs().max()) for n, p in eng.named_parameters_global())
    worst = min(cos, key=cos.get)
    ref_loss = float(ref_loss.detach())
    tr = {"loss": metrics["loss"], "ref_loss": ref_loss, "loss_abs_diff": abs(metrics["loss"] - ref_loss),
          "grad_cos_min": cos[worst], "grad_cos_min_tensor": worst, "grad_rel_err": (num / max(den, 1e-30)) ** 0.5,
          "grad_norm": step.get("train/grad_norm"), "update_ok": step.get("train/update_ok"), "max_param_change": moved,
          "tolerance": {"loss_abs": TOL["loss_abs"], "grad_cos_min": TOL["grad_cos_min"],
                        "grad_rel_err": TOL["grad_rel_err"]}}
    tr["pass"] = (tr["loss_abs_diff"] < TOL["loss_abs"] and tr["grad_cos_min"] > TOL["grad_cos_min"]
                  and tr["grad_rel_err"] < TOL["grad_rel_err"] and tr["update_ok"] == 1.0 and moved > 0)
    return lp_res, tr


def check_weight_sync(eng, batch, device, dtype) -> dict:
    from erpd_megatron.rollout.local_engine import LocalEngine
    from erpd_megatron.rollout.weight_sync import sync_weights

    engine = LocalEngine(_hf_model(eng.model_cfg, device, dtype), eos_token_ids=[0], device=device)
    stats = sync_weights(eng, engine, version=1)
    want = _exported(eng)
    got = engine.model.state_dict()
    unequal = [n for n, t in want.items() if not torch.equal(got[n], t.to(got[n].dtype))]
    with torch.no_grad():
        lp_engine = hf_logprobs(engine.model, batch).float()
    lp_meg = eng.forward_logprobs(batch).float()
    am = batch["attention_mask"].float()
    max_abs = float(((lp_engine - lp_meg).abs() * am).max())
    res = {"tensors": len(want), "unequal_tensors": unequal[:5], "n_unequal": len(unequal),
           "logprob_max_abs_vs_megatron": max_abs, "seconds": stats["weight_sync/seconds"],
           "bytes": stats["weight_sync/bytes"], "device": str(engine.device), "weight_version": engine.weight_version,
           "tolerance": {"logprob_max_abs": TOL["sync_logprob_max_abs"]}}
    res["pass"] = not unequal and max_abs < TOL["sync_logprob_max_abs"] and engine.weight_version == 1
    return res


def check_mfu(small: bool) -> dict:
    from erpd_megatron.bench import gpu_backend_check as gbc

    cfg = gbc.model_config(small)
    seq = int(os.environ.get("SEQ", 128 if small else 4096))
    steps = int(os.environ.get("STEPS", 2 if small else 3))
    res = gbc.run_variant("local", "local", None, cfg, seq, mbs=1, micro=2, steps=steps)
    res.update(shape="qwen3-1.7b" if not small else "toy", seq=seq, peak_tflops=gbc.PEAK_TFLOPS)
    res["pass"] = all(res[m]["tokens_per_s"] > 0 for m in ("train", "logprob"))
    return res


def _env(cuda: bool) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def v(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "cuda": torch.version.cuda, "megatron_core": v("megatron-core"), "transformers": v("transformers"),
            "transformer_engine": v("transformer-engine") or v("transformer_engine"), "apex": v("apex"),
            "sglang": v("sglang"), "python": sys.version.split()[0]}


def run(out_path: str | None = None) -> dict:
    cpu_mode = os.environ.get("SMOKE_CPU") == "1"
    cuda = torch.cuda.is_available() and not cpu_mode
    t_start = time.time()
    doc: dict = {"benchmark": "gpu_smoke", "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if not cuda and not cpu_mode:
        doc.update(status="skipped", reason="no CUDA device (set SMOKE_CPU=1 to check the script on the CPU)",
                   env=_env(False))
        _write(doc, out_path)
        print("gpu_smoke: no CUDA: nothing checked", flush=True)
        return doc
    from erpd_megatron.megatron.engine import OptimConfig, PolicyEngine
    from erpd_megatron.megatron.model import BuildOptions, ModelConfig
    from erpd_megatron.megatron.parallel import ParallelConfig, destroy_parallel, init_parallel

    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    doc.update(env=_env(cuda), mode="gpu" if cuda else "cpu (SMOKE_CPU=1)", checks={}, seconds={})
    checks, secs = doc["checks"], doc["seconds"]

    def timed(name, fn, *a):
        t0 = time.time()
        try:
            return fn(*a)
        except Exception as e:  # noqa: BLE001 - a failed check is a result, the others still run
            checks[name] = {"pass": False, "error": f"{type(e).__name__}: {str(e)[:800]}",
                            "traceback": traceback.format_exc()[-2000:]}
            return None
        finally:
            secs[name] = round(time.time() - t0, 2)

    if cuda:
        torch.cuda.set_device(0)
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    r = timed("nccl", lambda: (init_parallel(ParallelConfig(), seed=0), check_nccl(cuda))[1])
    if r is not None:
        checks["nccl"] = r
    cfg = ModelConfig(**SMOKE_MODEL)
    # one micro-batch: megatron's loss is then the full-batch masked mean, as the reference's
    eng = timed("build", lambda: PolicyEngine(cfg, ParallelConfig(), OptimConfig(lr=1e-4, micro_batch_size=4),
                                              BuildOptions(spec="local", dtype=dtype), seed=0))
    if eng is not None:
        batch = _batch(cfg, device)
        ref = timed("reference", lambda: _load_reference(eng, cfg))
        if ref is not None:
            pair = timed("train_step", check_logprobs_and_train, eng, ref, batch)
            if pair is not None:
                checks["logprobs"], checks["train_step"] = pair
        r = timed("weight_sync", check_weight_sync, eng, batch, device, dtype)
        if r is not None:
            checks["weight_sync"] = r
        del eng
    if os.environ.get("SMOKE_TE", "1") != "0":  # 5-8: what breaks only with Transformer Engine (gpu_smoke_te.py)
        import shutil
        import tempfile

        from erpd_megatron.bench.gpu_smoke_te import run_checks

        tmp = tempfile.mkdtemp(prefix="gpu_smoke_ckpt_")
        try:
            run_checks(cfg, device, dtype, timed, checks, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if os.environ.get("SMOKE_MFU", "1") != "0":
        r = timed("mfu", check_mfu, not cuda)
        if r is not None:
            checks["mfu"] = r
    destroy_parallel()
    secs["total"] = round(time.time() - t_start, 1)
    ran = {k: c for k, c in checks.items() if not c.get("skipped")}  # a skipped check (no TE) is neither
    doc["status"] = "ok" if ran and all(c.get("pass") for c in ran.values()) else "fail"
    doc["failed"] = sorted(k for k, c in ran.items() if not c.get("pass"))
    doc["skipped"] = {k: c["skipped"] for k, c in checks.items() if c.get("skipped")}
    _write(doc, out_path)
    print("gpu_smoke:", doc["status"], json.dumps({k: c.get("pass") for k, c in checks.items()}),
          f"{secs['total']} s", flush=True)
    return doc


def _load_reference(eng, cfg):
    """transformers Qwen3 on the CPU in fp32 with the engine's weights (the exported HF tensors)."""
    ref = _hf_model(cfg, "cpu", torch.float32)
    sd = ref.state_dict()
    for n, t in _exported(eng).items():
        sd[n].copy_(t.float().cpu())
    return ref.train()


def _write(doc: dict, out_path: str | None) -> None:
    path = out_path or os.path.join(os.environ.get("OUT") or ".", "gpu_smoke.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    print("gpu_smoke: wrote", path, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    doc = run(argv[0] if argv else None)
    return 0 if doc["status"] in ("ok", "skipped") else 1


if __name__ == "__main__":
    sys.exit(main())
