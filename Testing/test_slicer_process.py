"""The Slicer module's subprocess driver against the real `cycleinr upsample` command line."""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import SimpleITK as sitk

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY / "CycleINR"))

from CycleINRLib import geometry  # noqa: E402
from CycleINRLib.errors import UpsampleCancelled, UpsampleFailed  # noqa: E402
from CycleINRSlicerLib import findLibraryParent, process as process_module  # noqa: E402
from CycleINRSlicerLib.process import (  # noqa: E402
    EXIT_BAD_INPUT,
    UpsampleOptions,
    UpsampleProcess,
    parseLine,
    probeDevices,
    upsampleCommand,
)

MR_OBLIQUE = "demo/pgbm-001_brain_mr_t1post_6.5mm.nii.gz"


def crop(shared_data, path, size, start=(100, 120, 6)):
    """A crop of the oblique brain MR (6.5 mm slices) written as NRRD, as the module writes it."""
    image = sitk.ReadImage(str(shared_data / MR_OBLIQUE))
    region = image[start[0]:start[0] + size[0], start[1]:start[1] + size[1], start[2]:start[2] + size[2]]
    sitk.WriteImage(region, str(path))
    return path


def cli(inputPath, outputPath, options):
    return UpsampleProcess(upsampleCommand(sys.executable, inputPath, outputPath, options), REPOSITORY)


def wait_for_progress(process, seconds=300):
    """Poll until the engine reports progress (the model is loaded and running); fails rather
    than hangs."""
    deadline = time.monotonic() + seconds
    while not process.finished:
        if any(event["event"] == "progress" for event in process.poll()):
            return
        assert time.monotonic() < deadline, f"no progress after {seconds} s: {process.stderrTail}"
        time.sleep(0.05)  # as the panel's timer: a busy loop would take a core from the process
    pytest.fail("the process ended before reporting progress")


def test_success_reports_progress_and_the_output_grid(shared_data, tmp_path):
    inputPath = crop(shared_data, tmp_path / "input.nrrd", (24, 20, 6))
    outputPath = tmp_path / "output.nrrd"
    weights = REPOSITORY / "CycleINRLib" / "weights" / "cycleinr_ct.safetensors"
    options = UpsampleOptions(factor=2.5, axis=2, device="cpu", weights=str(weights), maxMemoryGB=1.0,
                              keepAcquiredSlices=False, matchNoise=True, flipEnsemble=True, bf16=True)
    assert options.arguments() == ["--factor", "2.5", "--axis", "2", "--device", "cpu", "--weights", str(weights),
                                   "--max-memory", "1.0", "--no-keep-acquired-slices", "--match-noise",
                                   "--flip-ensemble", "--bf16"]
    reports = []
    process = cli(inputPath, outputPath, options)
    process.start()
    result = process.wait(lambda fraction, message: reports.append((fraction, message)))

    fractions = [fraction for fraction, _ in reports]
    assert fractions and all(0.0 <= f <= 1.0 for f in fractions) and fractions[-1] == 1.0
    assert all(message for _, message in reports)
    assert result["output"] == str(outputPath.resolve()) and outputPath.is_file() and result["match_noise"] is True
    assert result["flip_ensemble"] is True and result["bf16"] is True and result["keep_acquired_slices"] is False
    expected_size, expected_spacing = geometry.output_size_and_spacing((24, 20, 6), (0.6875, 0.6875, 6.5), 2, 2.5)
    assert tuple(result["size"]) == expected_size == sitk.ReadImage(str(outputPath)).GetSize()
    assert result["spacing"] == pytest.approx(expected_spacing)


def test_bad_input_becomes_one_clear_message_and_no_output(shared_data, tmp_path):
    inputPath = crop(shared_data, tmp_path / "input.nrrd", (16, 16, 4))
    outputPath = tmp_path / "output.nrrd"
    process = cli(inputPath, outputPath, UpsampleOptions(spacing=10.0, device="cpu"))
    process.start()
    with pytest.raises(UpsampleFailed, match="not smaller than the input's slice spacing"):
        process.wait()
    assert process._process.returncode == EXIT_BAD_INPUT
    assert sorted(tmp_path.iterdir()) == [inputPath]


def test_missing_input_file_is_reported(tmp_path):
    process = cli(tmp_path / "absent.nrrd", tmp_path / "output.nrrd", UpsampleOptions(factor=2.0, device="cpu"))
    process.start()
    with pytest.raises(UpsampleFailed, match="absent.nrrd: no such file"):
        process.wait()
    assert list(tmp_path.iterdir()) == []


