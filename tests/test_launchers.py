"""Launchers: generated sbatch scripts (plain and nemo-run), executed against stand-in Slurm commands
(srun / scontrol / sbatch / sacct written here as shell scripts that record their arguments), and the
planner gate that refuses a layout before anything is written or submitted."""

import importlib.util
import json
import os
import re
import stat
import subprocess
import sys

import pytest

from launchers import slurm
from launchers.cli import main as launch_main
from launchers.recipes import apply_overrides, get_recipe

HAS_NEMO = importlib.util.find_spec("nemo_run") is not None


def _exe(path, body):
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """Stand-ins on PATH. srun runs `bash -c CMD` once per node with SLURM_NODEID set (and the
    het group's node list); torchrun / sglang record their arguments as seen inside each task."""
    bindir, log = tmp_path / "bin", tmp_path / "log"
    bindir.mkdir()
    log.mkdir()
    _exe(bindir / "sbatch", f'echo "$@" >> {log}/sbatch.txt\necho "4242;cluster"\n')
    _exe(bindir / "sacct", f'echo "$@" >> {log}/sacct.txt\necho "4242|RUNNING|0:0|00:05:00"\n'
                           'echo "4242.batch|RUNNING|0:0|00:05:00"\n')
    _exe(bindir / "scontrol", f'echo "$@" >> {log}/scontrol.txt\n'
                              'if [ "$1" = show ]; then case "$3" in\n'
                              '  r*) printf "r1\\nr2\\n";; *) printf "n1\\nn2\\nn3\\nn4\\n";; esac; fi\n')
    _exe(bindir / "srun", f"""echo "$@" >> {log}/srun.txt
nodes=1; tpn=1
while [ $# -gt 0 ]; do
  case "$1" in --nodes=*) nodes=${{1#--nodes=}};; --ntasks-per-node=*) tpn=${{1#--ntasks-per-node=}};;
  bash) break;; esac; shift
done
rc=0
for ((i = 0; i < nodes; i++)); do for ((t = 0; t < tpn; t++)); do
  SLURM_NODEID=$i SLURM_PROCID=$((i * tpn + t)) "$@" || rc=$?
done; done
exit $rc
""")
    _exe(bindir / "torchrun", f'echo "$@" >> {log}/torchrun.txt\nexit ${{FAKE_TRAIN_RC:-0}}\n')
    _exe(bindir / "python", f'echo "$@" >> {log}/python.txt\n')  # the SGLang servers
    # /health of the SGLang servers: answers after $FAKE_READY_AFTER calls (default at once); 7 = never
    _exe(bindir / "curl", f'echo "$@" >> {log}/curl.txt\n'
                          f'n=$(grep -c . {log}/curl.txt); [ "${{FAKE_READY_AFTER:-1}}" != 7 ] && '
                          '[ "$n" -ge "${FAKE_READY_AFTER:-1}" ]\n')
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("NEMORUN_HOME", str(tmp_path / "nemo_home"))
    return log


def _recipe(name, tmp_path, *extra):
    code = tmp_path / "code"
    code.mkdir(exist_ok=True)
    return apply_overrides(get_recipe(name), [f"run_root={tmp_path / 'runs'}", f"slurm.code_dir={code}",
                                              f"slurm.host_code_dir={code}", "slurm.account=rl_acct",
                                              "slurm.partition=h100", "slurm.container_image=/img/erpd.sqsh",
                                              *extra])


