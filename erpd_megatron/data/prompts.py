"""Prompt datasets (JSONL or Parquet) and chat-template application.

A record has a prompt, a gold answer and optionally `id` (str or int; default "<file stem>-<row>"); other
fields are kept in `Prompt.meta` (verl's `data_source`, `extra_info`, ...). Which fields: `prompt_key` /
`answer_key` (dotted paths into nested objects, e.g. `reward_model.ground_truth`), or, left empty, the first
of PROMPT_KEYS / ANSWER_KEYS the file's first record has. The prompt is text (`problem`, `question`) or a
chat-message list (verl's `prompt`: [{"role": "user", "content": ...}, ...]); the answer a string, or a
JSON/Parquet number kept as its text. A malformed record raises `PromptDataError` naming the file and the
row: for JSONL the 1-based line number, for Parquet the 1-based row number. Blank JSONL lines are skipped.

Prompts are rendered with the tokenizer's chat template (`add_generation_prompt=True`): a text prompt as a
single user turn, problem + instruction suffix; a message list as given (it carries its own instructions).
A tokenizer without a chat template gets the raw text (the toy tokenizer, base models); that fallback is
logged once per tokenizer class.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
#: what an empty prompt_key / answer_key looks for, in this order (ours, verl, GSM8K, chat dumps)
PROMPT_KEYS = ("problem", "prompt", "question", "messages")
ANSWER_KEYS = ("answer", "reward_model.ground_truth", "ground_truth", "solution", "label")


class PromptDataError(ValueError):
    """A malformed prompt file or record; the message names the file and row."""


@dataclass(frozen=True)
class Prompt:
    id: str
    problem: str
    """The prompt text; for a chat-message prompt, the content of its last user message (judge, display)."""
    answer: str
    meta: dict = field(default_factory=dict, compare=False)
    messages: tuple | None = field(default=None, compare=False)
    """A chat-message prompt as given ({"role", "content"} dicts), rendered instead of `problem`; None: text."""

    @property
    def data_source(self) -> str:
        """verl's `data_source` field ("" when the record has none): what picks the reward."""
        return str(self.meta.get("data_source") or "")


def _code_record(rec: dict, where: str) -> tuple[dict, bool]:
    """A record carrying test cases (rewards/code_tests.py) is a code record: its prompt may sit in its format's
    field (LiveCodeBench question_content, APPS question, HumanEval prompt, MBPP text), it needs no answer, and its
    tests must parse. Other records are returned as they are."""
    from erpd_megatron.rewards.code_tests import CODE_PROMPT_KEYS, CodeTestError, has_tests, parse_tests

    if not has_tests(rec):
        return rec, False
    try:
        parse_tests(rec)
    except CodeTestError as e:
        raise PromptDataError(f"{where}: {e}") from None
    if rec.get("problem") is None:
        key = next((k for k in CODE_PROMPT_KEYS if isinstance(rec.get(k), str) and rec[k].strip()), None)
        if key is None:
            raise PromptDataError(f"{where}: code record without a prompt (one of 'problem', {CODE_PROMPT_KEYS})")
        rec = {**rec, "problem": rec[key]}
    return {**rec, "answer": "" if rec.get("answer") is None else rec["answer"]}, True


def lookup(rec: dict, key: str) -> Any:
    """rec["a"]["b"] for key "a.b"; None when any part is missing."""
    cur: Any = rec
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def resolve_keys(rec: Any, prompt_key: str = "", answer_key: str = "") -> tuple[str, str]:
    """The (prompt, answer) keys a file uses: the given ones, else the first of PROMPT_KEYS / ANSWER_KEYS that
    `rec` (its first record) has; when none is there, the first candidate (its error then names it)."""
    rec = rec if isinstance(rec, dict) else {}
    pk = prompt_key or next((k for k in PROMPT_KEYS if lookup(rec, k) is not None), PROMPT_KEYS[0])
    ak = answer_key or next((k for k in ANSWER_KEYS if lookup(rec, k) is not None), ANSWER_KEYS[0])
    return pk, ak


def _missing(key: str, given: str, which: str) -> str:
    hint = "" if given else f" (nor any of {list(PROMPT_KEYS if which == 'prompt' else ANSWER_KEYS)[1:]}; " \
                            f"set data.{which}_key)"
    return f"missing field {key!r}{hint}"


def _messages(value: list, where: str, key: str) -> tuple:
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise PromptDataError(f"{where}: field {key!r}[{i}] must be a {{'role': str, 'content': str}} message")
    if not any(m["role"] == "user" and m["content"].strip() for m in value):
        raise PromptDataError(f"{where}: field {key!r} has no non-empty user message")
    return tuple({"role": m["role"], "content": m["content"]} for m in value)


