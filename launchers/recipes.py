"""Launch recipes: one function per model / cluster shape, each returning a typed `Recipe`.

A recipe says what runs (the trainer command `erpd run --config PRESET key=value ...`, or `erpd demo`),
on what layout (a planner `Layout`: the planner checks it before every launch), and where (Slurm settings:
account, partition, time, container or Python environment, mounts, environment, requeue). The executors in `launchers/slurm.py`
(plain sbatch) and `launchers/nemo.py` (nemo-run) turn the same recipe into equivalent sbatch scripts.

The trainer's parallel sizes are written from the layout (one source of truth): TRAINER_KEYS maps layout
fields to the trainer's config keys. Layout fields without a trainer key (cp, recompute, seq_len, ...)
only feed the planner.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from erpd_megatron.planner import H100, Hardware, Layout


def code_root() -> str:
    """The directory holding the erpd_megatron and launchers packages this launcher runs from (a checkout, or
    site-packages): what a job without a container runs, whatever the caller's working directory."""
    return str(Path(__file__).resolve().parent.parent)


#: the CPU recipes' machine (the 2-core CI runner): what the planner checks memory against
CPU_HOST = Hardware(name="CPU (2 cores, 24 GiB)", memory_gib=24.0, reserved_gib=4.0, peak_tflops=0.1, mfu=0.3)

#: layout field -> trainer config key (erpd_megatron/config.py); only these are passed to the trainer
TRAINER_KEYS: dict[str, str] = {
    "tp": "model.tp",
    "pp": "model.pp",
    "dp": "model.dp",
    "micro_batch": "model.micro_batch_size",
}

#: environment of every GPU job (NCCL, CUDA, paths); recipes and `slurm.env.KEY=VALUE` add to it
DEFAULT_ENV: dict[str, str] = {
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",  # Megatron TP/SP comm-compute overlap needs in-order kernels
    "NCCL_DEBUG": "WARN",
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a dead rank fails the job instead of hanging until timeout
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "8",
}

#: environment of CPU-only jobs (no CUDA / NCCL settings; torch picks its own thread count)
CPU_ENV: dict[str, str] = {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


@dataclass
class SlurmSettings:
    """Cluster side of a recipe (any field can be overridden as `slurm.FIELD=VALUE`)."""

    account: str = field(default_factory=lambda: os.environ.get("ERPD_SLURM_ACCOUNT", ""))
    """empty: no --account line (the cluster's default account)"""
    partition: str = field(default_factory=lambda: os.environ.get("ERPD_SLURM_PARTITION", ""))
    """empty: no --partition line (the cluster's default partition)"""
    time: str = "04:00:00"
    """wall-clock limit per allocation; the job requeues itself and resumes, so runs may be longer"""
    job_name: str = ""
    container_image: str = field(default_factory=lambda: os.environ.get("ERPD_CONTAINER_IMAGE", ""))
    """enroot/pyxis image (squashfs path or registry URI) with torch, megatron-core and this project's deps.
    Empty: no container and no pyxis flags; every task runs `python` below from `host_code_dir`"""
    container_mounts: list[str] = field(default_factory=lambda: ["/models:/models"])
    """extra pyxis mounts (container jobs only; the checkout and the run root are always mounted)"""
    code_dir: str = "/workspace/erpd-megatron"
    """where the repository is mounted in the container (the working directory of every task)"""
    host_code_dir: str = ""
    """repository on the cluster's shared file system (default: the directory of the code running the launcher,
    `code_root()`, wherever it is called from); the working directory of every task when there is no container"""
    python: str = ""
    """interpreter every task runs (the trainer as `PYTHON -m erpd_megatron.cli`, torchrun as
    `PYTHON -m torch.distributed.run`). Default: `python` / `torchrun` of the container's PATH; without a
    container, the interpreter running the launcher (your venv on the shared file system)"""
    env: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_ENV))
    max_retries: int = 3
    """requeues after a failure, preemption or time limit; each rerun resumes from the last checkpoint"""
    requeue_signal_s: int = 300
    """plain sbatch path: Slurm sends USR1 this many seconds before the time limit, the script requeues"""
    exclusive: bool = True
    rdzv_port: int = 29500
    setup: list[str] = field(default_factory=list)
    """extra shell lines run in the batch script before the job steps (module load, ...)"""
    extra_sbatch: dict[str, str] = field(default_factory=dict)
    """more #SBATCH flags, e.g. {"qos": "high", "reservation": "rl"}"""


