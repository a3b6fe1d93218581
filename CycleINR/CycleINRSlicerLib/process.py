"""Drives `cycleinr upsample --json-progress` in a separate process.

The model runs outside Slicer so that an out-of-memory kill or a crash in torch cannot take
the application and the user's scene down. This file needs only the standard library and
CycleINRLib's exceptions (no torch, no numpy): the blocking scripting call and the panel's timer both use `UpsampleProcess`, and pytest runs
it against the real command line.

Slicer's `PythonSlicer` is a launcher that runs the real interpreter as its child and does not
pass signals on, so the process runs in a group of its own and a cancel or kill goes to the
whole group; "finished" means that every process holding its output has ended.
"""

import json
import logging
import os
import queue
import signal
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

from CycleINRLib.errors import UpsampleCancelled, UpsampleFailed

EXIT_BAD_INPUT = 2
EXIT_CANCELLED = 130
CANCEL_GRACE_SECONDS = 10.0  # after SIGTERM, before the process is killed outright
STDERR_TAIL_LINES = 40
HARD_KILL = getattr(signal, "SIGKILL", signal.SIGTERM)  # Windows has no SIGKILL; its group kill is hard anyway
DEVICE_PROBE_TIMEOUT_SECONDS = 120.0  # a first import of torch with CUDA can take a minute on a cold disk
# Run in Slicer's Python as a process of its own: importing torch and CUDA into Slicer itself
# would stall the GUI for seconds and keep GPU memory that the runs need.
DEVICE_PROBE = """import json, torch
cuda = torch.cuda.is_available()
mps = getattr(torch.backends, "mps", None)
print(json.dumps({"torch": torch.__version__, "cudaBuild": torch.version.cuda,
                  "cudaDevice": torch.cuda.get_device_name(0) if cuda else None,
                  "mps": bool(mps is not None and mps.is_available())}))
"""
OUT_OF_MEMORY_HINT = ("the system ends processes this way when memory runs out; try a smaller memory budget "
                      "or the CPU")

# Windows: no console window for PythonSlicer, as slicer.util.launchConsoleProcess does
NO_WINDOW = {} if os.name == "posix" else {"creationflags": subprocess.CREATE_NO_WINDOW}

ProgressCallback = Callable[[float, str], None]


@dataclass
class UpsampleOptions:
    """What the user chose; `arguments()` turns it into `cycleinr upsample` options."""

    factor: Optional[float] = None
    spacing: Optional[float] = None
    axis: Optional[int] = None  # ITK/IJK index axis; None = the coarsest
    device: str = "auto"  # auto, cpu, cuda or mps
    weights: Optional[str] = None  # None = the bundled weights
    maxMemoryGB: Optional[float] = None
    keepAcquiredSlices: Optional[bool] = None  # None = the engine's default
    matchNoise: bool = False  # synthetic noise in generated slices up to the acquired slices' level
    flipEnsemble: bool = False  # average with a pass over the slice-reversed volume (twice the time)
    bf16: bool = False  # bfloat16 arithmetic: 1.7 to 1.9 times faster on a CPU with AMX, PSNR within 0.01 dB
    noiseReport: bool = False  # the process measures every slice's noise (the panel's chart), not Slicer's GUI thread

    def arguments(self) -> list:
        if (self.factor is None) == (self.spacing is None):
            raise ValueError("give either an upsampling factor or a target slice spacing")
        arguments = ["--factor", repr(float(self.factor))] if self.factor is not None \
            else ["--spacing", repr(float(self.spacing))]
        arguments += ["--axis", "auto" if self.axis is None else str(self.axis), "--device", self.device]
        if self.weights:
            arguments += ["--weights", str(self.weights)]
        if self.maxMemoryGB:
            arguments += ["--max-memory", repr(float(self.maxMemoryGB))]
        if self.keepAcquiredSlices is not None:
            arguments.append("--keep-acquired-slices" if self.keepAcquiredSlices else "--no-keep-acquired-slices")
        if self.matchNoise:
            arguments.append("--match-noise")
        if self.flipEnsemble:
            arguments.append("--flip-ensemble")
        if self.bf16:
            arguments.append("--bf16")
        if self.noiseReport:
            arguments.append("--noise-report")
        return arguments