def _check_record(rec: Any, where: str, auto_id: str, prompt_key: str = "", answer_key: str = "",
                  keys: tuple[str, str] | None = None) -> Prompt:
    """`keys`: the file's resolved (prompt, answer) keys; `prompt_key` / `answer_key`: what the user gave."""
    if not isinstance(rec, dict):
        raise PromptDataError(f"{where}: expected an object with a prompt and an answer, got {type(rec).__name__}")
    rec, is_code = _code_record(rec, where)
    pk, ak = keys or resolve_keys(rec, prompt_key, answer_key)
    problem, answer = lookup(rec, pk), lookup(rec, ak)
    if problem is None and is_code:  # the prompt sits in the code format's own field (_code_record)
        pk, problem = "problem", rec["problem"]
    if problem is None:
        raise PromptDataError(f"{where}: {_missing(pk, prompt_key, 'prompt')}")
    if answer is None:
        if not is_code:
            raise PromptDataError(f"{where}: {_missing(ak, answer_key, 'answer')}")
        answer = ""  # a code record is judged by its tests
    messages = None
    if isinstance(problem, list):  # verl / OpenAI chat messages
        messages = _messages(problem, where, pk)
        problem = next(m["content"] for m in reversed(messages) if m["role"] == "user" and m["content"].strip())
    elif not isinstance(problem, str):
        raise PromptDataError(f"{where}: field {pk!r} must be a string or a list of chat messages, "
                              f"got {type(problem).__name__}")
    if isinstance(answer, bool) or not isinstance(answer, str | int | float):
        raise PromptDataError(f"{where}: field {ak!r} must be a string or number, got {type(answer).__name__}")
    if isinstance(answer, float) and not math.isfinite(answer):
        raise PromptDataError(f"{where}: field {ak!r} is {answer}")
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)  # Parquet/pandas often turn integer answers into floats: 42.0 -> "42"
    answer = str(answer)
    if not problem.strip():
        raise PromptDataError(f"{where}: field {pk!r} is empty")
    if not answer.strip() and not is_code:
        raise PromptDataError(f"{where}: field {ak!r} is empty")
    pid = rec.get("id")
    if pid is None:
        pid = auto_id
    elif isinstance(pid, bool) or not isinstance(pid, str | int):
        raise PromptDataError(f"{where}: field 'id' must be a string or int, got {type(pid).__name__}")
    elif isinstance(pid, str) and not pid.strip():
        raise PromptDataError(f"{where}: field 'id' is empty")
    used = {k for k in (pk, ak) if "." not in k} | {"id"}  # a nested key's parent stays (verl's reward_model)
    meta = {k: v for k, v in rec.items() if k not in used}
    return Prompt(id=str(pid), problem=problem, answer=answer, meta=meta, messages=messages)