def test_sbatch_27b_lines(tmp_path):
    r = _recipe("qwen35_27b", tmp_path)
    text = slurm.render_sbatch(r)
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --account=rl_acct", "#SBATCH --partition=h100", "#SBATCH --time=08:00:00",
                 "#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --signal=B:USR1@300",
                 "#SBATCH --exclusive", "MAX_RETRIES=3", "export CUDA_DEVICE_MAX_CONNECTIONS=1",
                 "export NCCL_DEBUG=WARN", "export MASTER_PORT=29500"]:
        assert line in text.splitlines(), line
    assert "hetjob" not in text
    (srun,) = [x for x in text.splitlines() if x.startswith("srun ")]
    for flag in ["--nodes=4", "--container-image=/img/erpd.sqsh", f"--container-workdir={tmp_path / 'code'}",
                 "--container-mounts=", "/models:/models"]:
        assert flag in srun, flag
    for flag in ["torchrun --nnodes=4 --nproc-per-node=8", '--node-rank="${SLURM_PROCID}"',
                 '--rdzv-endpoint="${MASTER_ADDR}":"${MASTER_PORT}"', "-m erpd_megatron.cli run --config qwen35_27b", "model.tp=4 model.pp=2 model.dp=4",
                 f"run_dir={tmp_path / 'runs' / 'qwen35_27b'}"]:
        assert flag in srun, flag
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text and "trap " in text and "SLURM_RESTART_COUNT" in text
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def test_sbatch_27b_runs_against_stand_ins(tmp_path, fake_slurm):
    """The script itself, run by bash: one torchrun per node, each with its own node rank and the head
    node as rendezvous endpoint; a failure requeues while retries are left, not after."""
    r = _recipe("qwen35_27b", tmp_path, "slurm.max_retries=2")
    script = slurm.write_sbatch(r)
    env = {**os.environ, "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "n[1-4]"}
    subprocess.run(["bash", script], env=env, check=True, capture_output=True, timeout=60)
    calls = (fake_slurm / "torchrun.txt").read_text().splitlines()
    assert len(calls) == 4
    for i, c in enumerate(calls):
        assert f"--node-rank={i}" in c and "--rdzv-endpoint=n1:29500" in c and "--rdzv-id=77" in c
    assert not (fake_slurm / "scontrol.txt").read_text().count("requeue")
    # the trainer fails: requeue (restart 1 < 2), then not any more (restart 2)
    env["FAKE_TRAIN_RC"] = "3"
    for restart, expect in [("1", 1), ("2", 1)]:
        p = subprocess.run(["bash", script], env={**env, "SLURM_RESTART_COUNT": restart}, capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 3
        assert (fake_slurm / "scontrol.txt").read_text().count("requeue 77") == expect


def test_recipes_carry_sglang_settings_to_a_valid_trainer_config():
    """Colocated recipes pass the layout's SGLang TP / memory fraction / server count / offload to the
    trainer, whose config accepts them; the disaggregated one attaches over NCCL instead."""
    from erpd_megatron.config import load_config, validate
    from erpd_megatron.pipeline.run import config_path
    from erpd_megatron.rollout.sglang_engine import launch_spec

    cfgs = {}
    for name in ("qwen3_4b_1node", "qwen35_27b", "qwen35_27b_disagg"):
        r = get_recipe(name)
        items = [f"{k}={v}" for k, v in r.trainer_overrides().items() if k != "run_dir"]
        cfgs[name] = load_config(config_path(r.trainer[3]), [i.replace("$ROLLOUT_URLS", "[http://r1:30000]") for i in items])
        validate(cfgs[name])
    import dataclasses

    gpu = dataclasses.replace(cfgs["qwen3_4b_1node"].rollout, sglang_device="cuda")  # "auto" is cpu on this host
    argv = launch_spec(gpu, "/models/Qwen3-4B", log_dir="/x").argv(7)
    assert argv[argv.index("--tp-size") + 1] == "1" and argv[argv.index("--base-gpu-id") + 1] == "7"
    assert "--enable-memory-saver" in argv and argv[argv.index("--mem-fraction-static") + 1] == "0.5"
    big = cfgs["qwen35_27b"].rollout
    assert (big.sglang_tp, big.sglang_num_servers, big.sglang_offload) == (4, 2, True)
    dis = cfgs["qwen35_27b_disagg"].rollout
    assert dis.sglang_weight_transport == "distributed" and not dis.sglang_offload and dis.sglang_urls


def test_sbatch_disagg_is_heterogeneous(tmp_path, fake_slurm):
    r = _recipe("qwen35_27b_disagg", tmp_path)
    text = slurm.render_sbatch(r)
    lines = text.splitlines()
    het = lines.index("#SBATCH hetjob")
    assert "#SBATCH --nodes=4" in lines[:het] and "#SBATCH --nodes=2" in lines[het:]
    sruns = [x for x in lines if x.startswith("srun ")]
    assert len(sruns) == 2
    assert "--het-group=1 --nodes=2" in sruns[0] and "sglang.launch_server" in sruns[0] and "--tp-size 4" in sruns[0]
    assert "--het-group=0 --nodes=4" in sruns[1] and "torchrun --nnodes=4" in sruns[1]
    script = slurm.write_sbatch(r)
    env = {**os.environ, "SLURM_JOB_ID": "78", "SLURM_JOB_NODELIST_HET_GROUP_0": "n[1-4]",
           "SLURM_JOB_NODELIST_HET_GROUP_1": "r[1-2]"}
    subprocess.run(["bash", script], env=env, check=True, capture_output=True, timeout=60)
    # one DP=1 TP4 server per TP group (2 a node), own port and GPUs, bound for other nodes with the job's key
    servers = (fake_slurm / "python.txt").read_text().splitlines()
    assert len(servers) == 4 and not any("--dp-size" in s for s in servers)
    assert sorted(re.search(r"--base-gpu-id (\d) --port (\d+)", s).groups() for s in servers) == \
        [("0", "30000"), ("0", "30000"), ("4", "30001"), ("4", "30001")]
    keys = {re.search(r"--api-key (\S*)", s).group(1) for s in servers}
    assert len(keys) == 1 and re.fullmatch(r"[0-9a-f]{48}", keys.pop())  # random per job, never in the script
    assert all("--tp-size 4" in s and "--host 0.0.0.0" in s for s in servers)
    assert "--api-key" in text and not re.search(r"--api-key [0-9a-f]{48}", text)
    calls = (fake_slurm / "torchrun.txt").read_text().splitlines()
    assert len(calls) == 4
    urls = "rollout.sglang_urls=[http://r1:30000,http://r1:30001,http://r2:30000,http://r2:30001]"
    assert all(urls in c and "rollout.sglang_weight_transport=distributed" in c for c in calls)
    # the trainer started only after every server answered /health
    health = (fake_slurm / "curl.txt").read_text().splitlines()
    assert [h.split()[-1] for h in health] == [f"{u}/health" for u in urls.split("[")[1].rstrip("]").split(",")]


def test_sbatch_disagg_waits_for_slow_servers_and_stops_on_dead_ones(tmp_path, fake_slurm):
    r = _recipe("qwen35_27b_disagg", tmp_path, "slurm.max_retries=1")
    script = slurm.write_sbatch(r)
    env = {**os.environ, "SLURM_JOB_ID": "79", "SLURM_JOB_NODELIST_HET_GROUP_0": "n[1-4]",
           "SLURM_JOB_NODELIST_HET_GROUP_1": "r[1-2]", "PATH": os.environ["PATH"]}
    # servers that are still loading (the stand-in servers have exited, so: ready on the first poll or never)
    p = subprocess.run(["bash", script], env={**env, "FAKE_READY_AFTER": "7"}, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 1 and "exited before http://r1:30000 was ready" in p.stdout, p.stdout[-2000:]
    assert not (fake_slurm / "torchrun.txt").exists()  # the trainer never started
    assert (fake_slurm / "scontrol.txt").read_text().count("requeue 79") == 1
    assert "rollout_ready" in slurm.render_sbatch(r) and "--max-time 10" in slurm.render_sbatch(r)


def test_sbatch_submit_and_status_via_cli(tmp_path, fake_slurm, capsys):
    rc = launch_main(["run", "qwen35_27b", "--executor", "sbatch", f"run_root={tmp_path / 'runs'}",
                      "slurm.account=rl_acct", "teachers.ce.lr=2e-6"])
    assert rc == 0
    path = capsys.readouterr().out.strip()
    assert path.endswith("qwen35_27b.sbatch") and os.path.exists(path)
    assert (fake_slurm / "sbatch.txt").read_text().split() == ["--parsable", path]
    assert "teachers.ce.lr=2e-6" in open(path).read()
    jobs = open(os.path.join(os.path.dirname(path), "jobs.txt")).read()
    assert jobs.startswith("4242 ")
    assert launch_main(["status", "4242"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "RUNNING"
    assert "-j 4242" in (fake_slurm / "sacct.txt").read_text()


def test_dryrun_writes_but_does_not_submit(tmp_path, fake_slurm, capsys):
    assert launch_main(["run", "qwen35_27b", "--executor", "sbatch", "--dryrun", f"run_root={tmp_path}"]) == 0
    assert os.path.exists(capsys.readouterr().out.strip())
    assert not (fake_slurm / "sbatch.txt").exists()


@pytest.mark.parametrize("bad,why", [
    ("layout.tp=3", "KV groups 4 and TP 3: neither divides the other"),
    ("layout.pp=3", "layers 64 not divisible by PP 3"),
    ("layout.seq_len=65536", "memory: stage 0 needs"),
])
def test_planner_refusal_blocks_launch(tmp_path, fake_slurm, capsys, bad, why):
    rc = launch_main(["run", "qwen35_27b", "--executor", "sbatch", f"run_root={tmp_path}", bad])
    assert rc == 2
    assert why in capsys.readouterr().err
    assert not (fake_slurm / "sbatch.txt").exists()
    assert not list(tmp_path.rglob("*.sbatch"))


def test_multi_node_recipe_on_the_local_executor_is_a_one_line_user_error(tmp_path, capsys):
    rc = launch_main(["run", "qwen35_27b", "--executor", "local", f"run_root={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "use --executor slurm or sbatch" in err[0]


def test_overrides_and_nodes():
    r = apply_overrides(get_recipe("qwen35_27b"), ["layout.recompute=full", "slurm.env.NCCL_DEBUG=INFO",
                                                   "slurm.max_retries=5", "eval.k=8"], nodes=8)
    assert (r.nodes, r.layout.nodes, r.layout.dp) == (8, 8, 8)  # DP grows to fill 8 x 8 GPUs at TP4 PP2
    assert r.layout.recompute == "full" and r.slurm.env["NCCL_DEBUG"] == "INFO" and r.slurm.max_retries == 5
    assert r.trainer_overrides()["eval.k"] == "8" and r.trainer_overrides()["model.dp"] == "8"
    with pytest.raises(ValueError, match="unknown field 'tpp'"):
        apply_overrides(get_recipe("qwen35_27b"), ["layout.tpp=2"])
    with pytest.raises(ValueError, match="expected int"):
        apply_overrides(get_recipe("qwen35_27b"), ["layout.tp=four"])


@pytest.mark.skipif(not HAS_NEMO, reason="nemo-run not installed (optional extra `launch`)")
def test_nemo_run_scripts(tmp_path, fake_slurm, monkeypatch, request):
    """nemo-run's SlurmExecutor (Experiment.dryrun): same srun/torchrun/container/requeue content, the
    disaggregated recipe as a heterogeneous job; then a real submission through the stand-in sbatch."""
    # nemo-run submits through invoke, which reads stdin: give it /dev/null instead of pytest's capture
    devnull = open(os.devnull)
    request.addfinalizer(devnull.close)
    monkeypatch.setattr("sys.stdin", devnull)
    from launchers import nemo

    path, job = nemo.run_slurm(_recipe("qwen35_27b", tmp_path), dryrun=True)
    text = open(path).read()
    assert job is None and not (fake_slurm / "sbatch.txt").exists()
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --account=rl_acct", "#SBATCH --requeue", "#SBATCH --time=08:00:00"]:
        assert line in text.splitlines(), line
    (srun,) = [x for x in text.splitlines() if x.startswith("srun ")]
    for flag in ["--container-image /img/erpd.sqsh", "--container-mounts", "torchrun --nnodes=4 --nproc-per-node=8",
                 '--node-rank="${SLURM_PROCID}"', '--rdzv-endpoint="${MASTER_ADDR}":"${MASTER_PORT}"', "model.tp=4"]:
        assert flag in srun, flag
    assert "export MASTER_ADDR=$head_node_ip" in text and "export NCCL_DEBUG=WARN" in text
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text and "TORCHX_MAX_RETRIES=3" in text

    path, _ = nemo.run_slurm(_recipe("qwen35_27b_disagg", tmp_path), dryrun=True)
    text = open(path).read()
    assert text.count("#SBATCH hetjob") == 1 and "#SBATCH --nodes=2" in text
    assert re.search(r"srun --het-group=0 .*torchrun --nnodes=4", text)
    assert re.search(r"srun --het-group=1 .*sglang.launch_server", text)
    assert "export MASTER_ADDR=$het_group_host_0" in text and "export ROLLOUT_URLS=" in text

    path, job = nemo.run_slurm(_recipe("qwen35_27b", tmp_path, "name=sub"), dryrun=False)
    assert job == "4242" or job.startswith("4242")
    args = (fake_slurm / "sbatch.txt").read_text().split()
    assert args[:2] == ["--requeue", "--parsable"] and args[2].endswith("_sbatch.sh")


@pytest.mark.skipif(not HAS_NEMO, reason="nemo-run not installed (optional extra `launch`)")
def test_local_executor_runs_micro_pipeline(tmp_path, toy_base, monkeypatch):
    """nemo-run's LocalExecutor runs the real pipeline (micro preset) on this CPU and it finishes."""
    import json
    import sys
    from pathlib import Path

    from launchers import nemo
    from launchers.recipes import apply_overrides, get_recipe

    preset = Path(__file__).resolve().parent.parent / "erpd_megatron" / "presets" / "micro.yaml"
    recipe = apply_overrides(get_recipe("cpu_demo"), [f"run_root={tmp_path}", f"model.base={toy_base}",
                                                     "onpolicy=null", "eval.k=1", "data.eval_prompts=8"])
    recipe.trainer = ["erpd", "run", "--config", str(preset)]
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")  # `erpd` of this venv
    monkeypatch.setattr("sys.stdin", open(os.devnull))
    shown = nemo.run_local(recipe, dryrun=False)
    assert shown.startswith("erpd run --config")
    summary = json.loads((tmp_path / "cpu_demo" / "summary.json").read_text())
    assert {"ce", "mse", "ppo", "s1_ce", "s2_mse"} <= set(summary["methods"])


def test_planner_imports_no_launcher_code():
    """The dependency is one-way: launchers -> planner / model shapes, never back (no import cycle)."""
    code = ("import sys, erpd_megatron.planner, erpd_megatron.model_shapes\n"
            "bad = [m for m in sys.modules if m == 'launchers' or m.startswith('launchers.')]\n"
            "assert not bad, bad\n"
            "sys.exit(erpd_megatron.planner.main(['--model', 'qwen3-toy', '--json']))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout)["ok"] is True


HOSTILE = {
    "data.instruction": "$(touch {x}/dollar)",
    "data.tick": "`touch {x}/tick`",
    "data.quotes": "it's \"quoted\" ; touch {x}/semi",
    "data.newline": "line1\ntouch {x}/newline\n'",
    "data.home": "${{HOME}} $HOME",
}


def _recorder(path, out):
    # stand-in torchrun / python: every argument (NUL-separated) and $FOO, one file per call
    _exe(path, f'n=$(ls {out} | wc -l); printf "%s\\0" "$@" > {out}/$n.args; printf "%s" "$FOO" > {out}/$n.foo\n')


@pytest.mark.parametrize("recipe,executor", [("qwen35_27b", "sbatch"), ("cpu_micro", "sbatch"),
                                             ("cpu_micro", "nemo")])
def test_hostile_overrides_arrive_literally(tmp_path, fake_slurm, monkeypatch, recipe, executor):
    """Overrides with $(...), backticks, quotes and newlines reach the trainer as literal text through the
    generated script (container path: stand-in torchrun; no-container path: slurm.python = a stand-in)."""
    if executor == "nemo" and not HAS_NEMO:
        pytest.skip("nemo-run not installed (optional extra `launch`)")
    x, calls = tmp_path / "x", tmp_path / "calls"
    x.mkdir()
    calls.mkdir()
    _recorder(tmp_path / "bin" / "torchrun", calls)
    _recorder(tmp_path / "fakepy", calls)
    hostile = {k: v.format(x=x) for k, v in HOSTILE.items()}
    items = [f"{k}={v}" for k, v in hostile.items()] + [f"slurm.env.FOO=$(touch {x}/env) `id`"]
    if recipe == "cpu_micro":
        items += [f"slurm.python={tmp_path / 'fakepy'}", "slurm.container_image="]
    r = _recipe(recipe, tmp_path, *items)
    if executor == "sbatch":
        script = slurm.write_sbatch(r)
    else:
        monkeypatch.setattr("sys.stdin", open(os.devnull))
        from launchers import nemo

        script, _ = nemo.run_slurm(r, dryrun=True)
    env = {**os.environ, "SLURM_JOB_ID": "79", "SLURM_JOB_NODELIST": "n[1-4]"}
    p = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-3000:]
    assert not list(x.iterdir()), "a hostile override was executed"
    files = sorted(calls.glob("*.args"))
    assert len(files) == r.nodes
    for f in files:
        argv = f.read_text().split("\0")[:-1]
        for k, v in hostile.items():
            assert f"{k}={v}" in argv, (k, argv)
        assert f.with_suffix(".foo").read_text() == f"$(touch {x}/env) `id`"
    if recipe == "cpu_micro":
        assert "--container-image" not in open(script).read()


@pytest.mark.parametrize("bad", ["slurm.partition=a b", "slurm.account=x\n#SBATCH --uid=0", "slurm.time=1:00;id",
                                 "slurm.extra_sbatch={'qos': 'hi gh'}", "slurm.extra_sbatch={'Q OS': 'x'}",
                                 "slurm.env.A-B=1", "name=a/b"])
def test_sbatch_values_validated(tmp_path, fake_slurm, capsys, bad):
    rc = launch_main(["run", "cpu_micro", "--executor", "sbatch", f"run_root={tmp_path}", bad])
    assert rc == 2
    assert "error:" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.sbatch")) and not (fake_slurm / "sbatch.txt").exists()


def test_cpu_recipe_has_no_gpu_account_or_container_lines(tmp_path, monkeypatch):
    """A CPU recipe on a cluster without containers: no --gpus-per-node, no --account / --partition when
    unset, no pyxis flags; the task runs the launcher's Python from the checkout."""
    for var in ("ERPD_SLURM_ACCOUNT", "ERPD_SLURM_PARTITION", "ERPD_CONTAINER_IMAGE"):
        monkeypatch.delenv(var, raising=False)
    r = apply_overrides(get_recipe("cpu_micro"), [f"run_root={tmp_path}", f"slurm.host_code_dir={tmp_path}"])
    text = slurm.render_sbatch(r)
    for absent in ("--gpus-per-node", "--account", "--partition", "--container", "--exclusive", "NCCL"):
        assert absent not in text, absent
    (srun,) = [x for x in text.splitlines() if x.startswith("srun ")]
    assert f"cd {tmp_path} && exec {sys.executable} -m erpd_megatron.cli run --config" in srun
    assert f"export PYTHONPATH={tmp_path}" in text
    if HAS_NEMO:  # nemo-run's SlurmExecutor: the same absences, and srun runs in the checkout
        monkeypatch.setattr("sys.stdin", open(os.devnull))
        monkeypatch.setenv("NEMORUN_HOME", str(tmp_path / "nemo_home"))
        from launchers import nemo

        ntext = open(nemo.run_slurm(r, dryrun=True)[0]).read()
        for absent in ("--gpus-per-node", "--account", "--partition", "--container", "--exclusive"):
            assert absent not in ntext, absent
        assert f"--chdir {tmp_path}" in ntext and "--signal=USR1@300" in ntext
    # GPUs and an account appear only when set
    r = apply_overrides(r, ["gpus_per_node=4", "slurm.account=acc"])
    text = slurm.render_sbatch(r)
    assert "#SBATCH --gpus-per-node=4" in text and "#SBATCH --account=acc" in text


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_launch_from_another_directory_uses_the_package_code_and_preset_names(tmp_path, monkeypatch, capsys):
    """Called from a folder outside the checkout: the job runs the launcher's own code dir (cd + PYTHONPATH), names
    its preset (the trainer finds it in its package), and the run dir is the caller's relative run_root, absolute."""
    monkeypatch.chdir(tmp_path)
    for var in ("ERPD_CONTAINER_IMAGE", "ERPD_RUN_ROOT"):
        monkeypatch.delenv(var, raising=False)
    assert launch_main(["run", "qwen3_4b_1node", "--executor", "sbatch", "--dryrun", "run_root=runs"]) == 0
    script = capsys.readouterr().out.strip().splitlines()[0]
    assert script == str(tmp_path / "runs" / "qwen3_4b_1node" / "slurm" / "qwen3_4b_1node.sbatch")
    text = open(script).read()
    assert f"cd {REPO} && exec" in text and f"PYTHONPATH={REPO}" in text and str(tmp_path) + "/runs" in text
    assert "--config qwen3_4b " in text and "erpd_megatron/presets" not in text


def test_planner_reads_model_base_config_and_model_errors_are_one_line(tmp_path, capsys):
    """`model.base=<dir>` plans that model (not the recipe's built-in one); `model=<config.json | dir>` works;
    an unknown name or a missing file is one line, exit 2, never a traceback."""
    from erpd_megatron.model_shapes import get_model_config

    big = tmp_path / "Qwen3-8B"
    big.mkdir()
    cfg = get_model_config("qwen3-4b")
    cfg.update(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32)
    (big / "config.json").write_text(json.dumps(cfg))
    assert launch_main(["plan", "qwen3_4b_1node", "--json"]) == 0  # the recipe's own 4B fits its layout
    assert launch_main(["plan", "qwen3_4b_1node", "--json", f"model.base={big}"]) == 2  # the 8B given does not
    assert "memory: stage 0 needs" in capsys.readouterr().err
    assert launch_main(["plan", "qwen3_4b_1node", "--json", f"model.base={big}", "layout.tp=2"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["model"] == str(big) and planned["total_params"] > 7e9
    assert launch_main(["plan", "qwen3_4b_1node", "--json", f"model={big / 'config.json'}", "layout.tp=2"]) == 0
    assert json.loads(capsys.readouterr().out)["total_params"] == planned["total_params"]
    for item, needle in ((f"model={tmp_path / 'none.json'}", "none.json: no such file"),
                         ("model=qwen9", "unknown model 'qwen9'")):
        assert launch_main(["plan", "qwen3_4b_1node", item]) == 2
        err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        assert len(err) == 1 and needle in err[0], err
    from erpd_megatron.planner import main as plan_main

    assert plan_main(["--hf-config", str(big), "--json"]) in (0, 2)  # the model dir, not only its config.json
    assert json.loads(capsys.readouterr().out)["total_params"] == planned["total_params"]
    assert plan_main(["--hf-config", str(tmp_path)]) == 2
    assert "no config.json in it" in capsys.readouterr().err
