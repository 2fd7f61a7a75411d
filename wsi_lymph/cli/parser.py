"""The argument parser of ``wsi-lymph``: one-line usage errors, a description per command, every default shown."""

from __future__ import annotations

import argparse
from typing import NoReturn

DEBUG_HELP = "print tracebacks and library messages in full (they are always kept in the log file)"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's formatter that appends "(default: …)" to an option's help, unless the help says it already, the
    option is a flag (off unless given) or it has no value by default (the help says what happens then)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.default in (None, False, argparse.SUPPRESS)
                or (not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE))):
            return text
        return f"{text} (default: %(default)s)"


class _Commands(argparse._SubParsersAction):  # noqa: SLF001 - argparse's documented way to extend add_subparsers
    """Sub-commands: each one's ``--help`` opens with its description (its one-line help unless it has its own),
    and each takes ``--debug`` too."""

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        if kwargs.get("help") and not kwargs.get("description"):
            kwargs["description"] = kwargs["help"][:1].upper() + kwargs["help"][1:] + "."
        parser = super().add_parser(name, **kwargs)
        # SUPPRESS: not given here, the top-level --debug (or its False) stays.
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        return parser


class Parser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` whose usage errors are one line: ``wsi-lymph detect: error: argument
    --stride: must be an integer from 1 to 32, got '0' (see wsi-lymph detect --help)``, exit status 2."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.register("action", "parsers", _Commands)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
