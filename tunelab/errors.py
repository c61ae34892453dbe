"""Error types that the command line turns into exit codes and one-paragraph messages."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad config, bad data, missing file): exit code 2, no traceback.

    The message names the file, row or key and says what to do.
    """

    exit_code = 2


class RunStopped(Exception):
    """Training was stopped by a guard (NaN / inf loss, ...): exit code 1, a clear message, no traceback."""

    exit_code = 1
