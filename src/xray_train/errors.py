"""User-facing errors.

Anything raised as ``XrayTrainError`` is a problem with the user's input (config, paths, data) rather
than a bug: the CLI prints its message on one line and exits with code 2, without a traceback.
"""


class XrayTrainError(Exception):
    """A problem the user can fix; the message names the file, row or key."""

    exit_code = 2


class DataError(XrayTrainError):
    """Unusable dataset input: missing file, missing column, or a bad row under ``--strict``."""


class Interrupted(XrayTrainError):
    """Ctrl-C: the message says what rerunning the same command will do (empty on non-main ranks)."""

    exit_code = 130
