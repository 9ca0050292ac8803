"""Shared argparse pieces and the one-line error exit of the `erpd` subcommands (kept import-light: `--help` must
not load torch)."""

from __future__ import annotations

import argparse
import errno
import sys


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions / epilogs as written and ends every option's help with its default, unless the help
    already says it ("(default: stdout)", "off by default")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        said = any(w in text for w in ("default:", "(default", "by default"))
        if not action.option_strings or said or action.default is argparse.SUPPRESS:
            return text
        if action.default is False:
            return text + " (default: off)"
        if action.default is None or action.default == []:
            return text + " (default: none)"
        return text + " (default: %(default)s)"


# ----------------------------------------------------------------------------- user-facing errors
# Exceptions that are the user's input or the machine, not a bug: printed as one line, exit 2 (a bug keeps its
# traceback). Named as (module, class) so this module imports nothing heavy: an exception of a class whose
# module was never imported cannot occur.
USER_ERRORS = (
    ("erpd_megatron.config", "ConfigError"),                  # bad config value (names the field)
    ("erpd_megatron.data.prompts", "PromptDataError"),        # bad prompt file (names file and row)
    ("erpd_megatron.megatron.checkpoint", "CheckpointError"),  # damaged / incomplete checkpoint (names the file)
    ("erpd_megatron.data.rollout_store", "RolloutStoreError"),  # damaged rollout store (names the file)
    ("erpd_megatron.rollout.sglang_http", "SGLangError"),     # unreachable server
    ("erpd_megatron.rollout.weight_check", "WeightSyncMismatch"),  # weights that did not arrive intact
    ("checkpoints_conv.config", "ConversionError"),
    ("erpd_megatron.rewards.sandbox", "SandboxUnavailable"),  # the code sandbox cannot start here (says why)
)
# OSErrors of the machine or the paths given: a full disk or quota, permissions, a missing file
USER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT,
                         errno.EFBIG, errno.ENOTDIR, errno.EISDIR})
MAX_ERROR_CHARS = 1500


def is_user_error(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return isinstance(e, FileNotFoundError) or e.errno in USER_ERRNOS
    for module, name in USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(e, cls):
            return True
    return False


def one_line(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """`text` on one line (line breaks become " | "), at most `limit` characters: a value of megabytes quoted in
    a message is cut in the middle, saying how much was left out."""
    text = " | ".join(x.strip() for x in str(text).splitlines() if x.strip())
    if len(text) <= limit:
        return text
    head, tail = limit * 2 // 3, limit // 3
    return f"{text[:head]} ... [{len(text) - head - tail} characters cut] ... {text[-tail:]}"


def error_exit(prog: str, e: BaseException | str) -> int:
    """Print `prog: error: <one line>` to stderr; the exit code of a refused command (2)."""
    print(f"{prog}: error: {one_line(str(e))}", file=sys.stderr)
    return 2
