"""Prompt datasets: JSONL / Parquet loading, errors naming file + row, chat-template rendering."""

import json
import logging
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from erpd_megatron.data import prompts as prompts_mod
from erpd_megatron.data.prompts import (
    DEFAULT_INSTRUCTION,
    Prompt,
    PromptDataError,
    PromptDataset,
    encode_prompts,
    load_prompts,
    render_prompt,
)


def write_jsonl(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def test_jsonl_round_trip_and_auto_ids(tmp_path):
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"id": "a", "problem": "1+1?", "answer": "2", "level": 3},
            "",  # blank lines are skipped but still counted
            {"problem": "Half of 1?", "answer": "\\frac{1}{2}"},
            {"id": 7, "problem": "6*7?", "answer": 42},
            {"problem": "pi to 2 places?", "answer": 3.14},
            {"problem": "2.0 as int?", "answer": 2.0},
        ],
    )
    prompts = load_prompts(path)
    assert [p.id for p in prompts] == ["a", "train-3", "7", "train-5", "train-6"]
    assert [p.answer for p in prompts] == ["2", "\\frac{1}{2}", "42", "3.14", "2"]
    assert prompts[0].meta == {"level": 3} and prompts[1].meta == {}
    ds = PromptDataset.from_file(path)
    assert len(ds) == 5 and ds[2] == Prompt("7", "6*7?", "42") and "5 prompts" in repr(ds)


def test_parquet_round_trip(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"problem": ["a?", "b?"], "answer": ["1", "2"], "src": ["x", "y"]}), path)
    prompts = load_prompts(path)
    assert prompts == [Prompt("p-1", "a?", "1"), Prompt("p-2", "b?", "2")]
    assert prompts[1].meta == {"src": "y"}
    pq.write_table(pa.table({"id": ["u", "v"], "problem": ["a?", "b?"], "answer": [10, 20]}), path)
    assert [(p.id, p.answer) for p in load_prompts(path)] == [("u", "10"), ("v", "20")]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"problem": "x", "answer": ', "invalid JSON"),
        ('{"answer": "1"}', "missing field 'problem'"),
        ('{"problem": "x"}', "missing field 'answer'"),
        ('{"problem": "x", "answer": null}', "missing field 'answer'"),
        ('{"problem": "   ", "answer": "1"}', "field 'problem' is empty"),
        ('{"problem": "x", "answer": ""}', "field 'answer' is empty"),
        ('{"problem": 5, "answer": "1"}', "field 'problem' must be a string or a list of chat messages, got int"),
        ('{"problem": "x", "answer": [1, 2]}', "field 'answer' must be a string or number, got list"),
        ('{"problem": "x", "answer": true}', "field 'answer' must be a string or number, got bool"),
        ('{"problem": "x", "answer": "1", "id": {"a": 1}}', "field 'id' must be a string or int"),
        ('["problem", "answer"]', "expected an object"),
        ('{"id": "ok", "problem": "x", "answer": "1"}', "duplicate id 'ok' \\(first at .*:1 "),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "ok", "problem": "p", "answer": "1"}, "", bad_line])
    with pytest.raises(PromptDataError, match=message) as e:
        load_prompts(path)
    assert f"{path}:3 (line 3)" in str(e.value)


def test_parquet_errors_name_file_and_row(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"problem": ["a?", None, "c?"], "answer": ["1", "2", "3"]}), path)
    with pytest.raises(PromptDataError, match=re.escape(f"{path} (row 2): missing field 'problem'")):
        load_prompts(path)
    pq.write_table(pa.table({"query": ["a?"], "answer": ["1"]}), path)
    with pytest.raises(PromptDataError, match=r"missing column 'problem' \(nor any of \['prompt', 'question', "
                                              r"'messages'\]; set data.prompt_key\)"):
        load_prompts(path)
    with pytest.raises(PromptDataError, match="missing column 'q'"):
        load_prompts(path, prompt_key="q")
    assert load_prompts(path, prompt_key="query")[0].problem == "a?"
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(PromptDataError, match="not a readable Parquet file"):
        load_prompts(path)


