"""Errors a user can cause, reported as one clear line by the command lines."""

import functools
import sys
from typing import Callable


def first_line(exc: BaseException) -> str:
    """An exception's first message line (its type's name when it has none): the detail a
    one-line :class:`UserError` message quotes from a library's exception."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class UserError(Exception):
    """A mistake in what the user handed us (a path, a flag value, a file's contents).

    Command lines catch it, print ``error: <message>`` on one line and exit with
    status 2; the message names the thing that is wrong and, where there is one,
    the fix.
    """


def reports_user_errors(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a command line's ``main(argv=None) -> int``: a :class:`UserError` becomes one
    ``error: <message>`` line on standard error and exit status 2, an interrupt
    ``error: interrupted`` and status 130, so no command shows a traceback for them."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return 130

    return wrapper
