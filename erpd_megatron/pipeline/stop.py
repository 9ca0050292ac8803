"""A clean stop on SIGTERM (Slurm's scancel / preemption, `kill`) and SIGINT (Ctrl-C).

The signal raises `Stopped` (a KeyboardInterrupt) in the main thread, so the run unwinds as after any error:
the `finally` blocks run, the run dir's lock is released, worker pools close, and a save in progress is left
as a `.tmp` directory that is never loaded (KeyboardInterrupt is not turned into a CheckpointError: see
`megatron/checkpoint.save_checkpoint`). The files are then exactly as after a SIGKILL at that point, so rerunning
the same command resumes. A second signal while unwinding takes the default action (the process ends at once).
The command exits with 128 + the signal number (143 for SIGTERM, 130 for SIGINT), as a shell reports a kill.
"""

from __future__ import annotations

import contextlib
import signal

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(KeyboardInterrupt):
    """Raised by the handler of SIGTERM / SIGINT."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _handler(signum, frame):
    for s in SIGNALS:  # a second signal while unwinding: the default action (stop now, lock left as after a kill)
        signal.signal(s, signal.SIG_DFL)
    raise Stopped(signum)


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM / SIGINT raise `Stopped` inside the block (main thread only; elsewhere a no-op)."""
    try:
        old = {s: signal.signal(s, _handler) for s in SIGNALS}
    except ValueError:  # not the main thread: signals stay as they are
        yield
        return
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
