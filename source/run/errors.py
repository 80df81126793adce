"""Errors the user can fix, and the one wrapper every entry point runs through.

An error the user can fix (a missing dataset, a bad combination of flags, settings changed on
resume, a corrupt or foreign checkpoint, a busy run directory, a full disk, a run that diverged)
derives from :class:`UserError`. Every script and ``python -m source...`` tool ends in::

    if __name__ == "__main__":
        run_entry_point(main, get_args_parser())

which parses the command line, runs ``main(args)`` and, on a :class:`UserError`, prints one line
``error: <message>`` to stderr and exits with status :data:`EXIT_USER_ERROR` (2, the status
argparse uses for a bad command line: in both cases the user has something to change). Under
torchrun only rank 0 prints; the other ranks exit with the same status silently. Any other
exception is a bug and keeps its full traceback (exit status 1, Python's own). Under torchrun
every rank also leaves its message in the error file torchrun names (``TORCHELASTIC_ERROR_FILE``),
so torchrun's failure summary shows it, also for an error that only a rank other than 0 met.

``--debug`` (a flag on every parser) or ``BISSL_DEBUG=1`` in the environment re-raises user errors
too, so their traceback shows where they came from.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import typing
from collections.abc import Callable

# Exit status of a user error; argparse exits with the same status for a bad command line.
EXIT_USER_ERROR = 2
# Environment variable that shows tracebacks for user errors, like --debug.
DEBUG_ENV = "BISSL_DEBUG"


class UserError(Exception):
    """An error the user can fix; entry points print its message without a traceback."""


class ConfigError(UserError, ValueError):
    """A bad flag value, combination of flags or settings file the user supplied (a split file);
    still a ``ValueError`` for code that catches one."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder the run reads (weights, a run directory, images) is not where the flags say."""


def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--debug``: show the traceback of user errors instead of the one-line message."""
    parser.add_argument(
        "--debug", action="store_true",
        help=f"show the traceback of errors the user can fix, not just 'error: <message>' "
             f"(same as {DEBUG_ENV}=1)",
    )


def debug_requested(args: argparse.Namespace | None = None) -> bool:
    """Whether ``--debug`` was given or ``BISSL_DEBUG`` is set to a true value."""
    if args is not None and getattr(args, "debug", False):
        return True
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _is_rank_zero() -> bool:
    """Rank 0 of a torchrun/Slurm launch, or a plain process (read from the environment, which
    holds even when the error came before the process group was set up)."""
    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").strip():
            return int(os.environ[name]) == 0
    return True


def _release_process_group() -> None:
    """Destroy the process group if ``main`` left one behind by raising (best effort)."""
    torch_distributed = sys.modules.get("torch.distributed")  # never import torch just for this
    if torch_distributed is None or not torch_distributed.is_available():
        return
    if torch_distributed.is_initialized():
        try:
            torch_distributed.destroy_process_group()
        except Exception:  # the error being reported matters more than a failed clean-up
            pass


def _record_for_torchrun(message: str) -> None:
    """Leave ``message`` in this worker's torchrun error file, in the format of torch's
    ``ErrorHandler.record_exception`` with the message where it puts the traceback (its failure
    summary shows that field); nothing outside torchrun."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    record = {"message": message, "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))}}
    try:
        with open(path, "w") as handle:
            json.dump({"message": record}, handle)
    except OSError:  # the summary then says "<N/A>", as before
        pass


def report_user_error(message: str) -> typing.NoReturn:
    """Print ``error: <message>`` to stderr (rank 0 only) and exit with :data:`EXIT_USER_ERROR`."""
    _release_process_group()
    _record_for_torchrun(message)
    if _is_rank_zero():
        print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


class CommandLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that reports a bad command line like every other user error: one
    ``error: ...`` line (rank 0 only under torchrun, where every rank parses the same flags) and
    exit status 2, instead of the usage block on every rank."""

    def error(self, message: str) -> typing.NoReturn:
        report_user_error(f"{message} (see {self.prog} --help)")


def run_entry_point(
    main: Callable[[argparse.Namespace], object],
    parser: argparse.ArgumentParser,
    argv: list[str] | None = None,
) -> None:
    """Parse ``argv`` (default: the command line) with ``parser``, run ``main(args)``, and turn a
    :class:`UserError` into ``error: <message>`` on stderr (rank 0 only) and exit status 2. A
    non-zero ``int`` that ``main`` returns becomes the exit status.

    Other exceptions propagate with their traceback; with ``--debug`` or ``BISSL_DEBUG=1`` user
    errors do too.
    """
    args = parser.parse_args(argv)
    try:
        status = main(args)
    except UserError as error:
        if debug_requested(args):
            raise
        report_user_error(str(error))
    # A tool's main may return its exit status (e.g. 1: some weights files failed verification).
    if isinstance(status, int) and not isinstance(status, bool) and status != 0:
        sys.exit(status)
