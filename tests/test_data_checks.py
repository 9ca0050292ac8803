"""Data against config and model, before any training: dataset sizes, prompt lengths, nothing written on bad data."""

from __future__ import annotations

import json
import logging

import pytest

from erpd_megatron.config import ConfigError, load_config
from erpd_megatron.data.prompts import Prompt
from erpd_megatron.pipeline.checks import check_dataset_sizes, check_prompt_lengths


def _prompts(n, text="1+1=", prefix="p"):
    return [Prompt(id=f"{prefix}{i}", problem=text, answer="2") for i in range(n)]


def _cfg(*overrides):
    return load_config(None, ["teachers.ce.mini_batch_size=8", "students.s1_ce.mini_batch_size=8", *overrides])


def test_training_set_smaller_than_the_batches_is_refused(caplog):
    cfg = _cfg("data.prompts_per_batch=8", "iterations=2", "data.eval_prompts=5")
    with pytest.raises(ConfigError, match=r"^data.train: toy has 15 prompts, fewer than data.prompts_per_batch \* "
                                          r"iterations = 8 \* 2 = 16"):
        check_dataset_sizes(cfg, _prompts(15), _prompts(5))
    check_dataset_sizes(cfg, _prompts(16), _prompts(5))  # exactly enough
    with caplog.at_level(logging.WARNING, logger="erpd"):
        check_dataset_sizes(cfg, _prompts(16), _prompts(3))  # a short eval file: used whole, with a warning
    assert "fewer than data.eval_prompts=5" in caplog.text
    with pytest.raises(ConfigError, match="data.eval: toy has no problems"):
        check_dataset_sizes(cfg, _prompts(16), [])


def test_prompt_longer_than_the_model_positions_is_refused():
    from erpd_megatron.toy.tokenizer import build_tokenizer

    tok = build_tokenizer()  # one token per character, chat template adds <|bos|><|user|> ... <|assistant|>
    cfg = _cfg("rollout.max_new_tokens=40")
    short, long_ = _prompts(3), [Prompt(id="long-one", problem="1+" * 10 + "1=", answer="11")]
    check_prompt_lengths(cfg, tok, short, max_positions=64)
    n_long = 3 + len("1+" * 10 + "1=")  # 25 tokens: 25 + 40 > 64
    with pytest.raises(ConfigError, match=rf"prompt 'long-one' has {n_long} tokens: with rollout.max_new_tokens=40 "
                                          r"it exceeds the model's 64 positions"):
        check_prompt_lengths(cfg, tok, short + long_, max_positions=64)
    check_prompt_lengths(cfg, tok, short + long_, max_positions=65)  # 25 + 40 = 65 fits exactly
    with pytest.raises(ConfigError, match="rollout.max_new_tokens=40 leaves no room"):
        check_prompt_lengths(cfg, tok, short, max_positions=40)


def test_bad_train_file_writes_nothing_even_with_toy_eval(tmp_path):
    """The toy eval file is generated only after the user's training file has loaded."""
    from erpd_megatron.data.prompts import PromptDataError
    from erpd_megatron.pipeline.context import load_prompts
    from erpd_megatron.pipeline.rundir import RunDir

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "1+1="}) + "\n")
    run = tmp_path / "run"
    cfg = _cfg(f"run_dir={run}", f"data.train={bad}", "data.eval=toy")
    with pytest.raises(PromptDataError, match="bad.jsonl:1"):
        load_prompts(cfg, RunDir(run))
    assert not run.exists()
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"problem": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(4)))
    train, evals = load_prompts(_cfg(f"run_dir={run}", f"data.train={good}", "data.eval=toy", "data.eval_prompts=3"),
                                RunDir(run))
    assert len(train) == 4 and len(evals) == 3 and (run / "data" / "toy_eval.jsonl").exists()