def test_cancel_stops_the_process_and_leaves_no_file(shared_data, tmp_path):
    inputPath = crop(shared_data, tmp_path / "input.nrrd", (140, 160, 16), start=(60, 80, 4))
    process = cli(inputPath, tmp_path / "output.nrrd", UpsampleOptions(factor=3.0, device="cpu"))
    process.start()
    wait_for_progress(process)
    process.cancel()
    with pytest.raises(UpsampleCancelled):
        process.wait()
    assert process._process.poll() is not None
    assert sorted(tmp_path.iterdir()) == [inputPath]  # the CLI removed its partial output


LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"  # PythonSlicer's way: no signal passed on


@pytest.mark.skipif(os.name != "posix", reason="process groups and SIGTERM are POSIX")
def test_cancel_through_a_launcher_stops_its_child_too(shared_data, tmp_path):
    """Slicer's PythonSlicer runs the real interpreter as a child and dies of SIGTERM alone; the
    cancel must reach the child, or it runs on, unseen, and writes the output anyway."""
    inputPath = crop(shared_data, tmp_path / "input.nrrd", (140, 160, 16), start=(60, 80, 4))
    outputPath = tmp_path / "output.nrrd"
    command = [sys.executable, "-c", LAUNCHER,
               *upsampleCommand(sys.executable, inputPath, outputPath, UpsampleOptions(factor=3.0, device="cpu"))]
    process = UpsampleProcess(command, REPOSITORY)
    process.start()
    wait_for_progress(process)
    process.cancel()
    with pytest.raises(UpsampleCancelled):
        process.wait()
    assert sorted(tmp_path.iterdir()) == [inputPath]  # the child removed its partial output, wrote nothing


SLICER_THAT_CRASHES = """
import os, sys, time
sys.path[:0] = [sys.argv[3], sys.argv[4]]
from CycleINRSlicerLib.process import UpsampleOptions, UpsampleProcess, upsampleCommand
process = UpsampleProcess(upsampleCommand(sys.executable, sys.argv[1], sys.argv[2], UpsampleOptions(factor=3.0, device="cpu")),
                          sys.argv[4])
process.start()
while not any(event["event"] == "progress" for event in process.poll()):
    time.sleep(0.05)
print(process._process.pid, flush=True)
os._exit(139)  # a crash: no cancel, no clean-up
"""


@pytest.mark.skipif(os.name != "posix", reason="looks the orphaned process up by pid")
def test_a_run_stops_and_writes_nothing_when_slicer_crashes(shared_data, tmp_path):
    """The run has its own process group, so Slicer's death does not kill it: the closed pipe
    of its progress lines must stop it."""
    inputPath = crop(shared_data, tmp_path / "input.nrrd", (140, 160, 16), start=(60, 80, 4))
    slicer = subprocess.run([sys.executable, "-c", SLICER_THAT_CRASHES, str(inputPath), str(tmp_path / "output.nrrd"),
                             str(REPOSITORY / "CycleINR"), str(REPOSITORY)], capture_output=True, timeout=300, encoding="utf-8")
    orphan = int(slicer.stdout)
    deadline = time.monotonic() + 120
    while _exists(orphan) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _exists(orphan), "the run went on after Slicer crashed"
    assert sorted(tmp_path.iterdir()) == [inputPath]


