"""Deterministic supervised warm-up of the tiny Qwen3 base policy for the toy task.

    python -m erpd_megatron.toy.warmup --out runs/toy_base [--steps N --seed S]

Builds a Qwen3ForCausalLM from ``toy_model_config()`` (fp32, tied embeddings), trains it by
cross-entropy on the scratchpad targets of ``task.py`` (AdamW, linear warm-up then cosine decay,
response tokens only), and saves an HF checkpoint dir (config.json, model.safetensors,
generation_config.json, tokenizer files) plus ``warmup.json`` with the accuracy measured at
temperature 1.0 and greedily on held-out problems, and the learning curve.

Determinism: one CPU thread, ``torch.use_deterministic_algorithms``, all randomness from the seed
(data order from ``random.Random``, init from ``torch.manual_seed``, sampling from a
``torch.Generator``). Two runs with the same arguments give bit-identical weights on one machine.
A second call with the same arguments finds the matching ``warmup.json`` and does nothing.
See docs/toy_task.md for why this model size and step count (a base on a plateau, not mid-curve).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from erpd_megatron.toy import chain as chain_task
from erpd_megatron.toy import task as toy_task
from erpd_megatron.toy.sampling import generate, quiet_math_verify, score
from erpd_megatron.toy.tokenizer import VOCAB, build_tokenizer
from erpd_megatron.utils.io import copy_file, follow_umask

WARMUP_JSON = "warmup.json"
# Bumped when the recipe changes in a way the config dict does not capture (invalidates caches).
RECIPE_VERSION = 1


def _print(msg: str) -> None:
    print(msg, flush=True)


def toy_model_config(*, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                     head_dim: int = 16, intermediate_size: int = 192, vocab_size: int | None = None,
                     tie_word_embeddings: bool = True, max_position_embeddings: int = 64) -> dict:
    """HF config dict of a tiny Qwen3ForCausalLM for the toy tokenizer.

    Heads and KV heads are even so TP=2 is a valid Megatron layout. ``vocab_size`` defaults to the toy
    vocabulary (24, already a multiple of 8). Ids of pad / bos / eos follow ``tokenizer.VOCAB``.
    """
    vocab_size = len(VOCAB) if vocab_size is None else vocab_size
    if vocab_size < len(VOCAB):
        raise ValueError(f"toy_model_config: vocab_size {vocab_size} < toy vocabulary {len(VOCAB)}")
    if num_heads % num_kv_heads:
        raise ValueError(f"toy_model_config: num_heads {num_heads} not divisible by num_kv_heads {num_kv_heads}")
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": tie_word_embeddings,
        "use_cache": True,
        "initializer_range": 0.02,
        "pad_token_id": VOCAB.index("<|pad|>"),
        "bos_token_id": VOCAB.index("<|bos|>"),
        "eos_token_id": VOCAB.index("<|im_end|>"),
        "torch_dtype": "float32",
    }


def build_model(config: dict, seed: int = 0):
    """Randomly initialised Qwen3ForCausalLM (fp32) from an HF config dict, init seeded."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = dict(config)
    cfg.pop("architectures", None)
    cfg.pop("model_type", None)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**cfg, attn_implementation="eager"))
    return model.float()


@dataclass(frozen=True)
class WarmupConfig:
    """Everything that determines the warm-up result (the cache key)."""

    steps: int = 400
    seed: int = 0
    batch_size: int = 128
    lr: float = 3e-3
    lr_warmup_steps: int = 30
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    eval_prompts: int = 256
    eval_samples: int = 4  # samples per prompt at T=1
    eval_every: int = 0  # 0: evaluate only at the end; else also every k steps (learning curve)
    model: dict = field(default_factory=dict)  # overrides of toy_model_config()
    schedule: str = "cosine"  # "cosine" (decay to min_lr_ratio) or "constant" (after the linear warm-up)
    recipe_version: int = RECIPE_VERSION
    task: str = "toy"  # "toy" (a*b+c, toy/task.py) or "long" (chained arithmetic, toy/chain.py)
    # > 0 (the code base only, toy/code_base.py): stop at the first curve point (every `eval_every` steps, from
    # `stop_from` on) whose validation T=1 accuracy reaches it; the lr schedule stays the one of `steps`
    stop_t1: float = 0.0
    stop_from: int = 0


