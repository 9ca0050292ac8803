"""``erpd eval``: AVG@K, pass@K and mean response length of a model on a local benchmark file.

Benchmark file: JSONL (or Parquet), one problem per line: a prompt (text or chat messages) and an answer
under the same field names as ``erpd run`` reads (``--prompt-key`` / ``--answer-key``, default: the first of
problem / prompt / question / messages and answer / reward_model.ground_truth / ...; docs/data.md), optionally
``"id"``. AIME / HMMT / BeyondAIME exports and verl Parquet files can be pointed at directly; nothing is
downloaded. Prompts are rendered as ``erpd run`` renders them (same instruction rule, system message,
chat-template kwargs), so a run's eval and ``erpd eval`` on its export see the same prompts. Code benchmarks
(LiveCodeBench, APPS / TACO, HumanEval, MBPP records with their test cases) are scored by running each
sample's program against the tests in the bubblewrap sandbox (``rewards/code.py``); one file may mix both.

Per problem, K samples (seeded) are scored by math-verify (``MathReward``). Optional fallback: an
LLM judge (OpenAI-compatible ``/v1/chat/completions``, e.g. an SGLang server) is asked only about
samples math-verify scored 0; its verdict is recorded beside math-verify's and a "correct" verdict
counts. Off by default.

Numbers: AVG@K = mean correctness over all K x N samples; pass@j (j <= K) uses the unbiased
estimator 1 - C(n - c, j) / C(n, j) of Chen et al. (2021) with n = K samples and c correct, averaged
over problems (pass@K is then "any of the K is correct"); mean length in response tokens.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from erpd_megatron.utils.cli import HelpFormatter

if TYPE_CHECKING:  # the engine module imports torch: `erpd eval --help` must not
    from erpd_megatron.rollout.engine import SamplingParams

log = logging.getLogger("erpd.eval")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (k <= n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _reply_text(data) -> str:
    """The message text of an OpenAI chat-completions reply; ValueError naming what is off when the JSON has
    another shape (`{"choices": null}`, `[]`, a number as content): counted as a failed call, like an outage."""
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ValueError(f"reply without choices[0]: {json.dumps(data)[:200]}")
    message = choices[0].get("message")
    if not isinstance(message, dict):
        raise ValueError(f"reply without choices[0].message: {json.dumps(choices[0])[:200]}")
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise ValueError(f"reply whose choices[0].message.content is {type(content).__name__}, not text")
    return content or ""


class LLMJudge:
    """Asks an OpenAI-compatible chat endpoint whether a response's final answer equals the reference."""

    PROMPT = ("You are grading a math answer.\nProblem:\n{problem}\n\nReference answer: {answer}\n\n"
              "Student response (final part):\n{response}\n\n"
              "Is the student's final answer mathematically equivalent to the reference answer? "
              "Reply with exactly one word: CORRECT or INCORRECT.")

    def __init__(self, url: str, model: str = "default", api_key: str | None = None, timeout: float = 120.0,
                 max_response_chars: int = 4000):
        """``url``: base URL (``http://host:port`` or ``.../v1``); ``api_key`` default: $OPENAI_API_KEY."""
        base = url.rstrip("/")
        self.endpoint = base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")
        self.model, self.timeout, self.max_chars = model, timeout, max_response_chars
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.errors, self.last_error = 0, ""  # failed calls (connection, HTTP, malformed reply)

    def __call__(self, problem: str, answer: str, response: str) -> bool | None:
        """True / False, or None when the judge failed or answered something else."""
        body = {"model": self.model, "temperature": 0.0, "max_tokens": 8,
                "messages": [{"role": "user", "content": self.PROMPT.format(
                    problem=problem, answer=answer, response=response[-self.max_chars:])}]}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.endpoint, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                text = _reply_text(json.loads(resp.read()))
        except (OSError, ValueError, RecursionError) as e:  # an outage, or a reply of another shape
            self.errors += 1
            self.last_error = f"{type(e).__name__}: {e}"
            if self.errors <= 3:  # one refused connection per sample would flood the log
                log.warning("judge call failed: %s", self.last_error)
            return None
        words = re.findall(r"[A-Za-z]+", text.upper())
        if "INCORRECT" in words:
            return False
        if "CORRECT" in words:
            return True
        return None