@dataclass
class RolloutServers:
    """Disaggregated rollouts: SGLang servers on their own nodes (second group of a heterogeneous job).

    One DP=1 server per TP group, each on its own port (sglang refuses weight updates from a server with
    dp_size > 1, and the trainer's update group is sized from the servers' TP). They bind `host` and
    require the job's API key (`--api-key $ERPD_SGLANG_API_KEY`, generated by the batch script; the
    trainer sends it)."""

    nodes: int = 1
    gpus_per_node: int = 8
    tp: int = 4
    port: int = 30000
    """port of the node's first server; server k of a node listens on port + k"""
    mem_fraction: float = 0.85
    model_path: str = ""
    host: str = "0.0.0.0"
    """bind address: the trainer is on other nodes (the API key guards the admin endpoints)"""
    python: str = "python"
    """interpreter of sglang's own environment (sglang pins torch / transformers versions of its own)"""
    ready_timeout_s: int = 3600
    """the batch script starts the trainer once every server answers /health, waiting at most this long (a
    27B TP4 server loads and captures CUDA graphs for minutes, longer on a requeue)"""

    @property
    def servers_per_node(self) -> int:
        return self.gpus_per_node // self.tp

    def commands(self) -> list[list[str]]:
        """One `sglang.launch_server` per TP group of a node."""
        return [[self.python, "-m", "sglang.launch_server", "--model-path", self.model_path,
                 "--tp-size", str(self.tp), "--base-gpu-id", str(k * self.tp), "--port", str(self.port + k),
                 "--mem-fraction-static", str(self.mem_fraction), "--host", self.host,
                 "--api-key", "$ERPD_SGLANG_API_KEY"] for k in range(self.servers_per_node)]