def _exists(pid: int) -> bool:
    """Still running: a zombie (ended, its exit status waiting for a parent that may never
    collect it where the container's first process does not) is not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):  # no /proc (macOS): as os.kill says
        return True
    return state != "Z"


IGNORES_THE_CANCEL = """
import json, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a run stuck where it cannot act on the request
child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
print(child.pid, file=sys.stderr, flush=True)
print(json.dumps({"event": "progress", "fraction": 0.1, "stage": "upsample"}), flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(os.name != "posix", reason="signals a process group")
@pytest.mark.parametrize("how", ["the panel's polls", "the console's stop"])
def test_a_run_that_ignores_the_cancel_is_killed_with_its_children(monkeypatch, how):
    """A cancel that is not obeyed within the grace time ends the whole process group: the
    launcher and the interpreter it started, so nothing goes on computing after Cancel."""
    monkeypatch.setattr(process_module, "CANCEL_GRACE_SECONDS", 1.0)
    process = UpsampleProcess([sys.executable, "-c", IGNORES_THE_CANCEL])
    process.start()
    wait_for_progress(process)
    deadline = time.monotonic() + 60
    while not process.stderrTail:  # its own reader thread, which may come after stdout's
        assert time.monotonic() < deadline, "the child's pid did not come"
        time.sleep(0.05)
    child = int(process.stderrTail.splitlines()[0])
    process.cancel()
    if how == "the panel's polls":
        deadline = time.monotonic() + 60
        while not process.finished:
            assert time.monotonic() < deadline, "the run was not killed"
            process.poll()
            time.sleep(0.05)
    else:
        process.stop()
    assert process._process.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while _exists(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _exists(child), "the launcher's child went on"
    with pytest.raises(UpsampleCancelled):
        process.outcome()


def test_a_silent_exit_through_a_launcher_suggests_memory():
    """An out-of-memory kill of the launcher's child reaches us as a plain exit code 1."""
    process = UpsampleProcess([sys.executable, "-c", "import sys; sys.exit(1)"])
    process.start()
    with pytest.raises(UpsampleFailed, match="exit code 1 and printed nothing .*memory runs out"):
        process.wait()


def test_a_killed_process_is_reported_with_its_signal(shared_data, tmp_path):
    """What an out-of-memory kill looks like: no error event, just SIGKILL."""
    inputPath = crop(shared_data, tmp_path / "input.nrrd", (140, 160, 16), start=(60, 80, 4))
    process = cli(inputPath, tmp_path / "output.nrrd", UpsampleOptions(factor=3.0, device="cpu"))
    process.start()
    wait_for_progress(process)
    os.kill(process._process.pid, signal.SIGKILL)
    with pytest.raises(UpsampleFailed, match="killed by signal SIGKILL .*memory"):
        process.wait()


def test_a_crash_without_error_event_reports_exit_code_and_stderr():
    crash = "import sys; print('{\"event\": \"progress\", \"fraction\": 0.5}'); sys.stderr.write('boom\\n'); sys.exit(3)"
    process = UpsampleProcess([sys.executable, "-c", crash])
    process.start()
    with pytest.raises(UpsampleFailed, match="exit code 3: boom") as failure:
        process.wait()
    assert process.fraction == 0.5
    assert "boom" in failure.value.details


def test_lines_that_are_not_events_are_logged_not_fatal(caplog):
    with caplog.at_level(logging.INFO):
        assert parseLine("loading weights...") is None
        assert parseLine('["a", "list"]') is None
        assert parseLine("   ") is None
    assert parseLine('{"event": "warning", "message": "w"}') == {"event": "warning", "message": "w"}
    assert "loading weights..." in caplog.text


def test_options_need_exactly_one_of_factor_and_spacing():
    with pytest.raises(ValueError):
        UpsampleOptions().arguments()
    with pytest.raises(ValueError):
        UpsampleOptions(factor=2.0, spacing=1.0).arguments()
    assert UpsampleOptions(spacing=1.5).arguments() == ["--spacing", "1.5", "--axis", "auto", "--device", "auto"]


def test_the_library_is_found_in_a_checkout_and_next_to_an_installed_module(tmp_path):
    assert findLibraryParent(REPOSITORY / "CycleINR") == REPOSITORY
    (tmp_path / "CycleINRLib").mkdir()
    (tmp_path / "CycleINRLib" / "__init__.py").write_text("", encoding="utf-8")
    assert findLibraryParent(tmp_path) == tmp_path
    elsewhere = tmp_path / "elsewhere" / "CycleINR"
    elsewhere.mkdir(parents=True)
    with pytest.raises(ImportError, match="CycleINRLib package was found neither"):
        findLibraryParent(elsewhere)


def test_the_device_check_answers_or_says_why_not(tmp_path):
    """What the panel shows about GPUs comes from a process of Slicer's Python."""
    import torch

    facts = probeDevices(sys.executable)
    assert facts["torch"] == torch.__version__ and facts["cudaBuild"] == torch.version.cuda
    assert (facts["cudaDevice"] is not None) == torch.cuda.is_available()
    withoutTorch = tmp_path / "python-without-torch"
    withoutTorch.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'torch'\" >&2\nexit 1\n", encoding="utf-8")
    withoutTorch.chmod(0o755)
    if os.name == "posix":
        assert probeDevices(withoutTorch) == {"error": "ModuleNotFoundError: No module named 'torch'"}
    assert "cannot be run" in probeDevices(tmp_path / "no-such-python")["error"]
