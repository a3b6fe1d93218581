"""The `cycleinr` command: upsample, snli, evaluate.

Every command turns bad input, and a file it cannot write, into one line on stderr and exit
code 2; an interrupt, SIGTERM (how a GUI cancels) or SIGHUP (a closed terminal) leaves no
partial output and exits 130, and so does a GUI that goes away while it reads the JSON progress
lines.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from . import __version__
from .errors import InputError, ProgressReaderGone, UpsampleCancelled

EXIT_BAD_INPUT = 2
EXIT_CANCELLED = 130


class _UsageError(Exception):
    pass


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (exit 2) rather than a usage dump."""

    def error(self, message: str):  # noqa: D401 - argparse hook
        if message.endswith("expected one argument"):  # "argument -o/--output-dir: expected one argument"
            option = message.split()[1].rstrip(":").split("/")[-1]
            message += f" (a value that starts with '-' is written {option}=VALUE)"
        raise _UsageError(f"{self.prog}: error: {message}")


JSON_OPTIONS = ("json_progress", "json")  # upsample's and evaluate's JSON lines; snli's JSON result


def _json_requested(parser: argparse.ArgumentParser, argv: list[str]) -> bool:
    """Whether a GUI or script asked a command for JSON on stdout, also where the arguments
    failed to parse (argparse takes any unambiguous prefix of an option)."""
    command = parser.command_parsers.get(argv[0]) if argv else None
    if command is None:
        return False
    options = ["--" + dest.replace("_", "-") for dest in JSON_OPTIONS if command.get_default(dest) is not None]
    return any(len(argument) > 3 and option.startswith(argument) for option in options for argument in argv)


def build_parser() -> argparse.ArgumentParser:
    from . import command_evaluate, command_snli, command_upsample

    parser = _ArgumentParser(prog="cycleinr", description=__doc__ and __doc__.splitlines()[0])  # None under -OO
    parser.add_argument("--version", action="version", version=f"cycleinr {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)
    for module in (command_upsample, command_snli, command_evaluate):
        module.register(commands)
    parser.command_parsers = commands.choices
    return parser


def _terminate_as_interrupt(signum, frame):
    for cancel in _cancel_signals():  # a second request must not interrupt the clean-up of the first
        signal.signal(cancel, signal.SIG_IGN)
    raise KeyboardInterrupt


def _cancel_signals() -> list:
    """Ctrl-C, SIGTERM and SIGHUP where they exist, but not one the caller set to be ignored
    (`nohup` ignores SIGHUP, a shell script's `cmd &` SIGINT): that run must go on."""
    names = ("SIGINT", "SIGTERM", "SIGHUP")
    return [number for number in (getattr(signal, name) for name in names if hasattr(signal, name))
            if signal.getsignal(number) is not signal.SIG_IGN]


def _streams_that_cannot_fail() -> None:
    """Python leaves sys.stdout or sys.stderr None when it starts with that file closed
    (`2>&-`); the messages then go nowhere instead of failing the run. A stream whose encoding
    lacks a character of a file name (`PYTHONIOENCODING=ascii`) writes it escaped rather than
    fail after the output was written."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None:
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))
        elif stream.errors == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def main(argv: list[str] | None = None) -> int:
    _streams_that_cannot_fail()
    for cancel in _cancel_signals():
        signal.signal(cancel, _terminate_as_interrupt)
    try:
        parser = build_parser()  # imports torch: seconds in which a cancel must not give a traceback
    except KeyboardInterrupt:
        print("cycleinr: cancelled; nothing was written", file=sys.stderr)
        return EXIT_CANCELLED
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's multi-line warnings; the checks here say what matters
    try:
        args = parser.parse_args(argv)
    except _UsageError as error:
        if _json_requested(parser, sys.argv[1:] if argv is None else argv):
            print(json.dumps({"event": "error", "message": str(error)}), flush=True)
        print(error, file=sys.stderr)
        return EXIT_BAD_INPUT
    reporter = args.make_reporter(args)
    try:
        return args.run(args, reporter) or 0
    except InputError as error:
        reporter.error(str(error))
        return EXIT_BAD_INPUT
    except OSError as error:  # a full disk, a folder removed while writing: outside the program, one line too
        reporter.error(f"{error.filename}: {error.strerror}" if error.filename and error.strerror
                       else f"cannot read or write: {error.strerror or error}")
        return EXIT_BAD_INPUT
    except (KeyboardInterrupt, UpsampleCancelled) as cancelled:
        reason = str(cancelled) if isinstance(cancelled, ProgressReaderGone) else "cancelled"
        reporter.error(f"{reason}; nothing was written")
        return EXIT_CANCELLED


if __name__ == "__main__":
    sys.exit(main())
