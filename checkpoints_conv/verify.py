"""Run the HF model (transformers) and the Megatron model (erpd checkpoint, any TP/PP) on the same tokens.

`verify(hf_dir, mcore_dir, tp, pp)` spawns tp*pp gloo ranks (CPU) when needed and returns the result dict
(`max_abs_logit_diff`, `tokens`, ...); the CLI prints it as one JSON line. Both models run in fp32.
`verify_in_world` does the same inside an existing torch.distributed world (tests run several layouts in
one spawned world); `megatron_logits` is the TP/PP-aware forward (full-vocabulary logits on every rank).
"""

from __future__ import annotations

import json
import os

import torch

VERIFY_SEQ_LEN = 96  # > the gated delta rule's chunk (64): a Qwen3.5 verify also crosses a chunk boundary


def hf_logits(hf_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    import transformers

    with open(os.path.join(hf_dir, "config.json")) as f:
        arch = json.load(f)["architectures"][0]
    model = getattr(transformers, arch).from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def megatron_logits(chunks, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Forward-only pass through the pipeline; returns [b, s, vocab_size] fp32 logits on every rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    device = next(chunks[0].parameters()).device
    b, s = tokens.shape
    tokens = tokens.to(device)
    pos = torch.arange(s, device=device).unsqueeze(0).expand(b, s)

    def step(data_iterator, model):
        return model(tokens, pos, None), None  # loss_func None: the schedule stores the raw output

    for c in chunks:
        c.eval()
    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=step, data_iterator=[iter([None])] * len(chunks) if len(chunks) > 1 else iter([None]),
            model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=1, seq_length=s, micro_batch_size=b,
            forward_only=True,
        )
    is_src = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and \
        ps.get_data_parallel_rank() == 0
    logits = torch.empty(b, s, vocab_size, dtype=torch.float32, device=device)
    if ps.is_pipeline_last_stage():
        full = gather_from_tensor_model_parallel_region(out[0].float())  # [b, s, padded vocab]
        if is_src:
            logits.copy_(full[..., :vocab_size])
    src = torch.tensor([dist.get_rank() if is_src else -1], device=device)
    dist.all_reduce(src, op=dist.ReduceOp.MAX)
    dist.broadcast(logits, src=int(src.item()))
    return logits.cpu()


def build_and_load(mcore_dir: str, tp: int, pp: int, dp: int = 1):
    """Initialise megatron groups for (tp, pp, dp) in the current world and load the checkpoint's model (fp32)."""
    from erpd_megatron.megatron.checkpoint import load_model_weights, read_checkpoint_meta
    from erpd_megatron.megatron.model import BuildOptions, ModelConfig, build_model
    from erpd_megatron.megatron.parallel import ParallelConfig, init_parallel

    meta = read_checkpoint_meta(mcore_dir)
    cfg = ModelConfig.from_dict(meta["model_cfg"])
    saved_tp = int(meta["parallel"]["tp"])
    padded = cfg.padded_vocab_size(saved_tp)
    # The checkpoint's embedding rows are padded for the TP it was written at; build with that padding
    # (an instance attribute shadows the method) so any TP can load it.
    if padded % tp:
        raise ValueError(f"vocabulary padded to {padded} rows (for TP={saved_tp}) cannot be split over TP={tp}")
    cfg.padded_vocab_size = lambda tp_=1, _p=padded: _p
    par = ParallelConfig(tp=tp, pp=pp, dp=dp)
    init_parallel(par)
    chunks = build_model(cfg, par, BuildOptions(dtype=torch.float32))
    load_model_weights(chunks, mcore_dir)
    return cfg, chunks


def verify_in_world(hf_dir: str, mcore_dir: str, tp: int, pp: int, dp: int = 1, batch: int = 2,
                    seq_len: int = VERIFY_SEQ_LEN, seed: int = 0, ref: torch.Tensor | None = None) -> dict:
    cfg, chunks = build_and_load(mcore_dir, tp, pp, dp)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=g)
    mg = megatron_logits(chunks, tokens, cfg.vocab_size)
    if ref is None:  # one fp32 HF model (rank 0), not one per rank
        import torch.distributed as dist

        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else mg.device
        ref = hf_logits(hf_dir, tokens).to(dev) if dist.get_rank() == 0 else torch.empty_like(mg, device=dev)
        dist.broadcast(ref, src=0)
        ref = ref.cpu()
    diff = (mg - ref).abs().max().item()
    return {"max_abs_logit_diff": diff, "tokens": int(tokens.numel()), "tp": tp, "pp": pp,
            "max_abs_logit": ref.abs().max().item(), "argmax_agreement": (mg.argmax(-1) == ref.argmax(-1)).float()
            .mean().item()}


def _rank_main(rank: int, world: int, port: int, args: tuple, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        from erpd_megatron.megatron.parallel import destroy_parallel

        out = verify_in_world(*args)
        destroy_parallel()
        if rank == 0:
            queue.put(("ok", out))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        import traceback

        queue.put(("error", f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}"))


def verify(hf_dir: str, mcore_dir: str, tp: int | None = None, pp: int | None = None, batch: int = 2,
           seq_len: int = VERIFY_SEQ_LEN, seed: int = 0, timeout: float = 1800) -> dict:
    """Spawn tp*pp ranks (default: the checkpoint's layout), return rank 0's result."""
    import torch.multiprocessing as mp

    from erpd_megatron.megatron.checkpoint import read_checkpoint_meta
    from erpd_megatron.megatron.parallel import _free_port

    par = read_checkpoint_meta(mcore_dir)["parallel"]
    tp, pp = tp or int(par["tp"]), pp or int(par["pp"])
    world = tp * pp
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    args = (hf_dir, mcore_dir, tp, pp, 1, batch, seq_len, seed)
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, args, q)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        status, out = q.get(timeout=timeout)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if status != "ok":
        raise RuntimeError(out)
    return out
