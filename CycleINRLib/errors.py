"""Exceptions that the command line and the Slicer module turn into one clear line."""


class InputError(ValueError):
    """Bad input from the user: reported as one line, exit code 2, nothing written."""


class WeightsError(InputError):
    """A weights file that is missing, corrupt, truncated or does not match the model."""


class UpsampleFailed(RuntimeError):
    """A run of `cycleinr upsample` (the Slicer module's process) produced no output;
    `details` holds what the process printed."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


class UpsampleCancelled(RuntimeError):
    """A cancelled run: the engine raises it within one tile of a cancel request, the Slicer
    module on Cancel, Ctrl-C or an input that left the scene. Nothing partial is returned or written."""


class ProgressReaderGone(UpsampleCancelled):
    """The program reading `--json-progress` closed its end (a GUI that quit or crashed): the
    command stops as if cancelled, since nobody is left to take its result."""
