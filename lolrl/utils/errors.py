"""User errors: one base class, so every script can report any of them as one line and exit status 2."""
from __future__ import annotations


class UserError(ValueError):
    """Bad input or settings from the user (not a bug): reported as one line ``error: ...``, exit 2."""


class ConfigError(UserError):
    """Contradictory or impossible settings, reported before anything loads."""


class RewardSpecError(UserError):
    """A reward spec could not be parsed or loaded (bad text, import failure, bad model). Here, below the
    engine, because both :mod:`lolrl.engine.rewards` and :mod:`lolrl.engine.text_rewards` raise it."""


USER_ERROR_STATUS = 2


def report_user_error(exc: BaseException) -> int:
    """Print ``error: <message>`` (its first line) on stderr and return the exit status of a user error.
    Every script's ``main`` does ``except UserError as exc: return report_user_error(exc)``; anything
    else is a bug and keeps its traceback."""
    import sys

    message = str(exc).strip().splitlines()
    print(f"error: {message[0] if message else type(exc).__name__}", file=sys.stderr)
    return USER_ERROR_STATUS