def parse_json_line(line: str, where: str, error: type[Exception] | None = None) -> Any:
    """``json.loads(line)``; a bad line raises ``error`` (default PromptDataError) as one message naming ``where``.
    Also used for `erpd reward`'s responses file (rewards/score_cli.py)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise (error or PromptDataError)(f"{where}: invalid JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:  # json's parser recurses once per nesting level
        raise (error or PromptDataError)(f"{where}: invalid JSON: nested too deeply (arrays / objects more than "
                                         f"~{sys.getrecursionlimit()} levels deep)") from None


def _iter_jsonl(path: Path) -> Iterator[tuple[str, str, Any]]:
    with open(path, encoding="utf-8") as f:
        try:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno} (line {lineno})"
                yield where, f"{path.stem}-{lineno}", parse_json_line(line, where)
        except UnicodeDecodeError as e:
            raise PromptDataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start} of a line)") from None


def _iter_parquet(path: Path, prompt_key: str = "", answer_key: str = "") -> Iterator[tuple[str, str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise PromptDataError(f"{path}: not a readable Parquet file: {e}") from None
    from erpd_megatron.rewards.code_tests import CODE_TEST_KEYS

    rows = table.to_pylist()
    first = {c: (rows[0][c] if rows else True) for c in table.column_names}  # column presence decides
    code_columns = set(CODE_TEST_KEYS) | {"reward_model"}  # code data: each row is checked as a code record
    for key, given, which in zip(resolve_keys(first, prompt_key, answer_key), (prompt_key, answer_key),
                                 ("prompt", "answer")):
        if key.split(".")[0] not in table.column_names and not code_columns & set(table.column_names):
            raise PromptDataError(f"{path}: {_missing(key, given, which).replace('field', 'column')} "
                                  f"(columns: {table.column_names})")
    for i, rec in enumerate(rows, start=1):
        yield f"{path} (row {i})", f"{path.stem}-{i}", rec


def load_prompts(path: str | os.PathLike, prompt_key: str = "", answer_key: str = "") -> list[Prompt]:
    """Read and validate every record of a JSONL or Parquet prompt file; ids must be unique. `prompt_key` /
    `answer_key`: dotted field paths ("" = the first of PROMPT_KEYS / ANSWER_KEYS in the first record)."""
    path = Path(path)
    if not path.is_file():
        raise PromptDataError(f"{path}: prompt file not found")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        rows = _iter_jsonl(path)
    elif suffix in PARQUET_SUFFIXES:
        rows = _iter_parquet(path, prompt_key, answer_key)
    else:
        raise PromptDataError(f"{path}: unknown prompt file type {suffix!r} (use {JSONL_SUFFIXES + PARQUET_SUFFIXES})")
    prompts: list[Prompt] = []
    first_seen: dict[str, str] = {}
    keys = None  # one pair of keys per file, from its first record: a later row without them is an error
    for where, auto_id, rec in rows:
        if keys is None and isinstance(rec, dict):
            keys = resolve_keys(rec, prompt_key, answer_key)
        p = _check_record(rec, where, auto_id, prompt_key, answer_key, keys)
        if p.id in first_seen:
            raise PromptDataError(f"{where}: duplicate id {p.id!r} (first at {first_seen[p.id]})")
        first_seen[p.id] = where
        prompts.append(p)
    if not prompts:
        raise PromptDataError(f"{path}: no records")
    return prompts


class PromptDataset(Sequence[Prompt]):
    """An in-memory list of validated prompts (datasets here are thousands of rows, not millions)."""

    def __init__(self, prompts: Sequence[Prompt], source: str = "<memory>"):
        self.prompts = list(prompts)
        self.source = source

    @classmethod
    def from_file(cls, path: str | os.PathLike, prompt_key: str = "", answer_key: str = "") -> PromptDataset:
        return cls(load_prompts(path, prompt_key, answer_key), source=str(path))

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i):
        return self.prompts[i]

    def __repr__(self) -> str:
        return f"PromptDataset({len(self)} prompts from {self.source})"


# ----------------------------------------------------------------------------- chat template

_warned_no_template: set[str] = set()


def user_message(problem: str, instruction: str | None = DEFAULT_INSTRUCTION) -> str:
    """The user turn: the problem, then the instruction suffix (None or "" for none)."""
    return f"{problem}\n{instruction}" if instruction else problem


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_instruction(spec: str | None, toy: bool = False) -> str | None:
    """The instruction suffix of text prompts, one rule for `erpd run` (data.instruction) and `erpd eval`
    (--instruction): "auto" = DEFAULT_INSTRUCTION, except for the toy task's model (`toy`: model.base=toy or a
    directory the toy warm-up wrote), whose prompts are bare arithmetic and whose character tokenizer cannot
    spell it; "" / None / "none" = none; anything else as written."""
    if spec == "auto":
        return None if toy else DEFAULT_INSTRUCTION
    return None if spec in (None, "", "none") else spec


def prompt_messages(prompt: Prompt | str, instruction: str | None = DEFAULT_INSTRUCTION,
                    system: str | None = None) -> list[dict]:
    """Chat messages of a prompt: a message list as given (no instruction added: it carries its own), or one
    user turn problem + instruction; `system` first unless the messages start with their own."""
    if isinstance(prompt, Prompt) and prompt.messages is not None:
        messages = [dict(m) for m in prompt.messages]
    else:
        problem = prompt.problem if isinstance(prompt, Prompt) else prompt
        messages = [{"role": "user", "content": user_message(problem, instruction)}]
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


def render_prompt(
    tokenizer: Any, problem: Prompt | str, instruction: str | None = DEFAULT_INSTRUCTION, system: str | None = None,
    chat_template_kwargs: dict | None = None,
) -> str:
    """Prompt text for generation: chat template with generation prompt (extra template variables from
    `chat_template_kwargs`, e.g. Qwen3's {"enable_thinking": False}), or the raw text without a template."""
    messages = prompt_messages(problem, instruction, system)
    if not has_chat_template(tokenizer):
        name = type(tokenizer).__name__
        if name not in _warned_no_template:
            _warned_no_template.add(name)
            logger.warning("tokenizer %s has no chat template: prompts are the raw problem text + instruction", name)
        return "\n".join(m["content"] for m in messages)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         **(chat_template_kwargs or {}))


def encode_prompts(
    tokenizer: Any,
    prompts: Sequence[Prompt | str],
    instruction: str | None = DEFAULT_INSTRUCTION,
    system: str | None = None,
    chat_template_kwargs: dict | None = None,
) -> list[list[int]]:
    """Token ids of each rendered prompt. Special tokens come from the template, so none are added."""
    out = []
    add_special = not has_chat_template(tokenizer)  # raw text: let the tokenizer add its BOS if any
    for p in prompts:
        text = render_prompt(tokenizer, p, instruction=instruction, system=system,
                             chat_template_kwargs=chat_template_kwargs)
        ids = tokenizer(text, add_special_tokens=add_special)["input_ids"]
        out.append([int(t) for t in ids])
    return out
