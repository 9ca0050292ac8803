"""What every stage shares: run dir, tokenizer, datasets, reward, the rollout engine and Megatron policies.

One object per process. Under torchrun (TP/PP/DP > 1) every rank builds the Megatron policy; only rank 0
owns the rollout engine, the reward pool and the files it writes (weights reach it through the
resharding path, `rollout/weight_sync.py`). On one CPU process everything lives here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from erpd_megatron.config import RunConfig
from erpd_megatron.pipeline.rundir import RunDir

log = logging.getLogger("erpd")


@dataclass
class Context:
    cfg: RunConfig
    run: RunDir
    base_hf: Path
    """HF directory of the base policy (config, weights, tokenizer)."""
    tokenizer: object
    model_cfg: object
    """erpd_megatron.megatron.model.ModelConfig of the base policy."""
    train_prompts: list = field(default_factory=list)
    eval_prompts: list = field(default_factory=list)
    _engine: object = None
    _ref_engine: object = None
    _reward: object = None
    _par: object = None
    _idle: list = field(default_factory=list)
    """Released PolicyEngines `new_policy` may hand out again (model.reuse_engines)."""
    engines_built: int = 0
    """PolicyEngines `new_policy` built (not reused) in this process."""
    syncs: int = 0
    """Weight syncs to the rollout engine in this process (the weight check names them)."""
    _probe: object = None

    # ------------------------------------------------------------------ parallel / ranks
    @property
    def par(self):
        if self._par is None:
            from erpd_megatron.megatron.parallel import ParallelConfig, init_parallel
            from erpd_megatron.utils.timing import stage

            m = self.cfg.model
            self._par = ParallelConfig(tp=m.tp, pp=m.pp, dp=m.dp)
            with stage("parallel_init"):  # the first megatron.core import is here too
                init_parallel(self._par, seed=self.cfg.seed)
        return self._par

    @property
    def is_main(self) -> bool:
        return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0

    def barrier(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    # ------------------------------------------------------------------ rollout side (rank 0)
    @property
    def engine(self):
        """The rollout engine (LocalEngine on CPU); holds whatever weights were pushed last."""
        if self._engine is None:
            if self.cfg.rollout.engine == "sglang":
                from erpd_megatron.rollout.sglang_engine import SGLangEngine

                # server logs and "disk" weight pushes live in the run directory (never a fixed /tmp path)
                self._engine = SGLangEngine.from_config(self.cfg.rollout, model_path=str(self.base_hf),
                                                        log_dir=str(self.run.root / "logs"),
                                                        disk_dir=str(self.run.root / "sglang_weights"))
            else:
                from erpd_megatron.rollout.local_engine import LocalEngine

                self._engine = LocalEngine.from_pretrained(self.base_hf)
                self._engine.tokenizer = self.tokenizer
        return self._engine

    @property
    def ref_engine(self):
        """Frozen base policy, only used to score log pi_base(y) for the reported reverse KL."""
        if self._ref_engine is None:
            from erpd_megatron.rollout.local_engine import LocalEngine

            self._ref_engine = LocalEngine.from_pretrained(self.base_hf)
        return self._ref_engine

    @property
    def reward(self):
        """RewardRouter: each record's reward (math-verify, sandboxed code, custom) by its data_source / tests;
        `score_batch(texts, prompts)`."""
        if self._reward is None:
            from erpd_megatron.rewards.router import make_router

            self._reward = make_router(self.cfg.reward, mode=self.cfg.rollout.reward_mode)
        return self._reward

    def encode(self, prompts: list) -> list[list[int]]:
        """Token ids of prompts as the engine sees them (data.instruction / system / chat_template_kwargs)."""
        from erpd_megatron.config import is_toy_base
        from erpd_megatron.data.prompts import encode_prompts, resolve_instruction

        d = self.cfg.data
        instruction = resolve_instruction(d.instruction, toy=is_toy_base(str(self.base_hf)))
        return encode_prompts(self.tokenizer, prompts, instruction=instruction,
                              system=d.system or None, chat_template_kwargs=d.chat_template_kwargs)

    def close(self) -> None:
        if self._reward is not None:
            self._reward.close()
            self._reward = None
        # SGLang servers run in their own sessions: without this they outlive the run (found with a real server)
        if self._engine is not None and hasattr(self._engine, "shutdown"):
            self._engine.shutdown()
            self._engine = None

    # ------------------------------------------------------------------ Megatron side (all ranks)
    def new_policy(self, lr: float = 0.0, total_steps: int = 1, warmup_steps: int = 0, init: Path | None = None):
        """A PolicyEngine holding the model weights of the Megatron checkpoint `init` (default: the base), in the
        state a fresh build has (no optimizer state, step 0, this OptimConfig). With `model.reuse_engines` an
        engine given back by `release` is reset and reloaded in place instead of building another."""
        from erpd_megatron.megatron.engine import OptimConfig, PolicyEngine
        from erpd_megatron.utils.timing import stage

        optim = OptimConfig(lr=lr, min_lr=lr, warmup_steps=warmup_steps, clip_grad=1.0,
                            micro_batch_size=self.cfg.model.micro_batch_size)
        path, par = str(init or self.base_ckpt(0)), self.par
        engine = self._take_idle(optim) if self.cfg.model.reuse_engines else None
        if engine is None:
            with stage("model_build"):
                engine = PolicyEngine(self.model_cfg, par, optim, self.build_opts(), seed=self.cfg.seed,
                                      temperature=self.cfg.rollout.temperature)
            self.engines_built += 1
        else:
            with stage("model_reset"):
                engine.reset(optim, temperature=self.cfg.rollout.temperature)
        with stage("checkpoint_load"):
            engine.load(path, model_only=True)
        return engine

    def build_opts(self):
        """BuildOptions of every Megatron model of the run (policies and critic): `model.fp8` selects Transformer
        Engine's FP8 (hybrid format, delayed scaling), which needs the TE spec (CUDA + TE; the CLI refuses it
        otherwise, `checks.check_environment`)."""
        from erpd_megatron.megatron.model import BuildOptions

        return BuildOptions(fp8="hybrid" if self.cfg.model.fp8 else None)

    def _take_idle(self, optim):
        """An idle engine whose model, layout and construction-time optimizer settings fit, or None."""
        from erpd_megatron.megatron.engine import PolicyEngine, reuse_key

        want = reuse_key(self.model_cfg, self.par, optim, self.build_opts())  # what new_policy would build
        for i, e in enumerate(self._idle):
            if type(e) is PolicyEngine and e.reuse_key() == want:
                return self._idle.pop(i)
        return None

    def release(self, policy) -> None:
        """`policy` (from `new_policy`) is no longer used by its caller: `new_policy` may reset and hand it out again.
        Every later call of the old owner on it (log-probs, training, saving, weight sync) raises until then; a
        second release raises. With `model.reuse_engines` false, nothing is kept (the caller's reference goes)."""
        if policy is None or not self.cfg.model.reuse_engines:
            return
        if policy.idle:
            raise RuntimeError("Context.release: this PolicyEngine was released already")
        if not policy.reusable:
            return
        policy.idle = True
        self._idle.append(policy)

    def drop_idle(self) -> None:
        """Forget the released engines (before building a model outside the pool, e.g. a critic: memory then
        holds what it held without reuse)."""
        self._idle.clear()

    def base_ckpt(self, iteration: int) -> Path:
        """Megatron checkpoint of the base policy of `iteration` (0: imported from HF; i: student of i-1)."""
        if iteration == 0:
            if not (self.run.base / "latest").exists():
                m = self.cfg.model
                if m.tp * m.pp * m.dp > 1:
                    _ = self.par  # join the world first: before it exists every rank is "main" and barrier() is a no-op
                if self.is_main:  # several ranks: a child process (the converter needs a world of one)
                    import os
                    import subprocess
                    import sys

                    from erpd_megatron.utils.console import header
                    from erpd_megatron.utils.timing import stage

                    header("import the base policy", f"{self.base_hf} -> Megatron checkpoint {self.run.base}")
                    with stage("base_import"):
                        if m.tp * m.pp * m.dp == 1:
                            _import_in_process(self.base_hf, self.run.base)
                        else:
                            cmd = [sys.executable, "-m", "checkpoints_conv", "import", "--hf", str(self.base_hf),
                                   "--out", str(self.run.base), "--tp", str(m.tp), "--pp", "1", "--overwrite"]
                            # without the launcher's RANK / WORLD_SIZE / MASTER_*: the child is a world of one
                            env = {k: v for k, v in os.environ.items()
                                   if k not in _LAUNCHER_VARS and not k.startswith("TORCHELASTIC_")}
                            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                            if out.returncode != 0:
                                raise RuntimeError(f"importing the base policy failed: {' '.join(cmd)}\n"
                                                   f"{out.stderr[-3000:]}")
                self.barrier()
            return self.run.base
        marker = self.run.root / f"iter_{iteration - 1}" / "promoted.json"
        return Path(json.loads(marker.read_text())["checkpoint"])

    def push_weights(self, policy, version) -> None:
        """Megatron -> rollout engine through the resharding path (TP gather, PP broadcast, HF names); then, with
        `rollout.verify_weights`, the check that the weights arrived (`verify_sync`). Every rank calls it."""
        from erpd_megatron.rollout.weight_sync import iter_hf_buckets
        from erpd_megatron.utils.timing import stage

        with stage("weight_sync"):
            if self._push_per_gpu(policy, version):
                return
            buckets = iter_hf_buckets(policy, receivers="rank0")
            if self.is_main:
                self.engine.update_weights(buckets, version=version)
            else:  # non-zero ranks still take part in the collectives
                for _ in buckets:
                    pass
        self.syncs += 1
        if self.cfg.rollout.verify_weights:
            self.verify_sync(policy, version)

    def verify_sync(self, policy, version) -> dict:
        """The weights-arrived guard (rollout/weight_check.py): the engine's log-probs on the first
        `rollout.verify_weights_seqs` training prompts (at least one per SGLang server) against the trainer's;
        raises WeightSyncMismatch on every rank on a mismatch. Timed as the "weight_verify" stage."""
        from erpd_megatron.rollout.weight_check import check_sync
        from erpd_megatron.utils.timing import stage

        r = self.cfg.rollout
        with stage("weight_verify"):
            if self._probe is None:
                from erpd_megatron.data.prompts import encode_prompts
                from erpd_megatron.rollout.weight_check import make_probe

                servers = (len(r.sglang_urls) or r.sglang_num_servers) if r.engine == "sglang" else 1
                n = max(r.verify_weights_seqs, servers)
                ids = encode_prompts(self.tokenizer, self.train_prompts[:n], instruction=self.cfg.data.instruction or None)
                self._probe = make_probe(ids, n)
            engine = self.engine if self.is_main else None
            return check_sync(policy, engine, self._probe, sync=self.syncs, version=version,
                              engine_dtype=getattr(engine, "dtype", None), mean_tol=r.verify_weights_tol,
                              is_main=self.is_main)


    def _push_per_gpu(self, policy, version) -> bool:
        """Colocated SGLang on GPUs: each trainer rank feeds the server TP rank on its own GPU
        (rollout/colocated.py). False (nothing done) when that does not apply or a server GPU has no trainer
        rank on it; then rank 0 sends everything."""
        from erpd_megatron.rollout import colocated

        if colocated.choose_receivers(self.cfg.rollout, cuda=torch.cuda.is_available()) != "per_gpu" \
                or not torch.distributed.is_initialized():
            return False
        r = self.cfg.rollout
        gpus = colocated.server_gpus(r.sglang_base_gpu_id, r.sglang_tp, r.sglang_num_servers)
        owners = colocated.gpu_owners(torch.cuda.current_device())
        missing = colocated.missing_gpus(owners, gpus)
        if missing:
            if self.is_main:
                log.warning("no trainer rank on server GPU(s) %s: rank 0 sends every tensor", missing)
            return False
        colocated.push_per_gpu(policy, self.engine if self.is_main else None, version, owners=owners, gpus=gpus)
        return True


#: set by torchrun for its workers; a child process that inherits them joins (and hangs) the parent's world
_LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                  "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _import_in_process(hf: Path, out: Path) -> None:
    """HF -> Megatron base checkpoint in this process (one rank: the converter's TP=PP=1 world is the trainer's).
    A subprocess would start a second interpreter and import torch and megatron again: most of the import's
    wall time on the micro run (docs/benchmarks.md section 6)."""
    from checkpoints_conv.config import ConversionError
    from checkpoints_conv.convert import import_hf

    try:
        import_hf(str(hf), str(out), tp=1, pp=1, overwrite=True)
    except ConversionError as e:
        raise RuntimeError(f"importing the base policy failed: {e}") from e
    except BaseException as e:  # torch DCP raises CheckpointException, a BaseException
        if isinstance(e, KeyboardInterrupt | SystemExit):
            raise
        from erpd_megatron.utils.io import disk_full_error

        # the partial output is gone already (import_hf writes a temp dir, renamed at the end); the import
        # writes about as many bytes as the HF weights hold
        need = sum(f.stat().st_size for f in Path(hf).iterdir() if f.suffix in (".safetensors", ".bin"))
        full = disk_full_error(e, out, need_bytes=need, doing="importing the base policy")
        if full is None:
            raise
        raise full from e


# model.base names of the locally warmed bases -> their WarmupConfig in toy/warmup.py
TOY_BASES = {"toy": "DEMO_BASE", "toy_long": "LONG_BASE"}
# data.train / data.eval names of the synthetic tasks -> their module in erpd_megatron/toy/ (train draws come from
# the training partition whichever name; "*_val" evaluates on the validation split, the plain name on the test split)
TOY_DATA = {"toy": "task", "toy_val": "task", "long": "chain", "long_val": "chain",
            "toy_code": "code_task", "toy_code_val": "code_task"}


def resolve_base(cfg: RunConfig, run: RunDir) -> Path:
    """HF directory of the base policy; "toy" / "toy_long" warm up the tiny Qwen3 model on the toy / long task
    (cached in the run dir and in the shared cache)."""
    if cfg.model.base in TOY_BASES:
        from erpd_megatron.toy import warmup
        from erpd_megatron.utils.console import header

        header(f"{cfg.model.base} base policy", "supervised warm-up on first use, cached after")
        return warmup.ensure_base_model(run.root / "hf_base", getattr(warmup, TOY_BASES[cfg.model.base]),
                                        log=logging.getLogger("erpd.warmup").info)  # above the bar
    if cfg.model.base == "toy_code":  # the toy code task's base (toy/code_base.py), warmed on first use
        from erpd_megatron.toy.code_base import warmup_code_base

        return warmup_code_base(run.root / "hf_base", log=logging.getLogger("erpd.warmup").info)
    p = Path(cfg.model.base)
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"model.base: {p} is not a Hugging Face checkpoint directory (no config.json)")
    return p


