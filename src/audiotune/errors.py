"""The project's exception root and its areas.

Every error a user can cause or meet (bad input, bad configuration, an unsafe or overlapping path, a
failing store) is an :class:`AudiotuneError`. Its message is one line that names the file, key, row or
field at fault, and its ``exit_code`` is what the command line returns: :data:`EXIT_FAILED` for work
that failed, :data:`EXIT_USAGE` for usage or configuration to fix before running again. The command
line prints such an error as that one line; a traceback only with ``-v``.

Modules raise the most specific class here (or their own subclass of one) at the point where the
meaning is known (which shard, which row), wrapping third-party errors with ``raise ... from err``.
This module imports nothing from the project, so any module may import it.
"""

from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class AudiotuneError(Exception):
    """Root of the project's errors: one line for the user, and the command's exit code."""

    exit_code: int = EXIT_FAILED


class UsageError(AudiotuneError):
    """Usage or configuration to fix before running again (exit 2)."""

    exit_code = EXIT_USAGE


class StorageError(AudiotuneError):
    """A local path or an S3 location could not be read or written as asked."""


class UnsafePathError(StorageError):
    """A key or member name that would be written outside its destination directory."""


class OutputError(UsageError):
    """An output location that must not be written: it overlaps an input, or holds something else (exit 2)."""


class OutputExistsError(AudiotuneError, FileExistsError):
    """The output already holds an artifact and overwrite is off (exit 1, as before this module)."""


class DataError(AudiotuneError):
    """Input data (a corpus, a Dataset or Tokens artifact) that cannot be used as it is."""


class ModelLoadError(AudiotuneError):
    """A model, checkpoint or tokenizer that cannot be loaded."""


class TrainingError(AudiotuneError):
    """A training run that cannot start or go on."""


class ClusterError(AudiotuneError):
    """Kubernetes, Kubeflow or a PyTorchJob failed to do what was asked."""


class Interrupted(AudiotuneError):
    """SIGTERM or SIGINT stopped the work before it was published; the exit code is 128 + the signal number."""

    def __init__(self, signum: int, what: str = "the work"):
        import signal

        super().__init__(f"{what} was stopped by {signal.Signals(signum).name}; nothing was published")
        self.signum = signum
        self.exit_code = 128 + signum
