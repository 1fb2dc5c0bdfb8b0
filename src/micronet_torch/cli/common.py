"""What every subcommand shares: the user-error type that becomes one line and exit status 2."""

from ..deploy.fused.build import FusedOpsUnavailable


class CLIError(Exception):
    """A user error: printed as one clear message, exit status 2, no traceback."""


# errors the library raises for bad input: each is printed as one line (exit 2), never as a traceback; a fused
# operator library that cannot be built or loaded (no compiler, another runtime version) is one too
USER_ERRORS = (CLIError, ValueError, FileNotFoundError, PermissionError, NotADirectoryError, FusedOpsUnavailable)