def evaluate(engine, tokenizer, problems: Sequence, sampling: SamplingParams, k: int, reward,
             judge=None, instruction: str | None = "default", system: str | None = None,
             chat_template_kwargs: dict | None = None, toy: bool = False) -> dict:
    """Evaluate ``engine`` on ``problems`` (``data.prompts.Prompt`` objects or dicts with problem/answer).

    ``sampling.n`` is replaced by ``k``. ``reward``: a ``RewardRouter`` (each record scored by the reward it
    routes to: math-verify, sandboxed code or a custom reward), or any object with ``score_batch(texts, golds)``
    (``MathReward``). ``judge``: callable (problem, answer, response) -> bool | None, or None; asked about math
    samples only. ``instruction``: prompt suffix; "default" = data.prompts.DEFAULT_INSTRUCTION, "auto" =
    data.prompts.resolve_instruction's rule (``toy``: the model is the toy task's), None = none; with "default" /
    "auto", code records get rewards.code.CODE_INSTRUCTION instead.
    Returns {"total": {...}, "per_problem": [...]} (JSON-serialisable)."""
    from erpd_megatron.data.prompts import DEFAULT_INSTRUCTION, Prompt, encode_prompts, resolve_instruction
    from erpd_megatron.rewards.code import CODE_INSTRUCTION

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    items = [p if isinstance(p, Prompt) else Prompt(id=str(p.get("id", i)), problem=str(p["problem"]),
                                                    answer=str(p["answer"]))
             for i, p in enumerate(problems)]
    routed = hasattr(reward, "route")  # a RewardRouter scores by record; a MathReward by gold answer
    kinds = [reward.route(p) if routed else "math" for p in items]
    instr = DEFAULT_INSTRUCTION if instruction == "default" else resolve_instruction(instruction, toy=toy)

    def encode(ps, ins):
        return encode_prompts(tokenizer, ps, instruction=ins, system=system, chat_template_kwargs=chat_template_kwargs)

    if instruction in ("default", "auto") and "code" in kinds:
        prompt_ids = [encode([p], CODE_INSTRUCTION if kind == "code" else instr)[0] for p, kind in zip(items, kinds)]
    else:
        prompt_ids = encode(items, instr)
    samples = engine.generate(prompt_ids, replace(sampling, n=k))
    texts = [tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples]
    targets = [items[s.prompt_index] if routed else items[s.prompt_index].answer for s in samples]
    mv = [float(r) for r in reward.score_batch(texts, targets)]
    reasons = list(reward.last_reasons) if routed else ["passed" if m > 0 else "wrong_answer" for m in mv]
    verdicts: list[bool | None] = [None] * len(samples)
    if judge is not None:
        for j, s in enumerate(samples):
            if mv[j] == 0.0 and kinds[s.prompt_index] == "math":
                p = items[s.prompt_index]
                verdicts[j] = judge(p.problem, p.answer, texts[j])
    # a sample counts as correct when its reward is 1 (code with score=fraction: every test passed)
    correct = [1.0 if (m >= 1.0 or v is True) else 0.0 for m, v in zip(mv, verdicts)]

    per: list[dict] = []
    for i, p in enumerate(items):
        idx = [j for j, s in enumerate(samples) if s.prompt_index == i]
        c = int(sum(correct[j] for j in idx))
        per.append({
            "id": p.id, "answer": p.answer, "kind": kinds[i], "k": len(idx), "correct": c,
            "reasons": [reasons[j] for j in idx],
            "avg": c / len(idx), "pass_at_k": pass_at_k(len(idx), c, len(idx)),
            "math_verify": [mv[j] for j in idx],
            "judge": [verdicts[j] for j in idx] if judge is not None else None,
            "lengths": [len(samples[j].response_ids) for j in idx],
            "finish_reasons": [samples[j].finish_reason for j in idx],
            "responses": [texts[j] for j in idx],
        })
    n = len(items)
    pass_at = {str(j): sum(pass_at_k(k, q["correct"], j) for q in per) / n
               for j in sorted({1, k} | {2 ** e for e in range(1, k.bit_length()) if 2 ** e <= k})} if n else {}
    total = {
        "problems": n, "k": k, "samples": len(samples),
        "avg_at_k": sum(correct) / len(correct) if correct else 0.0,
        "pass_at_k": pass_at.get(str(k), 0.0),
        "pass_at": pass_at,
        "mean_length": sum(len(s.response_ids) for s in samples) / len(samples) if samples else 0.0,
        "truncated_frac": sum(s.finish_reason == "length" for s in samples) / len(samples) if samples else 0.0,
        "avg_at_k_math_verify": sum(mv) / len(mv) if mv else 0.0,
        # calls: samples the judge was asked about; failures: calls without a verdict (error or other reply)
        "reasons": dict(sorted(Counter(reasons).items())),  # every sample's reward reason, counted
        "judge_calls": sum(m == 0.0 and kinds[s.prompt_index] == "math"
                           for m, s in zip(mv, samples)) if judge is not None else 0,
        "judge_failures": sum(m == 0.0 and v is None and kinds[s.prompt_index] == "math"
                              for m, v, s in zip(mv, verdicts, samples)) if judge is not None else 0,
        "judge_last_error": getattr(judge, "last_error", "") if judge is not None else "",
        "judge_flips": sum(1 for m, v in zip(mv, verdicts) if m == 0 and v is True),
        "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
                     "max_new_tokens": sampling.max_new_tokens, "seed": sampling.seed},
    }
    return {"total": total, "per_problem": per}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="erpd eval", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
                                 epilog="example:\n  erpd eval --benchmark aime24.jsonl --model /path/hf_dir --k 16 "
                                        "--max-new-tokens 8192 --out res.json")
    ap.add_argument("--benchmark", required=True, help="JSONL/Parquet file with problem, answer (optional id)")
    ap.add_argument("--model", help="HF model directory (LocalEngine; also the tokenizer source)")
    ap.add_argument("--sglang-url", action="append", default=[], help="attach to SGLang server(s) instead (repeat)")
    ap.add_argument("--tokenizer", help="tokenizer directory (needed with --sglang-url; default: --model)")
    ap.add_argument("--k", type=int, default=4, help="samples per problem (AVG@K, pass@K), >= 1")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, > 0")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, in (0, 1]")
    ap.add_argument("--max-new-tokens", type=int, default=1024, help="response length cap, >= 1")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--limit", type=int, default=0, help="first N problems only (0 = all)")
    ap.add_argument("--prompt-key", default="", help="prompt field, dotted path (default: the first of problem, "
                    "prompt, question, messages)")
    ap.add_argument("--answer-key", default="", help="answer field, dotted path (default: the first of answer, "
                    "reward_model.ground_truth, ground_truth, solution, label)")
    ap.add_argument("--instruction", default="auto", help='suffix of text prompts: "auto" = the boxed-answer '
                    'instruction except for a toy-task model (the rule of data.instruction in erpd run), '
                    '"" for none, or any text (default: auto)')
    ap.add_argument("--system", default="", help="system message (default: none)")
    ap.add_argument("--chat-template-kwargs", default="{}", help='JSON of extra chat-template variables, e.g. '
                    '\'{"enable_thinking": false}\' (default: none)')
    ap.add_argument("--custom-reward", default="", help="module:function or file.py:function, verl's signature "
                    "(rewards/custom.py); default: math-verify only")
    ap.add_argument("--custom-sources", default="", help="comma-separated data_source values for --custom-reward "
                    "(default: every record)")
    ap.add_argument("--reward-mode", default="strict", choices=("strict", "loose"),
                    help="math-verify: last \\boxed{} only (strict) or any final answer (loose)")
    ap.add_argument("--code-score", default="binary", choices=("binary", "fraction"),
                    help="code records: reward 1 only when every test passes, or the fraction passed")
    ap.add_argument("--sandbox", default="bwrap", choices=("bwrap", "none"),
                    help="code records: bubblewrap sandbox, or none (UNSANDBOXED, warned on every batch)")
    ap.add_argument("--code-timeout", type=float, default=6.0, help="code records: wall limit per test (s)")
    ap.add_argument("--judge-url", help="OpenAI-compatible endpoint for the LLM-judge fallback (off by default)")
    ap.add_argument("--judge-model", default="default", help="model name sent to the judge")
    ap.add_argument("--batch-size", type=int, default=256, help="LocalEngine rows per forward, >= 1")
    ap.add_argument("--out", help="write the JSON result here (default: stdout)")
    return ap