def config_dict(cfg: WarmupConfig) -> dict:
    """The cache key's content: every field, except `task` when it is "toy" and the stop rule's fields when it is
    off (so bases cached before those fields existed stay valid)."""
    d = json.loads(json.dumps(asdict(cfg)))
    if d.get("task") == "toy":
        d.pop("task")
    if not d.get("stop_t1"):
        d.pop("stop_t1", None)
        d.pop("stop_from", None)
    return d


# Per task: (draw n training problems from an rng, held-out test problems, response cap in tokens).
def _toy_train(rng: random.Random, n: int):
    pool = toy_task.train_pool()
    return [pool[rng.randrange(len(pool))] for _ in range(n)]


def _long_train(rng: random.Random, n: int):
    out = []
    while len(out) < n:  # fresh problems, the training partition only
        p = chain_task.random_problem(rng)
        if not chain_task.is_heldout(p):
            out.append(p)
    return out


TASKS = {
    "toy": (_toy_train, toy_task.eval_problems, 40),
    # the long base's recipe was chosen on its validation split (the toy's predates the split: kept for its cache)
    "long": (_long_train, chain_task.validation_problems, chain_task.ChainTask().max_response_tokens),
}


# The demo's base (docs/toy_task.md, DESIGN.md section 7): 3 layers, hidden 128, warmed at a CONSTANT lr.
# A cosine-decayed warm-up leaves a base that no RL at lr <= 1e-4 moves; a constant-lr one keeps headroom
# (~57 % at T = 1 vs ~69 % greedy) that RL can reach. ~600k parameters, ~2-3 CPU-minutes.
DEMO_MODEL = {"hidden_size": 128, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2, "head_dim": 32,
              "intermediate_size": 384}
DEMO_BASE = WarmupConfig(steps=300, lr=2e-3, schedule="constant", model=DEMO_MODEL)
# The long task's base (docs/toy_task.md, "The long task"): the demo's architecture with room for ~170-token
# sequences, warmed at a constant lr and stopped mid-curve, where T = 1 accuracy is well below greedy: 400 steps,
# 39.8 % at T = 1 / 57.8 % greedy on 64 validation problems (step 350: 21.9 / 48.4 %), ~11 CPU-minutes.
LONG_MODEL = {**DEMO_MODEL, "max_position_embeddings": 256}
# recipe_version 2: the +/- task of LONG_OPS (the config does not name the task's operators; a base cached for the
# earlier + - * task must not be reused)
LONG_BASE = WarmupConfig(steps=400, lr=2e-3, schedule="constant", model=LONG_MODEL, batch_size=64, task="long",
                         recipe_version=2)


