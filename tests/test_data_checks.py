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


def _toy_encode():
    from erpd_megatron.data.prompts import encode_prompts
    from erpd_megatron.toy.tokenizer import build_tokenizer

    tok = build_tokenizer()  # one token per character, chat template adds <|bos|><|user|> ... <|assistant|>
    return lambda prompts: encode_prompts(tok, prompts, instruction=None)


def test_prompt_longer_than_the_model_positions_is_refused():
    enc = _toy_encode()
    cfg = _cfg("rollout.max_new_tokens=40", "data.prompts_per_batch=2", "data.eval_prompts=1")
    short, long_ = _prompts(3), [Prompt(id="long-one", problem="1+" * 10 + "1=", answer="11")]
    assert check_prompt_lengths(cfg, enc, short, short, max_positions=64) == (short, short, len(enc(short)[0]))
    n_long = 3 + len("1+" * 10 + "1=")  # 25 tokens: 25 + 40 > 64
    with pytest.raises(ConfigError, match=rf"prompt 'long-one' has {n_long} tokens, more than 24 \(the model's 64 "
                                          r"positions minus rollout.max_new_tokens=40\)"):
        check_prompt_lengths(cfg, enc, short, short + long_, max_positions=64)
    check_prompt_lengths(cfg, enc, short, short + long_, max_positions=65)  # 25 + 40 = 65 fits exactly
    with pytest.raises(ConfigError, match="rollout.max_new_tokens=40 leaves no room"):
        check_prompt_lengths(cfg, enc, short, short, max_positions=40)
    # data.max_prompt_length is its own limit, and may not promise more than the positions hold
    with pytest.raises(ConfigError, match=r"more than 6 \(data.max_prompt_length=6\)"):
        check_prompt_lengths(_cfg("data.max_prompt_length=6"), enc, short, short, max_positions=64)
    with pytest.raises(ConfigError, match="data.max_prompt_length=30 \\+ rollout.max_new_tokens=40 exceeds"):
        check_prompt_lengths(_cfg("data.max_prompt_length=30"), enc, short, short, max_positions=64)


def test_overlong_prompts_filtered_with_one_warning(caplog):
    enc = _toy_encode()
    long_ = [Prompt(id=f"long{i}", problem="1+" * 10 + "1=", answer="11") for i in range(2)]
    cfg = _cfg("data.prompts_per_batch=3", "data.eval_prompts=2", "data.overlong_prompts=filter",
               "data.max_prompt_length=10")
    with caplog.at_level(logging.WARNING, logger="erpd"):
        train, evals, longest = check_prompt_lengths(cfg, enc, _prompts(3) + long_, long_[:1] + _prompts(2, prefix="e"),
                                                     64)
    assert longest == max(len(x) for x in enc(train + evals)) <= 10  # of the prompts kept
    assert [p.id for p in train] == ["p0", "p1", "p2"] and [p.id for p in evals] == ["e0", "e1"]
    assert "data.train: 2 of 5 prompts are longer than 10 tokens" in caplog.text
    assert "data.eval: 1 of 3 prompts" in caplog.text
    with pytest.raises(ConfigError, match="data.train: toy has 2 prompts, fewer than"):  # sizes checked again
        check_prompt_lengths(cfg, enc, _prompts(2) + long_, _prompts(2), 64)
    with pytest.raises(ConfigError, match="overlong_prompts must be 'refuse' or 'filter'"):
        _cfg("data.overlong_prompts=drop")


def test_empty_tokenizer_or_no_template_for_chat_data_is_refused(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from erpd_megatron.pipeline.checks import check_tokenizer
    from erpd_megatron.toy.tokenizer import build_tokenizer

    chat = Prompt("c", "hi", "1", messages=({"role": "user", "content": "hi"},))
    tok = build_tokenizer()
    tok.chat_template = None
    check_tokenizer(tok, tmp_path, _prompts(2), "model.base")  # text prompts: raw text is fine
    with pytest.raises(ConfigError, match=r"model.base: .* has no chat template, but prompt 'c' is a chat-message"):
        check_tokenizer(tok, tmp_path, [chat], "model.base")
    from tokenizers import Tokenizer, models

    empty = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab={}, unk_token=None)))
    with pytest.raises(ConfigError, match="has an empty tokenizer"):
        check_tokenizer(empty, tmp_path, _prompts(1), "model.base")


def test_custom_base_needs_an_eval_set(tmp_path):
    with pytest.raises(ConfigError, match=r"^data.eval is not set: give a benchmark file to evaluate "
                                          r"model.base=/m/x on \(or data.eval=toy"):
        _cfg("model.base=/m/x")
    assert _cfg("model.base=/m/x", "data.eval=toy").data.eval == "toy"  # said explicitly: allowed
    assert _cfg().data.eval == "toy"  # the toy base: unset means the toy problems


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
    from erpd_megatron.data.prompts import encode_prompts
    from erpd_megatron.toy.tokenizer import build_tokenizer

    tok = build_tokenizer()
    cfg = _cfg("rollout.max_new_tokens=40", "data.instruction=" + "1+" * 15)
    calls = []
    counting = _Counting(tok, calls)
    with pytest.raises(ConfigError, match=r"^data.instruction takes \d+ tokens with a one-character problem: with "
                                          r"rollout.max_new_tokens=40 it exceeds the model's 64 positions"):
        check_prompt_lengths(cfg, lambda ps: encode_prompts(counting, ps, instruction=cfg.data.instruction),
                             _prompts(100), [], max_positions=64)
    assert len(calls) == 1  # the instruction alone, not 100 prompts
    assert check_prompt_lengths(_cfg("rollout.max_new_tokens=40"), lambda ps: encode_prompts(tok, ps, instruction=None),
                                _prompts(3), [], max_positions=64)[2] == 7


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
