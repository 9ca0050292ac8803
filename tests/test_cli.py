"""The `erpd` CLI as an operator meets it: fast help without torch, --print-config, flags with help and defaults,
user errors as one line with exit 2, resume rules for a run dir's config, judge failures reported."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from erpd_megatron.cli import COMMANDS
from erpd_megatron.config import load_config, save_config, to_dict

CONFIG_COMMANDS = ["run", "collect", "teacher", "signals", "distill", "onpolicy", "iterate"]


def erpd(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "erpd_megatron.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def test_every_subcommand_help_without_torch():
    """`erpd X --help` for every subcommand, in one process: exit 0, and neither torch nor pyarrow / transformers /
    numpy imported (what made help take 3.5-4.7 s; measured 0.15-0.5 s without them)."""
    code = (
        "import sys\nfrom erpd_megatron.cli import main\nassert main(['--help']) == 0\n"
        f"for c in {sorted(COMMANDS)!r}:\n"
        "    try:\n        rc = main([c, '--help'])\n    except SystemExit as e:\n        rc = e.code\n"
        "    assert rc in (0, None), (c, rc)\n"
        "heavy = [m for m in ('torch', 'pyarrow', 'transformers', 'numpy') if m in sys.modules]\n"
        "assert not heavy, f'imported: {heavy}'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "examples:\n  erpd demo" in out.stdout  # top level
    for c in CONFIG_COMMANDS:
        assert f"usage: erpd {c}" in out.stdout
    run_help = out.stdout.split("usage: erpd run")[1].split("usage: erpd")[0]
    for needle in ("presets (--config NAME):", "micro", "demo", "config sections", "teachers.NAME", "examples:",
                   "--print-config"):
        assert needle in run_help, needle


def _parsers():
    from erpd_megatron.pipeline.run import build_parser
    from erpd_megatron.rollout.eval import build_parser as eval_parser

    yield "run", build_parser("erpd run")
    yield "eval", eval_parser()
    from erpd_megatron.planner import build_parser as plan_parser

    yield "plan", plan_parser()


@pytest.mark.parametrize("name, parser", list(_parsers()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_flag_has_help_and_default(name, parser):
    fmt = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        text = fmt._get_help_string(action)  # what --help prints for it, before %-expansion
        assert action.help, f"{name} {action.dest}: no help text"
        assert "default" in text, f"{name} {action.dest}: help does not say the default: {text!r}"


def test_help_examples_parse_with_the_real_loader():
    """The two examples in `erpd run --help` resolve (minus --print-config, which they also use)."""
    import shlex

    from erpd_megatron.pipeline.run import _epilog, parse

    examples = [x.strip() for x in _epilog("erpd run").split("examples:")[1].strip().splitlines()]
    assert len(examples) == 2
    for ex in examples:
        argv = shlex.split(ex)[2:]
        cfg, _ = parse(argv, "erpd run")
        assert cfg.run_dir


@pytest.mark.parametrize("sub", CONFIG_COMMANDS + ["demo"])
def test_print_config_prints_resolved_yaml_and_builds_nothing(tmp_path, sub):
    run = tmp_path / "r"
    args = ["--print-config", "--config", "micro", f"run_dir={run}", "teachers.ce.lr=3e-4"]
    if sub == "demo":
        args = ["--print-config", f"run_dir={run}", "teachers.ce.lr=3e-4"]
    code = ("import sys\nfrom erpd_megatron.cli import main\n"
            f"rc = main({[sub, *args]!r})\nassert 'torch' not in sys.modules, 'torch imported'\nsys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout.split("\nERPD demo finished")[0]  # demo prints its closing line after main_run
    got = yaml.safe_load(text)
    preset = "demo" if sub == "demo" else "micro"
    want = load_config(f"erpd_megatron/presets/{preset}.yaml", [f"run_dir={run}", "teachers.ce.lr=3e-4"])
    assert got == to_dict(want)
    assert not run.exists()


def _one_line_exit_2(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert needle in lines[0], lines[0]


@pytest.fixture
def bench(tmp_path) -> Path:
    p = tmp_path / "bench.jsonl"
    p.write_text('{"problem": "1+1", "answer": "2"}\n')
    return p


def test_user_errors_are_one_line_exit_2(tmp_path, bench):
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cases = [
        (["eval", "--benchmark", bench, "--model", "/nonexistent"], "--model /nonexistent: not a directory"),
        (["eval", "--benchmark", bench, "--model", model, "--k", "0"], "--k=0 is out of range"),
        (["eval", "--benchmark", bench, "--model", model, "--temperature", "nan"], "--temperature=nan is out of range"),
        (["eval", "--benchmark", tmp_path / "none.jsonl", "--model", model], "none.jsonl: no such file"),
        (["eval", "--benchmark", bench, "--model", tmp_path], "no config.json"),
        (["run", f"run_dir={tmp_path / 'r'}", "teachers.ce.lr=-1e-4"], "teachers.ce.lr=-0.0001 is out of range"),
        (["run", f"run_dir={tmp_path / 'r'}", "eval.k=0"], "eval.k=0 is out of range: allowed [1, 65536]"),
        (["teacher", "--config", "nope"], "--config nope: no such file and no such preset (presets: bench, bench_long, demo, long, long_claims, micro"),
        (["run", f"run_dir={tmp_path / 'r'}", "model.base=/nonexistent", "data.eval=toy"],
         "model.base: /nonexistent is not a Hugging"),
        (["run", f"run_dir={tmp_path / 'r'}", f"model.base={model}"], "data.eval is not set: give a benchmark file"),
        (["run", f"run_dir={tmp_path / 'r'}", "reward.custom=no_such_mod:f", "data.eval=toy", "model.base=toy"],
         "reward.custom 'no_such_mod:f': importing no_such_mod failed"),
        (["run", f"run_dir={tmp_path / 'r'}", f"data.train={tmp_path / 'no.jsonl'}"], "data.train: "),
        (["run", f"run_dir={tmp_path / 'r'}", f"data.eval={tmp_path / 'no.jsonl'}"], "no.jsonl: prompt file not found"),
        (["run", "teacher.lr=1e-5"], "unknown key(s) ['teacher']"),
        (["plan", "--recipe", "nope"], "python -m launchers plan nope"),
        (["plan", "--model", "nope"], "unknown model 'nope'; known:"),
        (["plan", "--hf-config", tmp_path / "none.json"], "none.json: no such file"),
    ]
    for argv, needle in cases:
        _one_line_exit_2(erpd(*argv), needle)
    assert not (tmp_path / "r").exists()


def test_bad_data_writes_nothing_then_corrected_rerun_is_not_refused(tmp_path):
    """A malformed data file fails before config.yaml (or anything else) is written to the run dir."""
    from erpd_megatron.pipeline.run import check_resumable

    run = tmp_path / "r"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1=", "answer": "2"}\n{"problem": "2+2="}\n')
    r = erpd("run", f"run_dir={run}", f"data.train={bad}", "data.eval=" + str(bad))
    _one_line_exit_2(r, "bad.jsonl:2")
    assert not (run / "config.yaml").exists()
    assert not run.exists() or not any(run.rglob("*")), sorted(run.rglob("*"))
    check_resumable(load_config(None, [f"run_dir={run}", "data.train=toy"]))  # the corrected run may start


def _run_dir_with(tmp_path, overrides, started=()) -> Path:
    run = tmp_path / "r"
    run.mkdir()
    save_config(load_config("erpd_megatron/presets/micro.yaml", [f"run_dir={run}", *overrides]), run / "config.yaml")
    for m in started:
        (run / "ckpt" / m).mkdir(parents=True)
    return run


@pytest.mark.parametrize("before, after, started, refused", [
    ([], ["teachers.ce.steps=8"], [], None),  # extending a teacher: allowed
    ([], ["students.s1_ce.steps=9", "onpolicy.steps=5", "iterations=2", "eval.every=1"], ["s1_ce"], None),
    ([], ["students={s9: {teacher: ce}}"], [], None),  # a new student (replacing the old ones)
    ([], ["model.reuse_engines=false"], ["ce"], None),  # how policies are built: same results either way
    ([], ["teachers.ce.steps=2"], [], "teachers.ce.steps: 4 -> 2"),  # shrinking: refused
    ([], ["teachers.ce.lr=3e-4"], [], "teachers.ce.lr: 0.0001 -> 0.0003"),
    ([], ["seed=8"], [], "seed: 7 -> 8"),
    ([], ["onpolicy.steps=1"], [], "onpolicy.steps: 2 -> 1"),  # 0 stood for the budget: 16 / 8 = 2 steps
    ([], ["teachers.ce.steps=8"], ["s1_ce"], "teachers.ce.steps: 4 -> 8"),  # its student already read step 4
    ([], ["teachers.mse.steps=8"], ["s1_ce"], None),  # s1_ce reads ce, not mse; s2_mse has not started
    ([], ["students.s1_ce.mini_batch_size=0", "students.s1_ce.steps=8"], [], "students.s1_ce.mini_batch_size"),
    (["students.s1_ce.mini_batch_size=0"], ["students.s1_ce.mini_batch_size=0", "students.s1_ce.steps=8"], [],
     "students.s1_ce.steps: 4 -> 8"),  # batch // steps: more steps, smaller mini-batches
    (["students.s1_ce.ensemble=sequential"], ["students.s1_ce.ensemble=sequential", "students.s1_ce.steps=8"], [],
     "students.s1_ce.steps: 4 -> 8"),
])
def test_resume_locks_only_what_changes_finished_results(tmp_path, before, after, started, refused):
    from erpd_megatron.config import ConfigError
    from erpd_megatron.pipeline.run import check_resumable

    run = _run_dir_with(tmp_path, before, started)
    cfg = load_config("erpd_megatron/presets/micro.yaml", [f"run_dir={run}", *after])
    if refused is None:
        check_resumable(cfg)
    else:
        with pytest.raises(ConfigError, match="created with another config") as e:
            check_resumable(cfg)
        assert refused in str(e.value)


def test_judge_refusing_connections_is_counted_and_fails_the_command(tmp_path, bench, monkeypatch, capsys):
    """A judge URL nobody listens on: every call fails, the JSON counts the failures, the command exits 1."""
    import socket

    from erpd_megatron.rollout import eval as ev

    with socket.socket() as s:  # a port that was free a moment ago: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = ev.LLMJudge(f"http://127.0.0.1:{port}", timeout=5)
    assert judge("1+1", "2", "three") is None and judge.errors == 1 and "Connection" in judge.last_error
    model, out = _stub_eval(tmp_path, monkeypatch)
    rc = ev.main(["--benchmark", str(bench), "--model", str(model), "--k", "3", "--judge-url",
                  f"http://127.0.0.1:{port}", "--out", str(out)])
    t = json.loads(out.read_text())["total"]
    assert t["judge_calls"] == 3 and t["judge_failures"] == 3 and "Connection" in t["judge_last_error"]
    assert rc == 1
    assert "all 3 judge calls failed" in capsys.readouterr().err


def _stub_eval(tmp_path, monkeypatch):
    """`erpd eval` with a stub engine that answers wrong (every sample goes to the judge); (model dir, out path)."""
    class Stub:  # the model answers wrong, so every sample goes to the judge
        def generate(self, prompt_ids, sampling):
            from erpd_megatron.rollout.engine import Sample

            return [Sample(i, [5, 6], [-0.1, -0.1], "stop", None, sample_index=j)
                    for i in range(len(prompt_ids)) for j in range(sampling.n)]

        def shutdown(self):
            pass

    class Tok:
        pad_token_id = 0
        chat_template = None

        def __len__(self):  # not empty (erpd eval refuses a model dir whose tokenizer is)
            return 8

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [1]}

        def decode(self, ids, skip_special_tokens=True):
            return "\\boxed{3}"

    class Reward:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            pass

        def score_batch(self, texts, golds):
            return [0.0] * len(texts)

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: Tok())
    monkeypatch.setattr("erpd_megatron.rollout.local_engine.LocalEngine.from_pretrained", lambda *a, **k: Stub())
    monkeypatch.setattr("erpd_megatron.rewards.math.MathReward", lambda **k: Reward())
    monkeypatch.setattr("erpd_megatron.data.prompts.encode_prompts", lambda tok, items, instruction=None, **k: [[1]] * len(items))
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return model, tmp_path / "res.json"


@pytest.mark.parametrize("reply, failed", [
    ('{"choices": null}', True), ("[]", True), ('{"choices": [{"message": {"content": 5}}]}', True),
    ('{"choices": [{"message": null}]}', True), ('{"choices": [{"message": {"content": "CORRECT"}}]}', False),
])
def test_judge_reply_of_another_shape_is_a_failed_call(tmp_path, bench, monkeypatch, capsys, reply, failed):
    """Issue 25 row 13: valid JSON of the wrong shape from the judge is counted as a failed call (like an outage):
    no TypeError traceback, the result JSON is written, the command exits 1 when every call failed."""
    import http.server
    import threading

    from erpd_megatron.rollout import eval as ev

    class Judge(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = reply.encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        model, out = _stub_eval(tmp_path, monkeypatch)
        rc = ev.main(["--benchmark", str(bench), "--model", str(model), "--k", "2", "--judge-url",
                      f"http://127.0.0.1:{server.server_address[1]}", "--out", str(out)])
    finally:
        server.shutdown()
    t = json.loads(out.read_text())["total"]
    err = capsys.readouterr().err
    assert "Traceback" not in err and t["judge_calls"] == 2
    if failed:
        assert rc == 1 and t["judge_failures"] == 2 and "ValueError: reply" in t["judge_last_error"]
        assert "all 2 judge calls failed" in err
    else:
        assert rc == 0 and t["judge_failures"] == 0 and t["judge_flips"] == 2


def test_eval_unreachable_sglang_is_a_one_line_error(tmp_path, bench, monkeypatch, capsys):
    from erpd_megatron.rollout import eval as ev
    from erpd_megatron.rollout import sglang_engine

    def refuse(urls, **kw):
        raise sglang_engine.SGLangError(f"server {urls[0]} not healthy after 30s; log: None")

    tok = tmp_path / "tok"
    from erpd_megatron.toy.tokenizer import build_tokenizer

    build_tokenizer().save_pretrained(tok)
    monkeypatch.setattr(sglang_engine, "SGLangEngine", refuse)
    rc = ev.main(["--benchmark", str(bench), "--sglang-url", "http://127.0.0.1:1", "--tokenizer", str(tok)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["erpd eval: error: --sglang-url: server http://127.0.0.1:1 not healthy after 30s; "
                               "log: None"]


def test_resume_with_more_teacher_steps_continues_training(tmp_path, toy_base):
    """`erpd teacher` to step 2, then the same run dir with steps=4: accepted, training continues from the step-2
    checkpoint (metrics 1..4, each once) and config.yaml records 4; going back to 3 is refused in one line."""
    from test_pipeline import clean_env

    run = tmp_path / "ext"
    base = ["teacher", "--config", "micro", f"run_dir={run}", f"model.base={toy_base}", "data.prompts_per_batch=4",
            "rollout.n_samples=2", "rollout.max_new_tokens=8", "students={}", "onpolicy=null", "eval.every=0",
            "data.eval_prompts=2", "eval.k=1"]

    def teacher(steps):
        argv = [*base, f"teachers={{ce: {{loss: ce, steps: {steps}, mini_batch_size: 8, save_every: 2}}}}"]
        return subprocess.run([sys.executable, "-m", "erpd_megatron.cli", *argv], capture_output=True, text=True,
                              env=clean_env(), timeout=600)

    r = teacher(2)
    assert r.returncode == 0, r.stderr[-3000:]
    r = teacher(4)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from step 2" in r.stderr
    steps = [json.loads(x)["step"] for x in (run / "metrics" / "ce.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert yaml.safe_load((run / "config.yaml").read_text())["teachers"]["ce"]["steps"] == 4
    _one_line_exit_2(teacher(3), "teachers.ce.steps: 4 -> 3")


def test_launcher_checks_trainer_overrides_before_writing(tmp_path, capsys):
    """Every recipe's trainer config loads; a bad trainer override stops `python -m launchers` in one line, exit 2,
    before a script is written or a job queued."""
    from launchers.cli import check_trainer_config, main
    from launchers.recipes import RECIPES, get_recipe

    for name in RECIPES:
        check_trainer_config(get_recipe(name))
    capsys.readouterr()
    for argv, needle in ((["plan", "cpu_micro", "teachers.ce.lr=-1"], "teachers.ce.lr=-1.0 is out of range"),
                         (["run", "qwen35_27b", "--executor", "sbatch", "--dryrun", f"run_root={tmp_path}",
                           "teacher.lr=1e-5"], "unknown key(s) ['teacher']")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # no sbatch script written