def _load_field(cfg: RunConfig, field_name: str, path: str) -> list:
    """Prompts of a user-given file; an error names the config field as well as the file and row."""
    from erpd_megatron.data.prompts import PromptDataError, load_prompts

    try:
        return load_prompts(path, cfg.data.prompt_key, cfg.data.answer_key)
    except PromptDataError as e:
        raise PromptDataError(f"{field_name}: {e}") from None


def load_prompts(cfg: RunConfig, run: RunDir):
    """(train, eval) prompt lists. "toy" writes the toy task's JSONL files into the run dir, but only once every
    user-given file has loaded: a malformed file leaves nothing behind."""
    from erpd_megatron.data.prompts import load_prompts as _load

    loaded = {w: _load_field(cfg, f"data.{w}", s) for w, s in (("train", cfg.data.train), ("eval", cfg.data.eval))
              if s not in TOY_DATA}
    paths = []
    for which, spec, n in (("train", cfg.data.train, cfg.data.prompts_per_batch * max(cfg.iterations, 1) * 4),
                           ("eval", cfg.data.eval, cfg.data.eval_prompts)):
        if spec in TOY_DATA:  # *_val: the task's validation split (tuning), disjoint from its test split
            import importlib

            task = importlib.import_module(f"erpd_megatron.toy.{TOY_DATA[spec]}")
            path = run.root / "data" / f"{spec}_{which}.jsonl"
            if not path.exists():
                draw = task.train_problems if which == "train" else \
                    task.validation_problems if spec.endswith("_val") else task.eval_problems
                split = "train" if which == "train" else "validation" if spec.endswith("_val") else "eval"
                # at most the whole task: check_dataset_sizes then refuses too few, as for a JSONL file
                task.write_jsonl(draw(min(n, task.pool_size(split)), seed=cfg.seed), path)
            spec = str(path)
        paths.append(spec)
    train, evals = (loaded[w] if w in loaded else _load(p) for w, p in zip(("train", "eval"), paths))
    return train, evals[: cfg.data.eval_prompts]


