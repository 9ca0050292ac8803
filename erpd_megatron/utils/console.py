"""What the operator sees on the terminal: a header per stage, tqdm progress bars on long loops, one compact
line per optimizer step (or every `logging.log_every` steps), and no known-harmless third-party warnings.

Everything here prints on the main rank only (rank 0 under torchrun) and goes through `logging`, whose
handler writes with `tqdm.write` so a line never tears a live progress bar. Bars follow `logging.progress`:
"auto" shows them only on a terminal (a Slurm log or a pipe gets the step lines, not carriage returns).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings

log = logging.getLogger("erpd")

_STATE = {"progress": "auto", "log_every": 1}


def configure(progress: str = "auto", log_every: int = 1) -> None:
    """Set the bar policy ("auto" | "always" | "never") and the step-line period for this process. Hugging Face's
    own bars ("Loading weights") follow the same policy (the variable is read when transformers is imported)."""
    _STATE.update(progress=progress, log_every=max(int(log_every), 1))
    if progress == "never" or (progress == "auto" and not sys.stderr.isatty()):
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "transformers" in sys.modules:  # imported already: the variable is read too late, say it directly
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()


def is_main() -> bool:
    """Rank 0 of a torchrun world, or a plain process (read from the env: no torch import needed)."""
    return os.environ.get("RANK", "0") == "0"


# ----------------------------------------------------------------------------- headers and bars


def header(title: str, detail: str = "") -> None:
    """One visible line announcing a stage, e.g. `==== stage 1: teacher ce (loss ce, 4 steps) ====`."""
    if is_main():
        log.info("==== %s%s ====", title, f" ({detail})" if detail else "")


def _bars_enabled() -> bool | None:
    """tqdm's `disable` argument: None lets tqdm hide the bar when stderr is not a terminal."""
    if not is_main() or _STATE["progress"] == "never":
        return True
    return False if _STATE["progress"] == "always" else None


def progress(iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it"):
    """A tqdm bar (with ETA) on the main rank; a silent pass-through elsewhere. Use as an iterable or call
    `.update(n)` on it; close it (or use `with`) when done."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
                disable=_bars_enabled(), file=sys.stderr)


# ----------------------------------------------------------------------------- step lines

# console label -> metric key (the same key as in the JSONL / TensorBoard / W&B)
STEP_FIELDS = (
    ("loss", "loss"),
    ("kl/tok", "policy/kl_fwd_k3_tok_batch"),
    ("ent", "policy/entropy"),
    ("gnorm", "train/grad_norm"),
    ("tok/s", "perf/tokens_per_s"),
)


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    if 1e3 <= abs(x) < 1e7:  # tokens/s, large grad norms: plain digits
        return f"{x:.0f}"
    if x == 0 or 1e-3 <= abs(x) < 1e3:
        return f"{x:.4g}"
    return f"{x:.2e}"


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def step_line(method: str, step: int, steps: int, metrics: dict, eta_s: float | None = None) -> str:
    """`[ce] step 3/4 | loss 0.1234 | kl/tok 0.0012 | ent 1.23 | gnorm 0.56 | tok/s 1234 | eta 0:04`.

    KL is to the policy that sampled the batch (k3 per token, >= 0 by construction). A negative k1
    per-sequence KL (an unbiased estimate that can fall below 0 on few samples) gets a note."""
    parts = [f"[{method}] step {step}/{steps}"]
    parts += [f"{label} {_fmt(metrics[key])}" for label, key in STEP_FIELDS if key in metrics]
    if eta_s is not None:
        parts.append(f"eta {_duration(eta_s)}")
    line = " | ".join(parts)
    seq = metrics.get("policy/kl_fwd_k1_seq_batch")
    if seq is not None and seq < 0:
        line += f"  (k1 kl/seq {_fmt(seq)} < 0" + (f": {NEGATIVE_KL_NOTE})" if once(NEGATIVE_KL_NOTE) else ")")
    return line


def should_print(step: int, steps: int) -> bool:
    return step % _STATE["log_every"] == 0 or step == steps


def print_step(method: str, step: int, steps: int, metrics: dict, eta_s: float | None = None) -> None:
    if is_main() and should_print(step, steps):
        log.info(step_line(method, step, steps, metrics, eta_s))


NEGATIVE_KL_NOTE = "the k1 estimator is unbiased but not >= 0; a small negative value is sampling noise around 0"


_NOTED: set[str] = set()


def once(note: str) -> bool:
    """True the first time `note` is asked about in this process (a run), False after: explanations that would
    repeat on every line (the k1 note on each negative KL) are said once."""
    if note in _NOTED:
        return False
    _NOTED.add(note)
    return True


def kl_note(kl: float | None) -> str:
    """Suffix for a logged KL value: the note on negative estimates the first time one shows, else empty."""
    return f" ({NEGATIVE_KL_NOTE})" if kl is not None and kl < 0 and once(NEGATIVE_KL_NOTE) else ""


# ----------------------------------------------------------------------------- logging and warnings


class TqdmHandler(logging.StreamHandler):
    """Writes records with tqdm.write, above any live bar (a plain print would tear the bar)."""

    def emit(self, record):
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream or sys.stderr)
        except Exception:  # never let logging kill the run
            self.handleError(record)


def setup_logging(level: str | None = None) -> None:
    """Root logging through TqdmHandler; megatron's per-build INFO chatter off; known warnings quiet."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, TqdmHandler):
            root.removeHandler(h)
    handler = TqdmHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level or os.environ.get("ERPD_LOG", "INFO"))
    # megatron-core logs every bucket / optimizer setting at INFO each time a policy is built
    for name in ("megatron", "megatron.core"):
        logging.getLogger(name).setLevel(logging.WARNING)
    quiet_third_party()


