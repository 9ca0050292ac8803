"""Tiny multi-process runner for CPU tests: spawn N gloo ranks running one function.

    from dist_utils import run_distributed
    results = run_distributed(my_fn, world_size=2, args=(tmp_path,))   # results[rank] = my_fn(rank, *args)

`my_fn(rank, *args)` must be a module-level function (spawn pickles it by name). Each child gets
RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (a free port), OMP_NUM_THREADS=1 and one torch
thread, and joins a gloo process group before `my_fn` runs (destroyed afterwards). Return values
must be picklable (move tensors to CPU). An exception in any rank is re-raised in the caller with
that rank's traceback; a hung world is killed after `timeout` seconds.
"""

from __future__ import annotations

import os
import queue
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world_size, port, args, q, init_pg):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    try:
        import torch

        torch.set_num_threads(1)
        if init_pg:
            import datetime

            import torch.distributed as dist

            dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(minutes=5))
        out = fn(rank, *args)
        q.put((rank, "ok", out))
    except BaseException as e:  # noqa: BLE001 - report everything to the parent
        q.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


class DistributedTestError(AssertionError):
    pass


def run_distributed(fn, world_size: int, args: tuple = (), timeout: float = 300, init_pg: bool = True) -> list:
    """Run fn(rank, *args) on `world_size` spawned ranks; return [result of rank 0, rank 1, ...]."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, args, q, init_pg), daemon=False)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors: dict[int, str] = {}
    try:
        import time

        deadline = time.monotonic() + timeout
        while len(results) + len(errors) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DistributedTestError(f"distributed test timed out after {timeout}s; finished ranks: "
                                           f"{sorted(results)}, failed: {sorted(errors)}")
            try:
                rank, status, payload = q.get(timeout=min(left, 5.0))
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in results
                        and i not in errors]
                if dead:
                    raise DistributedTestError(f"rank(s) {dead} died with exit codes "
                                               f"{[procs[i].exitcode for i in dead]} without reporting") from None
                continue
            if status == "ok":
                results[rank] = payload
            else:
                errors[rank] = payload
                break  # the other ranks are likely stuck in a collective; fail fast
    finally:
        for p in procs:
            p.join(timeout=10 if not errors else 2)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        rank = min(errors)
        raise DistributedTestError(f"rank {rank} failed:\n{errors[rank]}")
    return [results[r] for r in range(world_size)]


# ---------------------------------------------------------------------- shared tiny fixtures
def toy_batch(seed: int = 0):
    """4 rows x 12 tokens (ids 1..63), response = positions 4.. : the tiny engine tests' batch."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (4, 12), generator=g)
    rm = torch.zeros_like(ids)
    rm[:, 4:] = 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": rm}


def response_loss(lp, mb, _ent=None):
    """-mean log-prob over response tokens (an engine LossFn)."""
    m = mb["response_mask"].float()
    return -(lp * m).sum() / m.sum(), {}