def build_context(cfg: RunConfig) -> Context:
    from erpd_megatron.megatron.model import ModelConfig
    from erpd_megatron.pipeline.checks import (
        check_dataset_sizes,
        check_memory,
        check_prompt_lengths,
        check_tokenizer,
        load_tokenizer,
    )

    run = RunDir(Path(cfg.run_dir))
    if cfg.reward.custom:  # a bad spec fails in one line now, not when the first batch is scored
        from erpd_megatron.rewards.custom import load_function

        load_function(cfg.reward.custom)
    with _undo_if_refused(run.root):  # a refused run leaves nothing behind (the lock removes the empty dir)
        if cfg.model.base not in (*TOY_BASES, "toy_code"):  # a wrong path fails before the toy data files are written
            resolve_base(cfg, run)
        train, evals = load_prompts(cfg, run)  # bad data fails here, before the warm-up or any training
        check_dataset_sizes(cfg, train, evals)
        # the batch's memory: a lower bound (every prompt has a token) before the warm-up, exact once tokenized
        check_memory(cfg, cfg.rollout.max_new_tokens + 1, len(evals))
        run.root.mkdir(parents=True, exist_ok=True)
        base = resolve_base(cfg, run)
        tok = load_tokenizer(base, "model.base")
        check_tokenizer(tok, base, train + evals, "model.base")
        model_cfg = ModelConfig.from_hf(json.loads((base / "config.json").read_text()))
        ctx = Context(cfg=cfg, run=run, base_hf=base, tokenizer=tok, model_cfg=model_cfg,
                      train_prompts=train, eval_prompts=evals)
        ctx.train_prompts, ctx.eval_prompts, longest = check_prompt_lengths(cfg, ctx.encode, train, evals,
                                                                            model_cfg.max_position_embeddings)
        check_memory(cfg, min(model_cfg.max_position_embeddings, longest + cfg.rollout.max_new_tokens),
                     len(ctx.eval_prompts))
    return ctx


