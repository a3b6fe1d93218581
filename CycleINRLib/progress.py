"""Progress reporting for the command line: a bar on a terminal, JSON lines for a GUI.

JSON protocol (one object per line on stdout, see README "Upsampling your own volume", `--json-progress`):
  {"event": "progress", "fraction": 0.42, "stage": "upsample", "message": "tile 3/8"}
  {"event": "warning", "message": "..."}
  {"event": "error", "message": "..."}            (then exit code 2 for bad input, 1 otherwise)
  {"event": "done", "fraction": 1.0, "stage": "done", "output": "...", ...summary}
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable

from tqdm import tqdm

from .errors import ProgressReaderGone

ProgressCallback = Callable[[float, str], None]


class Reporter:
    """Receives progress, warnings, errors and the final summary of one command."""

    def __init__(self, json_lines: bool, stage: str = "upsample"):
        self.json_lines = json_lines
        self.stage = stage
        self._bar = None

    def progress(self, fraction: float, message: str) -> None:
        if self.json_lines:
            self._emit(event="progress", fraction=round(float(fraction), 4), stage=self.stage, message=message)
            return
        if self._bar is None:
            self._bar = tqdm(total=1000, file=sys.stderr, leave=False, disable=None,
                             bar_format="{l_bar}{bar}| {elapsed}<{remaining}")
        self._bar.set_description_str(f"{self.stage}: {message}"[:60])
        self._bar.update(max(0, int(fraction * 1000) - self._bar.n))

    def set_stage(self, stage: str) -> None:
        self.stage = stage

    def warning(self, message: str) -> None:
        if self.json_lines:
            self._emit(event="warning", message=message)
        self._print(f"warning: {message}")

    def error(self, message: str) -> None:
        self.close()
        if self.json_lines:
            try:
                self._emit(event="error", message=message)
            except (ProgressReaderGone, OSError):  # stdout is what failed: stderr still tells
                pass
        self._print(f"cycleinr: error: {message}")

    def done(self, summary: dict[str, Any], text: str) -> None:
        """The last event; the work is complete, so a reader that left by now changes nothing."""
        self.close()
        if self.json_lines:
            try:
                self._emit(event="done", fraction=1.0, stage="done", **summary)
            except ProgressReaderGone:
                pass
        else:
            try:
                print(text, flush=True)
            except OSError:  # `| true`, or a full disk under a redirected stdout: the output is written all the same
                _discard_further_output(sys.stdout)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _print(self, line: str) -> None:
        try:
            if self._bar is not None:
                self._bar.write(line, file=sys.stderr)
            else:
                print(line, file=sys.stderr, flush=True)
        except OSError:  # the GUI that read stderr is gone too (or a full disk under `2>file`): nobody to tell
            _discard_further_output(sys.stderr)

    @staticmethod
    def _emit(**fields: Any) -> None:
        try:
            print(json.dumps(fields), flush=True)
        except BrokenPipeError:
            _discard_further_output(sys.stdout)
            raise ProgressReaderGone("the program reading the progress lines has gone") from None
        except OSError as error:  # a full disk under `> file`: reported once, and the flush at exit must not raise again
            _discard_further_output(sys.stdout)
            raise OSError(error.errno, error.strerror, "standard output") from None


def _discard_further_output(stream) -> None:
    """Point a stream whose reader has gone at the null device, so that the lines still to come,
    and the flush at exit, do not raise again (Python's documented answer to SIGPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)