def test_batch_larger_than_memory_is_refused_naming_the_field():
    """Issue 25 row 7: the rows a stage holds at once x their tokens against the memory available, before any
    compute (n_samples=1e9 was accepted and killed by the OOM killer after a minute)."""
    from erpd_megatron.pipeline.checks import BYTES_PER_TOKEN, available_memory, check_memory

    cfg = _cfg("data.prompts_per_batch=16", "rollout.n_samples=4", "eval.k=2")
    need = 16 * 4 * 64 * BYTES_PER_TOKEN  # the fixed batch: 64 rows of up to 64 tokens
    check_memory(cfg, seq_len=64, eval_problems=16, available=need)
    with pytest.raises(ConfigError, match=r"^rollout.n_samples=4: a batch of data.prompts_per_batch x rollout.n_samples"
                                          r" = 16 x 4 = 64 sequences of up to 64 tokens needs .* GiB is available; "
                                          r"lower rollout.n_samples$"):
        check_memory(cfg, seq_len=64, eval_problems=16, available=need - 1)
    big_eval = _cfg("data.prompts_per_batch=16", "rollout.n_samples=4", "eval.k=8")  # 40 x 8 = 320 rows > 64
    with pytest.raises(ConfigError, match=r"^eval.k=8: a batch of eval problems x eval.k = 40 x 8 = 320 sequences"):
        check_memory(big_eval, seq_len=64, eval_problems=40, available=need)
    huge = _cfg("data.prompts_per_batch=1024", "rollout.n_samples=65536", "teachers.ce.mini_batch_size=8")
    with pytest.raises(ConfigError, match="^rollout.n_samples=65536: .* lower rollout.n_samples$"):
        check_memory(huge, seq_len=4096, eval_problems=16)  # 64M rows x 4096 tokens: more than any machine
    assert available_memory() > 0


def test_long_instruction_is_named_before_the_prompts_are_tokenized():
    """Issue 25 row 11: an instruction longer than the model's positions is refused naming data.instruction (a
    1 MB one was tokenized with every prompt for 44 s, then refused naming a prompt)."""
    from erpd_megatron.toy.tokenizer import build_tokenizer

    tok = build_tokenizer()
    cfg = _cfg("rollout.max_new_tokens=40", "data.instruction=" + "1+" * 15)
    calls = []
    with pytest.raises(ConfigError, match=r"^data.instruction takes \d+ tokens with a one-character problem: with "
                                          r"rollout.max_new_tokens=40 it exceeds the model's 64 positions"):
        check_prompt_lengths(cfg, _Counting(tok, calls), _prompts(100), max_positions=64)
    assert len(calls) == 1  # the instruction alone, not 100 prompts
    assert check_prompt_lengths(_cfg("rollout.max_new_tokens=40"), tok, _prompts(3), max_positions=64) == 7


class _Counting:
    """A tokenizer that counts its calls."""

    def __init__(self, tok, calls):
        self.tok, self.calls = tok, calls
        self.chat_template = tok.chat_template

    def apply_chat_template(self, *a, **k):
        return self.tok.apply_chat_template(*a, **k)

    def __call__(self, *a, **k):
        self.calls.append(a)
        return self.tok(*a, **k)


@pytest.mark.parametrize("overrides, need", [(["iterations=4000", "data.prompts_per_batch=64"], r"64 \* 4000 = 256000"),
                                             (["data.prompts_per_batch=100000"], r"100000 \* 1 = 100000")])
def test_toy_data_larger_than_the_task_is_refused_like_a_jsonl(tmp_path, overrides, need):
    """Issue 25 row 8: asking the toy task for more prompts than it has was a ValueError traceback from the toy
    task; now at most the whole task is drawn and the size check refuses, as for a JSONL file."""
    from erpd_megatron.pipeline.context import load_prompts
    from erpd_megatron.pipeline.rundir import RunDir

    cfg = _cfg(f"run_dir={tmp_path}", *overrides)
    train, evals = load_prompts(cfg, RunDir(tmp_path))
    assert len(train) == 56704  # the whole toy training task
    with pytest.raises(ConfigError, match=rf"^data.train: toy has 56704 prompts, fewer than data.prompts_per_batch "
                                          rf"\* iterations = {need}"):
        check_dataset_sizes(cfg, train, evals)
