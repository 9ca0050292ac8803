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
        (["model.tp=0"], "model.tp must be >= 1"),
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