class UsageError(ValueError):
    """A flag value or path the command cannot use; main prints it as one line and exits 2."""


def _check_args(args) -> None:
    """Everything checkable before a model is loaded."""
    for flag, ok in (("--k", args.k >= 1), ("--temperature", args.temperature > 0),
                     ("--top-p", 0 < args.top_p <= 1), ("--max-new-tokens", args.max_new_tokens >= 1),
                     ("--limit", args.limit >= 0), ("--batch-size", args.batch_size >= 1)):
        if not ok:  # `not (x > 0)` also catches NaN
            raise UsageError(f"{flag}={getattr(args, flag[2:].replace('-', '_'))} is out of range (see --help)")
    if not args.model and not args.sglang_url:
        raise UsageError("give --model (local engine) or --sglang-url")
    if args.sglang_url and not (args.tokenizer or args.model):
        raise UsageError("--tokenizer is needed with --sglang-url")
    if not Path(args.benchmark).is_file():
        raise UsageError(f"--benchmark {args.benchmark}: no such file")
    for flag, d in (("--model", args.model), ("--tokenizer", args.tokenizer)):
        if d and not Path(d).is_dir():  # checked here: transformers would read it as a Hub repo id
            raise UsageError(f"{flag} {d}: not a directory (give a local HF model directory)")
    if args.model and not (Path(args.model) / "config.json").is_file():
        raise UsageError(f"--model {args.model}: no config.json (not a HF model directory)")
    try:
        kwargs = json.loads(args.chat_template_kwargs)
    except ValueError:
        kwargs = None
    if not isinstance(kwargs, dict):
        raise UsageError(f"--chat-template-kwargs {args.chat_template_kwargs}: expected a JSON object")
    args.chat_template_kwargs = kwargs


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from erpd_megatron.utils.cli import error_exit, is_user_error
    from erpd_megatron.utils.console import configure, quiet_third_party

    configure()  # no weight-loading bar in a log file (stderr not a terminal)
    quiet_third_party()
    try:
        _check_args(args)
        return _run(args)
    except Exception as e:  # a flag, a data file, a damaged file, a full disk: one line (utils/cli.py)
        if not (isinstance(e, UsageError) or is_user_error(e)):
            raise
        return error_exit("erpd eval", e)