def probeDevices(python, timeout: float = DEVICE_PROBE_TIMEOUT_SECONDS) -> dict:
    """What PyTorch finds, asked of `python` in a separate process: {"torch", "cudaBuild",
    "cudaDevice", "mps"}, or {"error": the reason} when it cannot tell."""
    try:
        done = subprocess.run([str(python), "-c", DEVICE_PROBE], stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, encoding="utf-8", errors="replace", timeout=timeout, **NO_WINDOW)
    except subprocess.TimeoutExpired:
        return {"error": f"PyTorch did not answer within {timeout:g} s"}
    except OSError as error:
        return {"error": f"{python} cannot be run: {error.strerror or error}"}
    lines = done.stdout.strip().splitlines()
    try:
        facts = json.loads(lines[-1]) if done.returncode == 0 and lines else None
    except ValueError:
        facts = None
    if not isinstance(facts, dict):
        lastLine = next((line.strip() for line in reversed(done.stderr.splitlines()) if line.strip()), "")
        return {"error": lastLine or f"the check exited with code {done.returncode}"}
    return facts


class DeviceProbe:
    """`probeDevices` on a thread of its own, so that the panel can poll it from a timer."""

    def __init__(self, python):
        self._facts = None
        self._thread = threading.Thread(target=self._run, args=(python,), daemon=True)
        self._thread.start()

    def _run(self, python) -> None:
        try:
            self._facts = probeDevices(python)
        except Exception as error:  # noqa: BLE001 - the panel would otherwise say "Detecting devices..." for ever
            self._facts = {"error": f"the device check failed: {error}"}

    def result(self) -> Optional[dict]:
        """The facts once the check has finished, None while it runs."""
        return None if self._thread.is_alive() else self._facts


def upsampleCommand(python, inputPath, outputPath, options: UpsampleOptions) -> list:
    return [str(python), "-m", "CycleINRLib.cli", "upsample", str(inputPath), str(outputPath),
            *options.arguments(), "--json-progress"]


def parseLine(line: str) -> Optional[dict]:
    """One JSON event, or None for anything else (logged, never fatal)."""
    line = line.strip()
    if not line:
        return None
    try:
        event = json.loads(line)
    except ValueError:
        event = None
    if not isinstance(event, dict) or "event" not in event:
        logging.info("cycleinr: %s", line)
        return None
    return event