#: what `build_context` writes before the run is accepted (toy data files, the toy base's warm-up)
_PRE_ACCEPT = ("data", "hf_base")


@contextlib.contextmanager
def _undo_if_refused(root: Path):
    """On a user error (utils/cli.py: bad config or data, a full disk) remove what the block added under
    `_PRE_ACCEPT`, so the refused run leaves the run dir as it found it; an earlier run's files stay."""
    from erpd_megatron.utils.cli import is_user_error

    def entries() -> set[Path]:
        return {p for d in _PRE_ACCEPT if (root / d).is_dir() for p in [root / d, *(root / d).iterdir()]}

    before = entries()
    try:
        yield
    except Exception as e:
        if is_user_error(e):
            for p in sorted(entries() - before, key=lambda p: -len(p.parts)):  # files before their directory
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        raise


class Timer:
    """Wall-clock accumulated per method across resumes (stored beside the metrics)."""

    def __init__(self, run: RunDir, method: str):
        self.path = run.root / "metrics" / f"{method}.wall.json"
        self.prev = json.loads(self.path.read_text())["wall_s"] if self.path.exists() else 0.0
        self.t0 = time.perf_counter()

    def total(self) -> float:
        return self.prev + time.perf_counter() - self.t0

    def save(self) -> None:
        from erpd_megatron.utils.io import atomic_write_json

        atomic_write_json(self.path, {"wall_s": self.total()})


def setup_logging() -> None:
    """Console logging above tqdm bars, megatron's INFO chatter off, known warnings quiet (utils/console.py)."""
    from erpd_megatron.utils.console import setup_logging as _setup

    _setup()