def _run(args) -> int:
    from transformers import AutoTokenizer

    from erpd_megatron.config import RewardConfig, is_toy_base
    from erpd_megatron.data.prompts import load_prompts
    from erpd_megatron.pipeline.checks import check_tokenizer
    from erpd_megatron.rewards.router import make_router
    from erpd_megatron.rollout.engine import SamplingParams

    problems = load_prompts(args.benchmark, args.prompt_key, args.answer_key)
    if args.limit:
        problems = problems[: args.limit]
    rcfg = RewardConfig(custom=args.custom_reward, custom_sources=[x for x in args.custom_sources.split(",") if x],
                        code_score=args.code_score, code_timeout_per_test_s=args.code_timeout, sandbox=args.sandbox)
    router = make_router(rcfg, mode=args.reward_mode)  # a bad custom reward spec: one line before the model loads
    if any(router.route(p) == "code" for p in problems):
        router.backend("code")  # a missing sandbox fails here, before the model is loaded
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    check_tokenizer(tokenizer, args.tokenizer or args.model, problems, "--tokenizer" if args.tokenizer else "--model")
    if args.sglang_url:
        from erpd_megatron.rollout.sglang_engine import SGLangEngine, SGLangError

        try:
            engine = SGLangEngine(urls=args.sglang_url, attach_timeout=30.0)  # serving already, or a wrong URL
        except SGLangError as e:  # nothing answers at that address: the flag is wrong, not the code
            raise UsageError(f"--sglang-url: {e}") from None
    else:
        from erpd_megatron.rollout.local_engine import LocalEngine

        engine = LocalEngine.from_pretrained(args.model, tokenizer=tokenizer, max_batch_size=args.batch_size)
    sampling = SamplingParams(n=args.k, temperature=args.temperature, top_p=args.top_p,
                              max_new_tokens=args.max_new_tokens, seed=args.seed)
    judge = LLMJudge(args.judge_url, model=args.judge_model) if args.judge_url else None
    with router as reward:
        result = evaluate(engine, tokenizer, problems, sampling, args.k, reward, judge=judge,
                          instruction=args.instruction or None, system=args.system or None,
                          chat_template_kwargs=args.chat_template_kwargs,
                          toy=bool(args.model) and is_toy_base(args.model))
    result["total"].update(benchmark=os.path.abspath(args.benchmark), model=args.model or args.sglang_url)
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    else:
        print(text)
    t = result["total"]
    print(f"{t['problems']} problems x {t['k']}: AVG@{t['k']} {t['avg_at_k']:.4f}  pass@{t['k']} {t['pass_at_k']:.4f}  "
          f"mean length {t['mean_length']:.1f}", file=sys.stderr)
    engine.shutdown()
    if t["judge_calls"] and t["judge_failures"] == t["judge_calls"]:
        # every fallback verdict is missing: AVG@K above is math-verify's alone, not what was asked for
        print(f"erpd eval: error: all {t['judge_calls']} judge calls failed ({t['judge_last_error']})",
              file=sys.stderr)
        return 1
    if t["judge_failures"]:
        print(f"erpd eval: warning: {t['judge_failures']} of {t['judge_calls']} judge calls failed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
