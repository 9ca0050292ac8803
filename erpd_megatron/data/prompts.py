"""Prompt datasets (JSONL or Parquet) and chat-template application.

A record has `problem` (str, non-empty), `answer` (str, or a JSON/Parquet number, kept as its text)
and optionally `id` (str or int; default "<file stem>-<row>"). Other fields are kept in `Prompt.meta`.
A malformed record raises `PromptDataError` naming the file and the row: for JSONL the 1-based line
number, for Parquet the 1-based row number. Blank JSONL lines are skipped.

Prompts are rendered with the tokenizer's chat template (`add_generation_prompt=True`) as a single
user turn: problem + instruction suffix. A tokenizer without a chat template gets the raw text (the
toy tokenizer, base models); that fallback is logged once per tokenizer class.
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


class PromptDataError(ValueError):
    """A malformed prompt file or record; the message names the file and row."""


@dataclass(frozen=True)
class Prompt:
    id: str
    problem: str
    answer: str
    meta: dict = field(default_factory=dict, compare=False)


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


def _check_record(rec: Any, where: str, auto_id: str) -> Prompt:
    if not isinstance(rec, dict):
        raise PromptDataError(f"{where}: expected an object with 'problem' and 'answer', got {type(rec).__name__}")
    rec, is_code = _code_record(rec, where)
    for key in ("problem", "answer"):
        if key not in rec or rec[key] is None:
            raise PromptDataError(f"{where}: missing field {key!r}")
    problem, answer = rec["problem"], rec["answer"]
    if not isinstance(problem, str):
        raise PromptDataError(f"{where}: field 'problem' must be a string, got {type(problem).__name__}")
    if isinstance(answer, bool) or not isinstance(answer, str | int | float):
        raise PromptDataError(f"{where}: field 'answer' must be a string or number, got {type(answer).__name__}")
    if isinstance(answer, float) and not math.isfinite(answer):
        raise PromptDataError(f"{where}: field 'answer' is {answer}")
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)  # Parquet/pandas often turn integer answers into floats: 42.0 -> "42"
    answer = str(answer)
    if not problem.strip():
        raise PromptDataError(f"{where}: field 'problem' is empty")
    if not answer.strip() and not is_code:
        raise PromptDataError(f"{where}: field 'answer' is empty")
    pid = rec.get("id")
    if pid is None:
        pid = auto_id
    elif isinstance(pid, bool) or not isinstance(pid, str | int):
        raise PromptDataError(f"{where}: field 'id' must be a string or int, got {type(pid).__name__}")
    elif isinstance(pid, str) and not pid.strip():
        raise PromptDataError(f"{where}: field 'id' is empty")
    meta = {k: v for k, v in rec.items() if k not in ("problem", "answer", "id")}
    return Prompt(id=str(pid), problem=problem, answer=answer, meta=meta)


def _iter_jsonl(path: Path) -> Iterator[tuple[str, str, Any]]:
    with open(path, encoding="utf-8") as f:
        try:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno} (line {lineno})"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PromptDataError(f"{where}: invalid JSON: {e.msg} at column {e.colno}") from None
                except RecursionError:  # json's parser recurses once per nesting level
                    raise PromptDataError(f"{where}: invalid JSON: nested too deeply (arrays / objects more than "
                                          f"~{sys.getrecursionlimit()} levels deep)") from None
                yield where, f"{path.stem}-{lineno}", rec
        except UnicodeDecodeError as e:
            raise PromptDataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start} of a line)") from None


def _iter_parquet(path: Path) -> Iterator[tuple[str, str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise PromptDataError(f"{path}: not a readable Parquet file: {e}") from None
    from erpd_megatron.rewards.code_tests import CODE_TEST_KEYS

    code_columns = set(CODE_TEST_KEYS) | {"reward_model"}  # code data: each row is checked as a code record
    for key in ("problem", "answer") if not code_columns & set(table.column_names) else ():
        if key not in table.column_names:
            raise PromptDataError(f"{path}: missing column {key!r} (columns: {table.column_names})")
    for i, rec in enumerate(table.to_pylist(), start=1):
        yield f"{path} (row {i})", f"{path.stem}-{i}", rec


def load_prompts(path: str | os.PathLike) -> list[Prompt]:
    """Read and validate every record of a JSONL or Parquet prompt file; ids must be unique."""
    path = Path(path)
    if not path.is_file():
        raise PromptDataError(f"{path}: prompt file not found")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        rows = _iter_jsonl(path)
    elif suffix in PARQUET_SUFFIXES:
        rows = _iter_parquet(path)
    else:
        raise PromptDataError(f"{path}: unknown prompt file type {suffix!r} (use {JSONL_SUFFIXES + PARQUET_SUFFIXES})")
    prompts: list[Prompt] = []
    first_seen: dict[str, str] = {}
    for where, auto_id, rec in rows:
        p = _check_record(rec, where, auto_id)
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
    def from_file(cls, path: str | os.PathLike) -> PromptDataset:
        return cls(load_prompts(path), source=str(path))

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


def render_prompt(
    tokenizer: Any, problem: str, instruction: str | None = DEFAULT_INSTRUCTION, system: str | None = None
) -> str:
    """Prompt text for generation: chat template with generation prompt, or the raw user message."""
    text = user_message(problem, instruction)
    if not has_chat_template(tokenizer):
        name = type(tokenizer).__name__
        if name not in _warned_no_template:
            _warned_no_template.add(name)
            logger.warning("tokenizer %s has no chat template: prompts are the raw problem text + instruction", name)
        return text
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompts(
    tokenizer: Any,
    prompts: Sequence[Prompt | str],
    instruction: str | None = DEFAULT_INSTRUCTION,
    system: str | None = None,
) -> list[list[int]]:
    """Token ids of each rendered prompt. Special tokens come from the template, so none are added."""
    out = []
    for p in prompts:
        problem = p.problem if isinstance(p, Prompt) else p
        text = render_prompt(tokenizer, problem, instruction=instruction, system=system)
        add_special = not has_chat_template(tokenizer)  # raw text: let the tokenizer add its BOS if any
        ids = tokenizer(text, add_special_tokens=add_special)["input_ids"]
        out.append([int(t) for t in ids])
    return out
