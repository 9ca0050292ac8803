"""Shared argparse pieces of the `erpd` subcommands (kept import-light: `--help` must not load torch)."""

from __future__ import annotations

import argparse


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
