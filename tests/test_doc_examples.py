"""Every `erpd ...` command and every config override shown in README.md and docs/*.md parses with the real
loader (the CLI's own parser, presets resolved), so each one can be copied and pasted; `erpd eval` / `erpd plan`
examples in code blocks parse with their own argument parsers."""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest

from erpd_megatron.config import ConfigError, RunConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIG_SUBCOMMANDS = ("run", "demo", "collect", "teacher", "signals", "distill", "onpolicy", "iterate")
COMMAND = re.compile(rf"^(?:\$ )?erpd ({'|'.join(CONFIG_SUBCOMMANDS)}|eval|plan)\b")
OVERRIDE = re.compile(r"^'?([a-z_]+)(\.[A-Za-z0-9_]+)*=\S.*$")
TOP_LEVEL = {f.name for f in dataclasses.fields(RunConfig)}


def examples() -> list[tuple[str, str, bool]]:
    """(where, text, refused) of each `erpd <config subcommand> ...` line in a code block or inline code span, and
    of each inline `section.key=value` span whose section is a config field (Python keyword examples are not).
    An inline span followed by " ->" illustrates an error message: it must be refused."""
    out = []
    for f in DOCS:
        in_block, pending = False, ""
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if line.strip().startswith("```"):
                in_block = not in_block
                continue
            if in_block and line.rstrip().endswith("\\"):  # a command continued on the next line
                pending += line.rstrip()[:-1] + " "
                continue
            line, pending = pending + line.strip() if in_block else line, ""
            spans = [(line.strip(), False)] if in_block else \
                [(m.group(1), line[m.end():].startswith(" ->")) for m in re.finditer(r"`([^`]+)`", line)]
            for span, refused in spans:
                text = span.split("  #")[0].strip()
                m = OVERRIDE.match(text)
                cmd = COMMAND.match(text)
                if cmd and cmd.group(1) in ("eval", "plan") and not in_block:
                    continue  # inline `erpd plan --model` names a flag; their examples are in code blocks
                if cmd or (not in_block and m and m.group(1) in TOP_LEVEL):
                    out.append((f"{f.relative_to(ROOT)}:{n}", text, refused))
    return out


EXAMPLES = examples()


def test_examples_found():
    where = {w.split(":")[0] for w, _, _ in EXAMPLES}
    assert {"README.md", "docs/pipeline.md", "docs/demo.md"} <= where
    assert sum(COMMAND.match(t) is not None and "=" in t for _, t, _ in EXAMPLES) >= 3


@pytest.mark.parametrize("where, text, refused", EXAMPLES, ids=[w for w, _, _ in EXAMPLES])
def test_doc_example_parses(where, text, refused):
    if refused:  # shown with the error it gets
        with pytest.raises(ConfigError):
            _parse(text)
    else:
        _parse(text)


def _parse(text: str) -> None:
    from erpd_megatron.pipeline.demo import PRESET
    from erpd_megatron.pipeline.run import parse

    if "..." in text:  # a description of the syntax ("erpd run ... key=value"), not an example
        pytest.skip("placeholder")
    argv = shlex.split(text)
    if argv[0] == "$":
        argv = argv[1:]
    if argv[0] != "erpd":  # a lone override: applied to the defaults
        load_config(None, argv)
        return
    if argv[1] in ("eval", "plan"):  # flags only: the files they name are the reader's
        from erpd_megatron.planner import build_parser as plan_parser
        from erpd_megatron.rollout.eval import build_parser as eval_parser

        try:
            (eval_parser() if argv[1] == "eval" else plan_parser()).parse_args(argv[2:])
        except SystemExit as e:
            assert e.code == 0, f"{text}: argparse refused it"
        return
    rest = argv[2:]
    if argv[1] == "demo":  # `erpd demo k=v` = `erpd run --config <demo preset> k=v`
        rest = ["--config", str(PRESET), *rest]
    try:
        parse(rest, f"erpd {argv[1]}")
    except SystemExit as e:  # `--help` prints and exits 0; a bad flag exits 2
        assert e.code == 0, f"{text}: argparse refused it"