# (category, message prefix, why it is harmless here): the 14 `warnings` of one micro pipeline run on CPU
# (counted in docs/pipeline.md, "Logging"). Matched by message, never by whole category or module, so a new
# warning from the same library still shows.
_NO_TE_APEX = "we run megatron's local (torch) implementations on purpose; TE / Apex are optional GPU extras"
KNOWN_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (UserWarning, "Apex is not installed. Falling back to Torch Norm", _NO_TE_APEX),
    (UserWarning, "Transformer Engine and Apex are not installed", _NO_TE_APEX),
    (UserWarning, "MimoModelConfig is experimental", "imported by megatron.core; ERPD does not use MIMO"),
    (UserWarning, "full scope is deprecated", "megatron's own default cuda_graph_scope; no CUDA graphs here"),
    (UserWarning, "The .grad attribute of a Tensor that is not a leaf Tensor",
     "megatron's optimizer probes main_grad / grad attributes with getattr"),
    (UserWarning, "torch.distributed is disabled, unavailable or uninitialized",
     "a world of one (the converter) reads a checkpoint on purpose"),
    (UserWarning, "The argument order of load has been changed", "torch.distributed.checkpoint inside megatron"),
    (FutureWarning, "Please use DTensor instead and we are deprecating ShardedTensor",
     "megatron's dist_checkpointing still builds ShardedTensors"),
)

# (logger, message prefix, why): third-party `logging` warnings of the same run.
KNOWN_LOG_MESSAGES: tuple[tuple[str, str, str], ...] = (
    ("megatron.core.distributed.distributed_data_parallel", "DistributedDataParallel: full_param_layout not provided",
     "megatron computes the layout itself, once per policy build; the result is the same"),
    ("megatron.core.dist_checkpointing.strategies.torch", "MCore's async save is deprecated",
     "printed when the torch save strategy is built; ERPD saves synchronously"),
    ("torch.utils.cpp_extension", "No CUDA runtime is found", "CPU runs: megatron imports the extension builder"),
    ("megatron.core.models.gpt.gpt_model", "GPTModel IS DEPRECATED",
     "a notice about megatron's future HybridModel; GPTModel is the model class of the pinned megatron-core 0.19"),
)


class _DropKnown(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record):
        return not str(record.msg).startswith(self.prefix)


def quiet_third_party() -> None:
    """Filter KNOWN_WARNINGS and KNOWN_LOG_MESSAGES (ERPD_SHOW_WARNINGS=1 keeps them all)."""
    if os.environ.get("ERPD_SHOW_WARNINGS") == "1":
        return
    import re

    for category, message, _why in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category)
    for name, prefix, _why in KNOWN_LOG_MESSAGES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropKnown(prefix))