@dataclass
class Recipe:
    name: str
    description: str
    model: str
    """key of erpd_megatron.model_shapes.MODELS (the HF config the planner checks)"""
    layout: Layout
    trainer: list[str]
    """trainer command without overrides, e.g. ["erpd", "run", "--config", PRESET]"""
    overrides: dict[str, str] = field(default_factory=dict)
    """trainer overrides key -> value (recipe defaults; CLI key=value items are added)"""
    nodes: int = 1
    gpus_per_node: int = 8
    """0: a CPU job (no --gpus-per-node line, CPU_ENV instead of the GPU environment)"""
    tasks_per_node: int = 1
    """Slurm tasks (torchrun agents) per node, each running gpus_per_node / tasks_per_node processes (1
    without GPUs). 1 on real clusters; the one-node test cluster uses 2 to run the multi-node rendezvous"""
    torchrun: bool = True
    """launch the trainer through torchrun (one process per GPU); False: one plain process per task"""
    run_root: str = field(default_factory=lambda: os.environ.get("ERPD_RUN_ROOT", "runs"))
    """run directories live at RUN_ROOT/NAME: rerunning a recipe with the same name resumes it"""
    slurm: SlurmSettings = field(default_factory=SlurmSettings)
    rollout_servers: RolloutServers | None = None
    hardware: Hardware = field(default_factory=lambda: dataclasses.replace(H100))
    """what the planner checks memory against"""

    @property
    def run_dir(self) -> str:
        """Absolute (a relative run_root is the caller's directory's): the job's tasks start in the code dir."""
        return os.path.abspath(os.path.join(self.run_root, self.name))

    @property
    def procs_per_task(self) -> int:
        """torchrun --nproc-per-node: the task's share of the node's GPUs, or 1 process on CPU nodes."""
        return max(1, self.gpus_per_node // self.tasks_per_node)

    def trainer_overrides(self) -> dict[str, str]:
        """Layout-derived keys, then the recipe's / user's overrides, then the run directory."""
        out = {key: str(getattr(self.layout, f)) for f, key in TRAINER_KEYS.items()} if self.torchrun else {}
        out.update(self.overrides)
        out["run_dir"] = self.run_dir
        return out

    def trainer_argv(self) -> list[str]:
        return list(self.trainer) + [f"{k}={v}" for k, v in self.trainer_overrides().items()]


# ----------------------------------------------------------------------------------------- recipes
def _cpu_slurm() -> SlurmSettings:
    # CPU nodes: no container unless one is set (ERPD_CONTAINER_IMAGE), no node exclusivity, no GPU env
    return SlurmSettings(time="01:00:00", exclusive=False, env=dict(CPU_ENV))


def _cpu_recipe(name: str, description: str, trainer: list[str], micro_batch: int, global_batch: int,
                seq_len: int) -> Recipe:
    """One CPU node, one process, fp32, no GPU, no container: the shape shared by the CPU recipes."""
    return Recipe(
        name=name,
        description=description,
        model="qwen3-toy",
        layout=Layout(tp=1, pp=1, dp=1, micro_batch=micro_batch, global_batch=global_batch, seq_len=seq_len,
                      param_dtype="fp32", grad_dtype="fp32", attention="unfused", recompute="none", nodes=None,
                      gpus_per_node=1),
        trainer=trainer,
        nodes=1,
        gpus_per_node=0,
        torchrun=False,
        slurm=_cpu_slurm(),
        # this machine: 24 GiB RAM shared with the OS and the rollout engine, ~0.1 TFLOP/s fp32 on 2 cores
        hardware=dataclasses.replace(CPU_HOST),
    )


def cpu_demo() -> Recipe:
    """The tiny ERPD pipeline on one CPU node (what `make demo` runs), no GPU, no container needed."""
    return _cpu_recipe("cpu_demo", "tiny Qwen3 toy task on CPU, one process", ["erpd", "demo"],
                       micro_batch=128, global_batch=256, seq_len=48)


def cpu_micro() -> Recipe:
    """The CI-sized pipeline (erpd_megatron/presets/micro.yaml) on one CPU node: what the local Slurm tests
    submit. `torchrun=true tasks_per_node=2 layout.dp=2` makes it a two-task DP=2 gloo job."""
    return _cpu_recipe("cpu_micro", "micro preset (toy task) on CPU, one process; no GPU, no container",
                       ["erpd", "run", "--config", "micro"],
                       micro_batch=16, global_batch=64, seq_len=64)


def colocated_sglang(layout: Layout) -> dict[str, str]:
    """Trainer overrides that carry a colocated layout's SGLang settings to the servers: trainer rank 0
    launches one TP=rollout_tp server per TP group of its node (GPUs shared with training), holding
    rollout_mem_fraction of each GPU, memory released while the trainer trains. Only rank 0's node
    serves: servers are launched by rank 0, not per node."""
    return {"rollout.engine": "sglang", "rollout.sglang_tp": str(layout.rollout_tp),
            "rollout.sglang_num_servers": str(layout.gpus_per_node // layout.rollout_tp),
            "rollout.sglang_mem_fraction_static": str(layout.rollout_mem_fraction),
            "rollout.sglang_offload": "true", "rollout.sglang_weight_transport": "tensor"}


def qwen3_4b_1node() -> Recipe:
    """Qwen3-4B ERPD on one node of 8 H100: TP1 x DP8 training, colocated SGLang TP1 rollouts."""
    r = Recipe(
        name="qwen3_4b_1node",
        description="Qwen3-4B, 1 x 8 H100, TP1 DP8, colocated SGLang TP1",
        model="qwen3-4b",
        layout=Layout(tp=1, pp=1, dp=8, cp=1, micro_batch=1, global_batch=256, seq_len=8192, recompute="selective",
                      nodes=1, gpus_per_node=8, rollout="colocated", rollout_tp=1, rollout_mem_fraction=0.5),
        trainer=["erpd", "run", "--config", "qwen3_4b"],
        overrides={"model.base": "/models/Qwen3-4B"},
        nodes=1,
    )
    r.overrides.update(colocated_sglang(r.layout))
    return r


def qwen35_27b() -> Recipe:
    """Qwen3.5-27B ERPD on 4 x 8 H100: TP4 x PP2 x DP4 training, colocated SGLang TP4 rollouts (the two
    servers of trainer rank 0's node: the engine launches servers from rank 0 only)."""
    r = Recipe(
        name="qwen35_27b",
        description="Qwen3.5-27B, 4 x 8 H100, TP4 PP2 DP4, colocated SGLang TP4 (2 servers, rank 0's node)",
        model="qwen3.5-27b",
        layout=Layout(tp=4, pp=2, dp=4, cp=1, micro_batch=1, global_batch=256, seq_len=8192, recompute="selective",
                      nodes=4, gpus_per_node=8, rollout="colocated", rollout_tp=4, rollout_mem_fraction=0.5),
        trainer=["erpd", "run", "--config", "qwen35_27b"],
        overrides={"model.base": "/models/Qwen3.5-27B"},
        nodes=4,
        slurm=SlurmSettings(time="08:00:00"),
    )
    r.overrides.update(colocated_sglang(r.layout))
    return r


def qwen35_27b_disagg() -> Recipe:
    """Qwen3.5-27B with separate rollout nodes: 4 training nodes (TP4 PP2 DP4) + 2 SGLang nodes, one
    heterogeneous Slurm job; the trainer attaches to the servers and pushes weights over NCCL."""
    r = qwen35_27b()
    r.name = "qwen35_27b_disagg"
    r.description = "Qwen3.5-27B, 4 x 8 H100 training + 2 x 8 H100 SGLang, 2 TP4 servers a node (heterogeneous job)"
    r.layout.rollout = "disaggregated"
    r.layout.rollout_nodes = 2
    r.layout.rollout_mem_fraction = 0.85
    r.rollout_servers = RolloutServers(nodes=2, tp=4, mem_fraction=0.85, model_path="/models/Qwen3.5-27B")
    for key in ("rollout.sglang_num_servers", "rollout.sglang_mem_fraction_static", "rollout.sglang_offload"):
        del r.overrides[key]  # colocated-only settings: these servers are launched by the rollout group
    # filled in by the batch script from the rollout group's host list (one URL per server)
    r.overrides["rollout.sglang_urls"] = "$ROLLOUT_URLS"
    r.overrides["rollout.sglang_tp"] = "4"
    # NCCL broadcast from trainer rank 0 (CUDA IPC cannot cross nodes); the engine picks rank 0's
    # address as the servers reach it and a free port
    r.overrides["rollout.sglang_weight_transport"] = "distributed"
    return r


RECIPES: dict[str, typing.Callable[[], Recipe]] = {
    "cpu_demo": cpu_demo,
    "cpu_micro": cpu_micro,
    "qwen3_4b_1node": qwen3_4b_1node,
    "qwen35_27b": qwen35_27b,
    "qwen35_27b_disagg": qwen35_27b_disagg,
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]()
    except KeyError:
        raise KeyError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}") from None


# ----------------------------------------------------------------------------------------- overrides
_SECTIONS = {"layout": "layout", "slurm": "slurm", "rollout_servers": "rollout_servers"}
_RECIPE_FIELDS = {"name", "nodes", "gpus_per_node", "tasks_per_node", "torchrun", "run_root", "model"}


def _coerce(tp, raw: str, where: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if raw in ("None", "null", ""):
            return None
        return _coerce(args[0], raw, where)
    if tp is bool:
        v = yaml.safe_load(raw)
        if not isinstance(v, bool):
            raise ValueError(f"override {where}: expected true/false, got {raw!r}")
        return v
    if tp in (int, float):
        try:
            return tp(raw)
        except ValueError:
            raise ValueError(f"override {where}: expected {tp.__name__}, got {raw!r}") from None
    if origin in (list, dict):
        v = yaml.safe_load(raw)
        if not isinstance(v, origin):
            raise ValueError(f"override {where}: expected a {origin.__name__} (YAML), got {raw!r}")
        return v
    return raw  # str and Literal[...] (the planner validates the literal choices)


def _set_field(obj, name: str, raw: str, where: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if name not in fields:
        raise ValueError(f"override {where}: unknown field {name!r} of {type(obj).__name__}; "
                         f"valid: {sorted(fields)}")
    hints = typing.get_type_hints(type(obj))
    setattr(obj, name, _coerce(hints[name], raw, where))


def apply_overrides(recipe: Recipe, items: list[str], nodes: int | None = None) -> Recipe:
    """A copy of `recipe` with `key=value` items applied: `layout.*`, `slurm.*` (incl. `slurm.env.KEY`),
    `rollout_servers.*` and recipe fields (`nodes`, `name`, `run_root`, ...) change the recipe; any other
    key is a trainer override. `nodes` (from --nodes) also rescales DP to fill the nodes."""
    r = copy.deepcopy(recipe)
    layout_touched = False
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        head, _, rest = key.partition(".")
        if head == "slurm" and rest.startswith("env."):
            r.slurm.env[rest[4:]] = raw
        elif head in _SECTIONS and rest:
            target = getattr(r, _SECTIONS[head])
            if target is None:
                raise ValueError(f"override {key}: recipe {r.name} has no {head} section")
            _set_field(target, rest, raw, key)
            layout_touched |= head == "layout"
        elif not rest and key in _RECIPE_FIELDS:
            _set_field(r, key, raw, key)
            if key == "nodes":
                nodes = r.nodes
        else:
            r.overrides[key] = raw
    per_node = r.tasks_per_node * r.procs_per_task  # trainer processes per node
    if nodes is not None:
        r.nodes = nodes
        r.layout.nodes = nodes
        if "layout.dp" not in " ".join(items):
            r.layout.dp = max(1, nodes * per_node // (r.layout.tp * r.layout.pp * r.layout.cp))
    elif layout_touched and r.layout.nodes is not None and not any(i.startswith("layout.dp=") for i in items):
        # TP/PP/CP changed on a fixed node count: DP fills the nodes
        r.layout.dp = max(1, r.layout.nodes * per_node // (r.layout.tp * r.layout.pp * r.layout.cp))
    return r