class UpsampleProcess:
    """One `cycleinr upsample` process: start, poll events, cancel, and read the outcome."""

    def __init__(self, command: list, libraryParent=None):
        self.command = list(command)
        self.libraryParent = libraryParent
        self.fraction = 0.0
        self.message = ""
        self.warnings = []
        self.errorMessage = None
        self.result = None  # the "done" event
        self._process = None
        self._lines = queue.Queue()
        self._stderr = deque(maxlen=STDERR_TAIL_LINES)
        self._readers = []
        self._cancelRequested = False
        self._killDeadline = None

    def start(self) -> None:
        logging.info("Running: %s", subprocess.list2cmdline(self.command))
        ownGroup = {"start_new_session": True} if os.name == "posix" \
            else {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
        self._process = subprocess.Popen(
            self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, encoding="utf-8", errors="replace", env=self._environment(), **ownGroup)
        self._readers = [
            threading.Thread(target=self._read, args=(self._process.stdout, self._lines.put), daemon=True),
            threading.Thread(target=self._read, args=(self._process.stderr, self._stderr.append), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _environment(self) -> dict:
        environment = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.libraryParent is not None:
            paths = [str(self.libraryParent), environment.get("PYTHONPATH", "")]
            environment["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        return environment

    @staticmethod
    def _read(stream, store) -> None:
        for line in stream:
            store(line.rstrip("\n"))
        stream.close()

    @property
    def running(self) -> bool:
        return self._process is not None and not self.finished

    @property
    def finished(self) -> bool:
        """The process and its children have exited and every line they printed has been polled."""
        return self._process is not None and not self._alive() and self._lines.empty()

    def _alive(self) -> bool:
        """The process runs, or a child of it still holds its output (a launcher's interpreter)."""
        return self._process.poll() is None or any(reader.is_alive() for reader in self._readers)

    def _signalGroup(self, signum) -> None:
        if os.name != "posix":  # no SIGTERM for a process tree there: end it outright
            try:
                subprocess.run(["taskkill", "/T", "/F", "/PID", str(self._process.pid)], capture_output=True,
                               creationflags=subprocess.CREATE_NO_WINDOW, check=True)
            except (OSError, subprocess.CalledProcessError):  # no taskkill, or the tree is gone already
                self._process.kill()  # the launcher at least (a no-op once it has exited)
            return
        try:
            os.killpg(self._process.pid, signum)
        except ProcessLookupError:
            pass  # the whole group has ended

    def poll(self) -> list:
        """The events printed since the last poll; also enforces the cancel deadline."""
        events = []
        while True:
            try:
                event = parseLine(self._lines.get_nowait())
            except queue.Empty:
                break
            if event is not None:
                self._record(event)
                events.append(event)
        if self._killDeadline is not None and time.monotonic() > self._killDeadline and self._alive():
            logging.warning("cycleinr did not stop within %g s of the cancel request; killing it", CANCEL_GRACE_SECONDS)
            self._killDeadline = None
            self._signalGroup(HARD_KILL)
        return events

    def _record(self, event: dict) -> None:
        kind = event["event"]
        if kind in ("progress", "done"):
            self.fraction = float(event.get("fraction", self.fraction))
            self.message = str(event.get("message", event.get("stage", self.message)))
        if kind == "warning":
            self.warnings.append(str(event.get("message", "")))
            logging.warning("cycleinr: %s", event.get("message", ""))
        elif kind == "error":
            self.errorMessage = str(event.get("message", "unknown error"))
            logging.error("cycleinr: %s", self.errorMessage)
        elif kind == "done":
            self.result = event

    def cancel(self) -> None:
        """Ask the process to stop (SIGTERM: it removes its partial output); killed if it lingers."""
        if self._process is None or not self._alive() or self._cancelRequested:
            return
        self._cancelRequested = True
        self._killDeadline = time.monotonic() + CANCEL_GRACE_SECONDS
        self._signalGroup(signal.SIGTERM)

    def wait(self, progressCallback: Optional[ProgressCallback] = None, interval: float = 0.1,
             idle: Optional[Callable[[], None]] = None) -> dict:
        """Block until the process ends; returns the "done" event or raises. `idle` is called
        between polls (Slicer's processEvents, so that the console shows the progress lines)."""
        try:
            while not self.finished:
                for event in self.poll():
                    if progressCallback is not None and event["event"] in ("progress", "done"):
                        # this event's own state: a poll may have read several
                        progressCallback(float(event.get("fraction", 1.0)), str(event.get("message", "done")))
                if idle is not None:
                    idle()
                time.sleep(interval)
        except BaseException:
            self.stop()
            raise
        return self.outcome()

    def stop(self) -> None:
        """Cancel and wait for the process to be gone (killed if it ignores the request)."""
        self.cancel()
        deadline = time.monotonic() + CANCEL_GRACE_SECONDS
        while self._alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._alive():
            self._signalGroup(HARD_KILL)
        self._process.wait()

    def outcome(self) -> dict:
        """The "done" event of a finished process, or the reason there is none."""
        self.poll()
        code = self._process.returncode
        if self._cancelRequested or code == EXIT_CANCELLED:
            raise UpsampleCancelled("upsampling was cancelled; nothing was written")
        if code == 0 and self.result is not None:
            return self.result
        raise UpsampleFailed(self._failureMessage(code), self.stderrTail)

    @property
    def stderrTail(self) -> str:
        return "\n".join(self._stderr)

    def _failureMessage(self, code: int) -> str:
        if self.errorMessage:
            return self.errorMessage
        if code is not None and code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            hint = f" ({OUT_OF_MEMORY_HINT})" if -code == getattr(signal, "SIGKILL", None) else ""
            return f"the upsampling process was killed by signal {name}{hint}"
        lastLine = next((line for line in reversed(self._stderr) if line.strip()), "")
        # through Slicer's launcher a killed interpreter shows as a silent exit code 1
        reason = f": {lastLine.strip()}" if lastLine else f" and printed nothing (if it was killed, {OUT_OF_MEMORY_HINT})"
        return f"the upsampling process stopped with exit code {code}{reason}"
