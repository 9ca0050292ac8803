"""Tokenizer and warmed tiny base for the toy code task (`toy/code_task.py`), like `toy/tokenizer.py` + `toy/warmup.py`.

    python -m erpd_megatron.toy.code_base --out runs/toy_code_base [--steps N --seed S]

Tokenizer: character level over the task's alphabet (`0-9 f ( ) = ; x * +`), plus two whole tokens: the program's
head "```python\\ndef f(x):return " and its closing fence "\\n```". A response is then, e.g.,
`[HEAD] x * 3 + 1 [CLOSE] <|im_end|>`: the model writes the function body, the sandbox runs the whole program.
Same special tokens, ids and chat template as the math toy.

Base: the demo's model shape (3 layers, hidden 128) warmed by supervised fine-tuning on train functions, batch 128,
with the schedule of a 1200-step cosine lr 1e-3 -> 5e-5, STOPPED at the first point (every 25 steps from step 600)
where 128 validation functions x 8 samples reach 25 % at T=1 (`CODE_BASE`; the math toy's determinism; it stopped at
step 725 with 39 % T=1 / 50 % greedy here). The learning of a is a sudden jump (11 % at step 600, 69 % at 800, 99 %
at 1000 on this schedule): a fixed step count lands either below the range RL can use or above it. At a constant
2e-3 the model copies b at once but stays at chance on a (~5.5 %, 400 steps measured). Kept in the demo's shared
cache (`warmup.ensure_base_model`), keyed by the config and the task's ranges.
Its accuracy here is measured WITHOUT running programs: a response counts when it is exactly
"def f(x):return x*A+B" with the right A and B (for this grammar what the hidden tests decide; an equivalent
program written another way would count 0 here and 1 in the sandbox, so this is a lower bound). The pipeline
scores with the real sandbox.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import time
from pathlib import Path

import torch

from erpd_megatron.toy import code_task
from erpd_megatron.toy.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS
from erpd_megatron.toy.warmup import (
    DEMO_MODEL,
    WARMUP_JSON,
    WarmupConfig,
    _batch,
    _cached,
    _lr_at,
    _prompt_ids,
    _save,
    build_model,
    config_dict,
    deterministic_cpu,
    ensure_base_model,
    sft_step,
    toy_model_config,
)

HEAD = "```python\ndef f(x):return "
CLOSE = "\n```"
CODE_VOCAB = SPECIAL_TOKENS + list("0123456789") + list("f()=;x*+") + [HEAD, CLOSE]
VOCAB_SIZE = 32  # padded to a multiple of 8 (TP-friendly), as the math toy's 24
# `task` names the function space, so the cache key (warmup.config_dict) changes when the task's ranges do
CODE_TASK_NAME = (f"toy_code:a{code_task.A_RANGE.start}-{code_task.A_RANGE.stop - 1},"
                  f"b{code_task.B_RANGE.start}-{code_task.B_RANGE.stop - 1}")
# The cosine schedule of 1200 steps, stopped at the first point (every 25 steps from step 600) where 128 validation
# functions x 8 samples reach 25 % at T=1: run to the end, this schedule jumps from 11 % (step 600) to 69 % (800) and
# 99 % (1000) T=1 on validation (docs/code_tasks.md), which leaves RL nothing to do
CODE_BASE = WarmupConfig(steps=1200, lr=1e-3, schedule="cosine", model={**DEMO_MODEL, "vocab_size": VOCAB_SIZE},
                         eval_prompts=128, eval_samples=4, task=CODE_TASK_NAME, eval_every=25, stop_t1=0.25,
                         stop_from=600)
_BODY_RE = re.compile(r"```python\ndef f\(x\):return x\*(\d+)\+(\d+)\n```\s*$")


def build_code_tokenizer():
    """A `PreTrainedTokenizerFast` for the toy code task (nothing read or fetched)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(CODE_VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(re.escape(HEAD) + "|" + re.escape(CLOSE) + r"|."),
                                             behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|im_end|>",
                                 pad_token="<|pad|>", unk_token="<unk>", padding_side="right", model_max_length=64,
                                 clean_up_tokenization_spaces=False)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def correct(response: str, p: code_task.CodeProblem) -> bool:
    m = _BODY_RE.search(response)
    return m is not None and (int(m.group(1)), int(m.group(2))) == (p.a, p.b)


def evaluate(model, tokenizer, problems, *, samples: int, seed: int) -> dict:
    from erpd_megatron.toy.sampling import generate

    model.eval()
    prompts = [_prompt_ids(tokenizer, p.problem) for p in problems]
    eos = tokenizer.eos_token_id
    t1 = generate(model, prompts * samples, eos_id=eos, temperature=1.0, max_new_tokens=16,
                  generator=torch.Generator().manual_seed(seed))
    gr = generate(model, prompts, eos_id=eos, temperature=0.0, max_new_tokens=16)
    dec = [tokenizer.decode(r, skip_special_tokens=True) for r in t1]
    acc_t1 = sum(correct(d, p) for d, p in zip(dec, problems * samples)) / len(dec)
    acc_gr = sum(correct(tokenizer.decode(r, skip_special_tokens=True), p) for r, p in zip(gr, problems)) / len(gr)
    model.train()
    return {"acc_t1": acc_t1, "acc_greedy": acc_gr, "n_prompts": len(problems), "samples_t1": samples}


