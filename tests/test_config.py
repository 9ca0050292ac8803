"""Config: precedence CLI > file > defaults, validation before compute, YAML round trip."""

import subprocess
import sys

import pytest
import yaml

from erpd_megatron.config import ConfigError, RunConfig, load_config, save_config, to_dict


def test_defaults_validate():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert cfg.teachers["ce"].eps_high == 0.28  # paper default


def test_precedence_cli_over_file_over_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"seed": 7, "teachers": {"ce": {"lr": 1e-5, "steps": 30}}}))
    cfg = load_config(str(f), ["teachers.ce.lr=2e-6", "distill_unused=1"][:1])
    assert cfg.seed == 7
    assert cfg.teachers["ce"].lr == 2e-6  # CLI wins
    assert cfg.teachers["ce"].steps == 30  # file wins over default
    assert cfg.teachers["ce"].beta == 0.05  # default kept


def test_save_and_reload_roundtrip(tmp_path):
    cfg = load_config(None, ["students.s1.strategies=[1,2]", "students.s1.teacher=ce", "students.s1.unlearned_step=10"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(str(tmp_path / "config.yaml"))
    assert to_dict(again) == to_dict(cfg)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["teachers.ce.loss=dpo"], "teachers.ce.loss: unknown loss 'dpo'"),
        (["teachers.ce.lr=fast"], "teachers.ce.lr: expected float"),
        (["nonsense=1"], "unknown key(s) ['nonsense']"),
        (["students.s1_ce.strategies=[2]", "students.s1_ce.unlearned_step=7"], "strategy 2 needs an unlearned checkpoint"),
        (["students.s1_ce.strategies=[3]"], "strategy 3 needs `weak`"),
        (["students.s1_ce.teacher=nope"], "'nope' is not a configured teacher"),
        (["model.tp=0"], "model.tp=0 is out of range: allowed [1, inf)"),
        (["teachers.ce.lr=-1e-4"], "teachers.ce.lr=-0.0001 is out of range: allowed (0, 1]"),
        (["teachers.ce.lr=.nan"], "teachers.ce.lr=nan is out of range"),
        (["students.s1_ce.lr=.inf"], "students.s1_ce.lr=inf is out of range"),
        (["eval.k=0"], "eval.k=0 is out of range: allowed [1, 65536]"),
        (["rollout.max_new_tokens=0"], "rollout.max_new_tokens=0 is out of range"),
        (["rollout.top_p=1.5"], "rollout.top_p=1.5 is out of range: allowed (0, 1]"),
        (["data.prompts_per_batch=0"], "data.prompts_per_batch=0 is out of range"),
        (["onpolicy={loss: grpo}", "onpolicy.lr=0"], "onpolicy.lr=0.0 is out of range"),
        (["teachers.ce.mini_batch_size=2048"], "teachers.ce.mini_batch_size=2048 exceeds the fixed batch"),
        (["data.prompts_per_batch=8", "teachers.ce.mini_batch_size=64", "students.s1_ce.mini_batch_size=65"], "students.s1_ce.mini_batch_size=65"),
        (["onpolicy={loss: grpo, prompts_per_step: 200}"], "onpolicy.prompts_per_step=200 exceeds"),
        (["teachers.ce"], "expected key=value"),
    ],
)
def test_bad_config_is_refused_with_field_name(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert needle in str(e.value)


def test_missing_and_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(str(bad))


def test_cli_help_does_not_import_torch():
    code = "import sys; from erpd_megatron.cli import main; main(['--help']); assert 'torch' not in sys.modules, 'torch imported'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "demo" in out.stdout and "distill" in out.stdout


def _numeric_fields(cls, seen=None):
    """(dataclass, field name) of every int / float field reachable from `cls` (sections, named runs, optional)."""
    import dataclasses
    import types
    import typing

    seen = set() if seen is None else seen
    if cls in seen:
        return []
    seen.add(cls)
    out = []
    for name, tp in typing.get_type_hints(cls).items():
        origin = typing.get_origin(tp)
        if origin is dict:  # named runs: teachers / students
            inner = [typing.get_args(tp)[1]]
        elif origin in (typing.Union, types.UnionType):  # optional sections
            inner = [a for a in typing.get_args(tp) if a is not type(None)]
        else:
            inner = [tp]
        for t in inner:
            if t in (int, float):
                out.append((cls, name))
            elif dataclasses.is_dataclass(t):
                out += _numeric_fields(t, seen)
    return out


def test_every_numeric_field_has_a_checked_range():
    from erpd_megatron.config import RANGES, in_range

    fields = _numeric_fields(RunConfig)
    assert len(fields) > 40  # the walk reaches teachers / students / onpolicy, not just the top level
    missing = [f"{c.__name__}.{n}" for c, n in fields if n not in RANGES.get(c, {})]
    assert not missing, f"numeric fields without an entry in config.RANGES: {missing}"
    stale = [f"{c.__name__}.{n}" for c, names in RANGES.items() for n in names if (c, n) not in fields]
    assert not stale, f"RANGES entries for fields that do not exist: {stale}"
    for c, n in fields:  # every default passes its own range; NaN and inf pass none
        assert in_range(getattr(c(), n), RANGES[c][n]), f"{c.__name__}.{n} default outside {RANGES[c][n]}"
        assert not in_range(float("nan"), RANGES[c][n])
        assert not in_range(float("inf"), RANGES[c][n]) and not in_range(float("-inf"), RANGES[c][n])


def test_range_check_reaches_every_section():
    """A value just outside its range is refused in each section, naming the full path."""
    from erpd_megatron.config import RANGES, TeacherConfig

    assert RANGES[TeacherConfig]["eps_low"] == "[0, 1)"
    for override, path in [("model.dp=0", "model.dp"), ("data.eval_prompts=-1", "data.eval_prompts"),
                           ("rollout.temperature=0", "rollout.temperature"), ("teachers.ce.eps_low=1", "teachers.ce.eps_low"),
                           ("students.s1_ce.kl_coef=-0.1", "students.s1_ce.kl_coef"), ("eval.every=-1", "eval.every"),
                           ("iterate.min_teacher_gain=2", "iterate.min_teacher_gain"), ("seed=-1", "seed"),
                           ("iterations=0", "iterations")]:
        with pytest.raises(ConfigError, match=rf"^{path}=.* is out of range: allowed "):
            load_config(None, [override])


def test_the_error_messages_own_example_loads():
    import re

    with pytest.raises(ConfigError) as e:
        load_config(None, ["teachers.ce"])
    example = re.search(r"e\.g\. (\S+)\)", str(e.value)).group(1)
    assert load_config(None, [example]).teachers["ce"].lr == 1e-5


def test_duplicate_yaml_key_names_the_key_and_both_lines(tmp_path):
    """Issue 25 row 10: PyYAML keeps the last of two equal keys silently; a config refuses them."""
    f = tmp_path / "dup.yaml"
    f.write_text("seed: 1\nteachers:\n  ce:\n    lr: 1.0e-4\n    steps: 4\n    lr: 0.5\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: duplicate key 'lr' at line 6 \(first at line 4\)"):
        load_config(str(f))
    f.write_text("seed: 1\neval: {k: 2}\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'seed' at line 3 \(first at line 1\)"):
        load_config(str(f))
    with pytest.raises(ConfigError, match=r"override teachers: duplicate key 'ce' at line 1"):
        load_config(None, ["teachers={ce: {lr: 1.0e-4}, ce: {lr: 0.5}}"])


def test_yaml_aliases_and_oversized_configs_are_refused_fast(tmp_path):
    """Issue 25 row 11: "billion laughs" (nested aliases) refused at the alias, before anything is expanded; a file
    over 1 MiB or with over 100k values refused before it is built; a huge text field named; errors stay short."""
    import time

    from erpd_megatron.utils import strict_yaml
    from erpd_megatron.utils.cli import one_line

    laughs = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    f = tmp_path / "laughs.yaml"
    f.write_text("x:\n  " + laughs.replace("\n", "\n  ") + "\ndata:\n  instruction: *i\n")  # 9^9 strings
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"laughs.yaml: alias \*a at line 3: aliases are not allowed"):
        load_config(str(f))
    with pytest.raises(ConfigError, match=r"override data.instruction: alias \*a at line 1"):
        load_config(None, ["data.instruction=[&a [x, x], *a, *a]"])
    big = tmp_path / "big.yaml"
    big.write_text("data:\n  instruction: " + "x" * (10 * 2**20) + "\n")  # 10 MB
    with pytest.raises(ConfigError, match=r"big.yaml: 10485782 bytes, more than the 1048576 a config may have"):
        load_config(str(big))
    many = tmp_path / "many.yaml"
    many.write_text("rollout:\n  sglang_urls: [" + ",".join(["u"] * 300_000) + "]\n")
    with pytest.raises(ConfigError, match=r"many.yaml: more than 100000 values \(at line 2\)"):
        load_config(str(many))
    assert time.perf_counter() - t0 < 20  # each refused in about a second (a 3M-element list took ~30 s to build)
    long_ = tmp_path / "long.yaml"
    long_.write_text("data:\n  instruction: " + "x" * 1_000_000 + "\n")  # 1 MB: within the file cap
    with pytest.raises(ConfigError, match=r"^data.instruction is 1000000 characters long: at most 65536$"):
        load_config(str(long_))
    with pytest.raises(ConfigError, match=r"^rollout.sglang_urls has 5000 items: at most 4096$"):
        load_config(None, ["rollout.sglang_urls=[" + ",".join(["u"] * 5000) + "]"])
    assert strict_yaml.load("a: [1, 2]\nb: {c: x}\n") == {"a": [1, 2], "b": {"c": "x"}}
    # an error quoting a huge value is cut to one line of at most 1500 characters
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.prompts_per_batch=[" + ",".join(["1"] * 4000) + "]"])
    assert len(str(e.value)) > 10_000
    cut = one_line(str(e.value) + "\nsecond line")
    assert len(cut) < 1600 and "\n" not in cut and "characters cut" in cut and cut.endswith("second line")


@pytest.mark.parametrize("override, needle", [
    ("teachers.ce.steps=1000000000000", "teachers.ce.steps=1000000000000 is out of range: allowed [0, 999999]"),
    ("students.s1_ce.steps=1000000", "students.s1_ce.steps=1000000 is out of range: allowed [0, 999999]"),
    ("rollout.n_samples=1000000000", "rollout.n_samples=1000000000 is out of range: allowed [1, 65536]"),
    ("eval.k=1000000000", "eval.k=1000000000 is out of range: allowed [1, 65536]"),
    ("rollout.max_new_tokens=1000000000", "rollout.max_new_tokens=1000000000 is out of range: allowed [1, 1048576]"),
    ("iterations=4000000", "iterations=4000000 is out of range: allowed [1, 999999]"),
])
def test_upper_bounds(override, needle):
    """Issue 25 rows 7 and 9: values meaningful only up to a limit are refused above it (steps: the eval files'
    6-digit step numbers), before any compute; the memory a batch needs is checked against the machine later
    (tests/test_data_checks.py::test_batch_larger_than_memory_is_refused_naming_the_field)."""
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)