def test_file_level_errors(tmp_path):
    with pytest.raises(PromptDataError, match="not found"):
        load_prompts(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("problem,answer\n")
    with pytest.raises(PromptDataError, match="unknown prompt file type '.csv'"):
        load_prompts(tmp_path / "x.csv")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(PromptDataError, match="no records"):
        load_prompts(tmp_path / "empty.jsonl")
    (tmp_path / "latin.jsonl").write_bytes(b'{"problem": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(PromptDataError, match="not UTF-8"):
        load_prompts(tmp_path / "latin.jsonl")


# ----------------------------------------------------------------------------- chat template

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
QWEN_LIKE_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def char_tokenizer(template):
    """A character-level HF tokenizer (printable ASCII + newline + 3 specials), built offline."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + [chr(c) for c in range(32, 127)] + ["\n", "<unk>"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>"
    )
    hf.chat_template = template
    return hf, vocab


def hand_encode(text, vocab):
    ids, i = [], 0
    while i < len(text):
        special = next((s for s in SPECIALS if text.startswith(s, i)), None)
        tok = special or text[i]
        ids.append(vocab[tok])
        i += len(tok)
    return ids


def test_render_with_chat_template():
    tok, vocab = char_tokenizer(QWEN_LIKE_TEMPLATE)
    text = render_prompt(tok, "What is 2+3?")
    expected = f"<|im_start|>user\nWhat is 2+3?\n{DEFAULT_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
    assert text == expected
    assert DEFAULT_INSTRUCTION == "Please reason step by step, and put your final answer within \\boxed{}."
    with_system = render_prompt(tok, "Q", instruction="Answer briefly.", system="You are terse.")
    assert with_system == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nQ\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render_prompt(tok, "Q", instruction=None).startswith("<|im_start|>user\nQ<|im_end|>")
    ids = encode_prompts(tok, [Prompt("a", "What is 2+3?", "5"), "Q"], instruction=None)
    assert ids[0] == hand_encode("<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n", vocab)
    assert ids[1] == hand_encode("<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n", vocab)


def test_no_template_falls_back_to_raw_text(caplog, monkeypatch):
    monkeypatch.setattr(prompts_mod, "_warned_no_template", set())
    tok, vocab = char_tokenizer(None)
    with caplog.at_level(logging.WARNING, logger="erpd_megatron.data.prompts"):
        text = render_prompt(tok, "1+1?", instruction="Box it.")
        render_prompt(tok, "2+2?")
    assert text == "1+1?\nBox it."
    notes = [r.getMessage() for r in caplog.records if "no chat template" in r.getMessage()]
    assert len(notes) == 1  # said once per tokenizer class
    assert encode_prompts(tok, ["1+1?"], instruction="Box it.") == [hand_encode("1+1?\nBox it.", vocab)]


def test_deeply_nested_row_is_a_one_line_error(tmp_path):
    """Issue 25 row 6: a 2,000-deep array in an extra field made json raise RecursionError (a traceback)."""
    path = write_jsonl(tmp_path / "deep.jsonl", [{"problem": "p", "answer": "1"},
                                                 '{"problem": "x", "answer": "1", "extra": ' + "[" * 2000 + "]" * 2000
                                                 + "}"])
    with pytest.raises(PromptDataError, match=re.escape(f"{path}:2 (line 2): invalid JSON: nested too deeply")):
        load_prompts(path)


# ----------------------------------------------------------------------------- other people's formats


VERL_ROWS = {
    "data_source": ["openai/gsm8k", "lighteval/MATH"],
    "prompt": [[{"role": "user", "content": "Natalia sold 48 clips. Output the final answer after ####."}],
               [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}]],
    "ability": ["math", "math"],
    "reward_model": [{"style": "rule", "ground_truth": "72"}, {"style": "rule", "ground_truth": "2"}],
    "extra_info": [{"split": "train", "index": 0}, {"split": "train", "index": 1}],
}


def test_verl_parquet_chat_messages_and_dotted_answer(tmp_path):
    """verl's layout: `prompt` as chat messages, the gold under reward_model.ground_truth, data_source and
    extra_info kept in meta; found without any key given, and with the keys given explicitly."""
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table(VERL_ROWS), path)
    for kw in ({}, {"prompt_key": "prompt", "answer_key": "reward_model.ground_truth"}):
        ps = load_prompts(path, **kw)
        assert [p.answer for p in ps] == ["72", "2"] and ps[0].data_source == "openai/gsm8k"
        assert ps[1].messages[0] == {"role": "system", "content": "Be brief."} and ps[1].problem == "1+1?"
        assert ps[0].meta["extra_info"] == {"split": "train", "index": 0} and "prompt" not in ps[0].meta
        assert ps[0].meta["reward_model"]["style"] == "rule"  # a dotted key's parent stays in meta
    tok, vocab = char_tokenizer(QWEN_LIKE_TEMPLATE)
    ps = load_prompts(path)
    # messages are rendered as given: no instruction added, the record's own system turn kept over data.system
    assert render_prompt(tok, ps[1], instruction="X", system="Other.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n")
    assert render_prompt(tok, ps[0], system="S.").startswith("<|im_start|>system\nS.<|im_end|>\n<|im_start|>user\nNat")


@pytest.mark.parametrize("rec, keys, problem, answer", [
    ({"question": "2+2?", "answer": "#### 4"}, {}, "2+2?", "#### 4"),  # GSM8K
    ({"prompt": "2+2?", "solution": "\\boxed{4}"}, {}, "2+2?", "\\boxed{4}"),
    ({"messages": [{"role": "user", "content": "2+2?"}], "label": 4}, {}, "2+2?", "4"),
    ({"input": {"text": "2+2?"}, "output": "4"}, {"prompt_key": "input.text", "answer_key": "output"}, "2+2?", "4"),
])
def test_common_jsonl_layouts(tmp_path, rec, keys, problem, answer):
    path = write_jsonl(tmp_path / "d.jsonl", [rec])
    (p,) = load_prompts(path, **keys)
    assert (p.problem, p.answer) == (problem, answer)


def test_mapping_errors_name_row_and_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "answer": "1"}, {"problem": "b", "answer": "2"}])
    with pytest.raises(PromptDataError, match=r"d.jsonl:2 \(line 2\): missing field 'question'"):
        load_prompts(path)  # keys are chosen once per file, from its first record
    path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": [{"role": "user", "content": 3}], "answer": "1"}])
    with pytest.raises(PromptDataError, match=r"e.jsonl:1 \(line 1\): field 'prompt'\[0\] must be a"):
        load_prompts(path)
    path = write_jsonl(tmp_path / "f.jsonl", [{"prompt": [{"role": "system", "content": "x"}], "answer": "1"}])
    with pytest.raises(PromptDataError, match="field 'prompt' has no non-empty user message"):
        load_prompts(path)
    path = write_jsonl(tmp_path / "g.jsonl", [{"q": "a", "reward_model": {"style": "rule"}}])
    with pytest.raises(PromptDataError, match="missing field 'reward_model.ground_truth'$"):
        load_prompts(path, prompt_key="q", answer_key="reward_model.ground_truth")


def test_instruction_rule_and_template_kwargs():
    from erpd_megatron.data.prompts import resolve_instruction

    tok, _ = char_tokenizer(QWEN_LIKE_TEMPLATE + "{% if enable_thinking is defined and not enable_thinking %}"
                            "<think>\n\n</think>\n\n{% endif %}")
    assert resolve_instruction("auto") == DEFAULT_INSTRUCTION and resolve_instruction("auto", toy=True) is None
    assert resolve_instruction("") is None and resolve_instruction("Box it.", toy=True) == "Box it."
    text = render_prompt(tok, "Q", instruction=None, chat_template_kwargs={"enable_thinking": False})
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert encode_prompts(tok, ["Q"], instruction=None, chat_template_kwargs={"enable_thinking": False}) != \
        encode_prompts(tok, ["Q"], instruction=None)