def _lr_at(step: int, cfg: WarmupConfig) -> float:
    if step < cfg.lr_warmup_steps:
        return cfg.lr * (step + 1) / cfg.lr_warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    t = (step - cfg.lr_warmup_steps) / max(1, cfg.steps - cfg.lr_warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _encode_pairs(tokenizer, problems) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt ids (chat template with generation prompt) and response ids (target + eos)."""
    prompts = [_prompt_ids(tokenizer, p.problem) for p in problems]
    responses = [tokenizer.encode(p.target, add_special_tokens=False) + [tokenizer.eos_token_id] for p in problems]
    return prompts, responses


def _prompt_ids(tokenizer, problem: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": problem}], add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"])


def _batch(prompts, responses, pad_id):
    """Right-padded input_ids and the mask of response positions (the project's token layout)."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    resp = torch.zeros((len(seqs), t), dtype=torch.float32)
    attn = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        resp[i, len(p): len(s)] = 1
    return ids, attn, resp


def sft_loss(model, ids, attn, resp) -> torch.Tensor:
    """Token-mean cross-entropy on response tokens (right padding never attended to by causal tokens)."""
    logits = model(input_ids=ids, attention_mask=attn).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    mask = resp[:, 1:]
    return (nll * mask).sum() / mask.sum()


def sft_step(model, opt, ids, attn, resp, lr: float) -> torch.Tensor:
    """One warm-up update at ``lr`` (grad-norm clip 1.0); returns the loss. Shared by the toy bases' warm-ups."""
    for g in opt.param_groups:
        g["lr"] = lr
    loss = sft_loss(model, ids, attn, resp)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss


def evaluate(model, tokenizer, problems, *, samples: int = 4, seed: int = 0, max_new_tokens: int = 40) -> dict:
    """Accuracy on ``problems``: mean over ``samples`` draws at T=1 and greedy (math_verify scored)."""
    quiet_math_verify()
    model.eval()
    prompts = [_prompt_ids(tokenizer, p.problem) for p in problems]
    gen = torch.Generator().manual_seed(seed)
    eos = tokenizer.eos_token_id
    t1 = generate(model, prompts * samples, eos_id=eos, temperature=1.0, max_new_tokens=max_new_tokens, generator=gen)
    gr = generate(model, prompts, eos_id=eos, temperature=0.0, max_new_tokens=max_new_tokens)
    answers = [p.answer for p in problems]
    acc_t1 = sum(score(tokenizer.decode(r, skip_special_tokens=True), a) for r, a in zip(t1, answers * samples)) / len(t1)
    acc_gr = sum(score(tokenizer.decode(r, skip_special_tokens=True), a) for r, a in zip(gr, answers)) / len(gr)
    model.train()
    return {"acc_t1": acc_t1, "acc_greedy": acc_gr, "n_prompts": len(problems), "samples_t1": samples}


@contextlib.contextmanager
def deterministic_cpu():
    """One thread + deterministic algorithms inside the block; the caller's settings are restored."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)


def _cached(out: Path, cfg: WarmupConfig) -> dict | None:
    meta = out / WARMUP_JSON
    if not (meta.is_file() and (out / "model.safetensors").is_file() and (out / "config.json").is_file()):
        return None
    try:
        data = json.loads(meta.read_text())
    except json.JSONDecodeError:
        return None
    return data if data.get("config") == config_dict(cfg) else None


def warmup(out_dir: str | Path, cfg: WarmupConfig = WarmupConfig(), *, force: bool = False, log=_print) -> dict:
    """Train (or find cached) the toy base model in ``out_dir``; returns the warmup.json contents."""
    if cfg.schedule not in ("cosine", "constant"):
        raise ValueError(f"WarmupConfig.schedule: expected 'cosine' or 'constant', got {cfg.schedule!r}")
    if cfg.task not in TASKS:
        raise ValueError(f"WarmupConfig.task: expected one of {sorted(TASKS)}, got {cfg.task!r}")
    draw_train, draw_eval, max_new = TASKS[cfg.task]
    out = Path(out_dir)
    if not force and (hit := _cached(out, cfg)) is not None:
        log(f"[toy.warmup] cached: {out} (acc T=1 {hit['final']['acc_t1']:.3f}, greedy {hit['final']['acc_greedy']:.3f})")
        return hit
    t0, c0 = time.perf_counter(), time.process_time()
    tokenizer = build_tokenizer()
    model_cfg = toy_model_config(**cfg.model)
    heldout = draw_eval(cfg.eval_prompts, seed=cfg.seed)
    rng = random.Random(f"toy-warmup-{cfg.seed}")
    curve = []
    with deterministic_cpu():
        model = build_model(model_cfg, seed=cfg.seed)
        model.train()
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98),
                                foreach=False)
        from erpd_megatron.utils.console import progress

        for step in progress(range(cfg.steps), desc="toy warm-up", unit="step"):
            if cfg.eval_every and step % cfg.eval_every == 0:
                curve.append({"step": step, **evaluate(model, tokenizer, heldout, samples=cfg.eval_samples, seed=cfg.seed,
                                                      max_new_tokens=max_new),
                              "wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(time.process_time() - c0, 2)})
                log(f"[toy.warmup] {curve[-1]}")
            batch = draw_train(rng, cfg.batch_size)
            ids, attn, resp = _batch(*_encode_pairs(tokenizer, batch), tokenizer.pad_token_id)
            loss = sft_step(model, opt, ids, attn, resp, _lr_at(step, cfg))
            if step % 100 == 0 or step == cfg.steps - 1:
                log(f"[toy.warmup] step {step} loss {loss.item():.4f} lr {_lr_at(step, cfg):.2e} "
                    f"t {time.perf_counter() - t0:.1f}s cpu {time.process_time() - c0:.1f}s")
        train_s = time.perf_counter() - t0
        final = {"step": cfg.steps, **evaluate(model, tokenizer, heldout, samples=cfg.eval_samples, seed=cfg.seed,
                                               max_new_tokens=max_new),
                 "wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(time.process_time() - c0, 2)}
        curve.append(final)
    _save(model, tokenizer, out, max_new)
    result = {
        "config": config_dict(cfg),
        "model_config": model_cfg,
        "num_params": sum(p.numel() for p in model.parameters()),
        "final": final,
        "curve": curve,
        "final_loss": float(loss.item()) if cfg.steps else None,
        "train_s": round(train_s, 2),
        "wall_s": round(time.perf_counter() - t0, 2),
        # CPU time of this (single-threaded) process: what the wall time would be on an idle core
        "cpu_s": round(time.process_time() - c0, 2),
        "torch": torch.__version__,
        "note": "accuracy on held-out problems; T=1 is the mean over samples_t1 draws per prompt; math_verify scored",
    }
    (out / WARMUP_JSON).write_text(json.dumps(result, indent=2) + "\n")
    log(f"[toy.warmup] saved {out}: acc T=1 {final['acc_t1']:.3f}, greedy {final['acc_greedy']:.3f}, "
        f"{result['wall_s']:.1f}s")
    return result


def _save(model, tokenizer, out: Path, max_new_tokens: int = 40) -> None:
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    (out / WARMUP_JSON).unlink(missing_ok=True)  # written last: its presence marks a complete checkpoint
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    for f in out.iterdir():  # safetensors writes 0600: the umask's mode, as every other file of a run dir
        if f.is_file():
            follow_umask(f)


def cache_root() -> Path | None:
    """Shared cache of warmed-up bases (``$ERPD_CACHE``, default ``~/.cache/erpd``; ``ERPD_CACHE=off`` disables)."""
    env = os.environ.get("ERPD_CACHE", "")
    if env.lower() in ("off", "0", "none"):
        return None
    return Path(env) if env else Path.home() / ".cache" / "erpd"


# Bump when the warm-up code changes what a given WarmupConfig produces: the shared cache outlives checkouts.
CACHE_VERSION = 1


def cache_key(cfg: WarmupConfig) -> str:
    blob = json.dumps({"version": CACHE_VERSION, **config_dict(cfg)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ensure_base_model(out_dir: str | Path, cfg: WarmupConfig = DEMO_BASE, log=_print, build=None) -> Path:
    """The demo's entry point: the warmed-up base model dir, trained on first use and cached after.

    Besides ``out_dir`` itself, a shared cache (``cache_root()/toy_base-<key>``) keyed by the whole
    ``WarmupConfig`` lets a second run directory reuse the base instead of warming it up again.
    ``build(out, cfg, log=...)`` trains one (default: ``warmup``; the toy code task passes its own).
    """
    out = Path(out_dir)
    root = cache_root()
    shared = root / f"toy_base-{cache_key(cfg)}" if root is not None else None
    if _cached(out, cfg) is None and shared is not None and _cached(shared, cfg) is not None:
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(shared.iterdir(), key=lambda f: f.name == WARMUP_JSON):  # warmup.json last
            if f.is_file():
                copy_file(f, out / f.name)  # this process's umask, not the cache's modes
        log(f"[toy.warmup] copied cached base {shared} -> {out}")
    (build or warmup)(out, cfg, log=log)
    if shared is not None and _cached(shared, cfg) is None:
        try:
            tmp = shared.with_name(shared.name + f".tmp{os.getpid()}")
            shutil.copytree(out, tmp, dirs_exist_ok=True, copy_function=copy_file)
            os.replace(tmp, shared)
        except OSError as e:  # a read-only home or a concurrent writer: the run dir copy is enough
            log(f"[toy.warmup] could not fill the shared cache {shared}: {e}")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m erpd_megatron.toy.warmup", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output HF checkpoint dir")
    ap.add_argument("--steps", type=int, default=DEMO_BASE.steps)
    ap.add_argument("--seed", type=int, default=DEMO_BASE.seed)
    ap.add_argument("--lr", type=float, default=DEMO_BASE.lr)
    ap.add_argument("--schedule", choices=("cosine", "constant"), default=DEMO_BASE.schedule)
    ap.add_argument("--eval-every", type=int, default=0, help="also evaluate every k steps (learning curve)")
    ap.add_argument("--model", type=json.loads, default=DEMO_MODEL,
                    help='JSON overrides of toy_model_config, e.g. \'{"hidden_size": 96}\' (default: the demo base)')
    ap.add_argument("--force", action="store_true", help="retrain even if a matching warmup.json exists")
    a = ap.parse_args(argv)
    cfg = dataclasses.replace(DEMO_BASE, steps=a.steps, seed=a.seed, lr=a.lr, schedule=a.schedule,
                              eval_every=a.eval_every, model=a.model)
    warmup(a.out, cfg, force=a.force)


if __name__ == "__main__":
    main()