def headroom(model, tokenizer, problems, *, samples: int = 8, seed: int = 0) -> dict:
    """What RL can use: accuracy at T = 1 and greedy, and the fraction of prompts whose `samples` samples at T = 1 are
    mixed (some right, some wrong: the prompts where GRPO's group advantage is not 0). Scored as `evaluate`."""
    from erpd_megatron.toy.sampling import generate

    model.eval()
    prompts = [_prompt_ids(tokenizer, p.problem) for p in problems]
    with torch.no_grad():
        t1 = generate(model, prompts * samples, eos_id=tokenizer.eos_token_id, temperature=1.0, max_new_tokens=16,
                      generator=torch.Generator().manual_seed(seed))
        gr = generate(model, prompts, eos_id=tokenizer.eos_token_id, temperature=0.0, max_new_tokens=16)
    model.train()
    ok = [correct(tokenizer.decode(r, skip_special_tokens=True), p) for r, p in zip(t1, problems * samples)]
    right = [sum(ok[i::len(problems)]) for i in range(len(problems))]
    return {"t1": sum(ok) / len(ok),
            "greedy": sum(correct(tokenizer.decode(r, skip_special_tokens=True), p) for r, p in zip(gr, problems))
            / len(problems),
            "mixed": sum(0 < r < samples for r in right) / len(problems)}


def warmup_code_base(out_dir: str | Path, cfg: WarmupConfig = CODE_BASE, log=print, curve_every: int = 0) -> Path:
    """Train (or find cached) the toy code base in `out_dir` (HF checkpoint + tokenizer + warmup.json); also kept in
    the demo's shared cache (`warmup.ensure_base_model`: `~/.cache/erpd/toy_base-<key>`, `$ERPD_CACHE`).
    `curve_every` > 0 also measures `headroom` on 128 validation and 128 train functions every k steps (into
    warmup.json's "curve"; generation has its own generator, so the weights do not change)."""
    return ensure_base_model(out_dir, cfg, log=log,
                             build=lambda o, c, log: _train_code_base(o, c, log=log, curve_every=curve_every))


def _train_code_base(out_dir: str | Path, cfg: WarmupConfig, log=print, curve_every: int = 0) -> Path:
    out = Path(out_dir)
    if _cached(out, cfg) is not None:
        return out
    t0 = time.perf_counter()
    tokenizer = build_code_tokenizer()
    model_cfg = toy_model_config(**cfg.model)
    pool = code_task.train_problems(len([p for p in code_task.all_problems() if not code_task.is_heldout(p)]),
                                    seed=cfg.seed)
    heldout = code_task.validation_problems(cfg.eval_prompts, seed=cfg.seed)
    rng = random.Random(f"toy-code-warmup-{cfg.seed}")
    curve, probe = [], {"validation": code_task.validation_problems(128, seed=cfg.seed),
                        "train": code_task.train_problems(128, seed=7)}
    with deterministic_cpu():
        model = build_model(model_cfg, seed=cfg.seed)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay,
                                foreach=False)
        for step in range(cfg.steps):
            batch = [pool[rng.randrange(len(pool))] for _ in range(cfg.batch_size)]
            prompts = [_prompt_ids(tokenizer, p.problem) for p in batch]
            resp = [tokenizer.encode(p.target, add_special_tokens=False) + [tokenizer.eos_token_id] for p in batch]
            ids, attn, mask = _batch(prompts, resp, tokenizer.pad_token_id)
            loss = sft_step(model, opt, ids, attn, mask, _lr_at(step, cfg))
            if step % 100 == 0 or step == cfg.steps - 1:
                log(f"[toy.code_base] step {step} loss {loss.item():.4f} t {time.perf_counter() - t0:.1f}s")
            stop_point = (cfg.stop_t1 > 0 and step + 1 >= cfg.stop_from and (step + 1) % cfg.eval_every == 0)
            full = curve_every and (step + 1) % curve_every == 0
            if stop_point or full:  # a stop point alone measures validation only (each probe costs ~20 s here)
                curve.append({"step": step + 1, "loss": float(loss.item()),
                              **{k: headroom(model, tokenizer, v) for k, v in probe.items()
                                 if full or k == "validation"}})
                log(f"[toy.code_base] curve {curve[-1]}")
                if stop_point and curve[-1]["validation"]["t1"] >= cfg.stop_t1:
                    log(f"[toy.code_base] stop rule: validation T=1 {curve[-1]['validation']['t1']:.3f} >= "
                        f"{cfg.stop_t1} at step {step + 1}")
                    break
        final = evaluate(model, tokenizer, heldout, samples=cfg.eval_samples, seed=cfg.seed)
    _save(model, tokenizer, out)
    result = {"config": config_dict(cfg), "model_config": model_cfg, "final": final, "steps_trained": step + 1,
              "final_loss": float(loss.item()), "wall_s": round(time.perf_counter() - t0, 2), "curve": curve,
              "note": "validation functions; a response counts when it is exactly def f(x):return x*A+B with the "
                      "right A, B (no program is run here); the pipeline scores in the sandbox"}
    (out / WARMUP_JSON).write_text(json.dumps(result, indent=2) + "\n")
    log(f"[toy.code_base] saved {out}: T=1 {final['acc_t1']:.3f}, greedy {final['acc_greedy']:.3f}, "
        f"{result['wall_s']:.0f} s")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m erpd_megatron.toy.code_base", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=CODE_BASE.steps)
    ap.add_argument("--seed", type=int, default=CODE_BASE.seed)
    ap.add_argument("--lr", type=float, default=CODE_BASE.lr)
    ap.add_argument("--schedule", choices=("cosine", "constant"), default=CODE_BASE.schedule)
    ap.add_argument("--curve-every", type=int, default=0,
                    help="also measure headroom (T=1, greedy, mixed groups; validation and train) every k steps")
    a = ap.parse_args(argv)
    warmup_code_base(a.out, dataclasses.replace(CODE_BASE, steps=a.steps, seed=a.seed, lr=a.lr, schedule=a.schedule),
                     curve_every=a.curve_every)


if __name__ == "__main__":
    main()
