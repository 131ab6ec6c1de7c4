"""Errors a user can cause, reported as one clear line by the command lines."""


class UserError(Exception):
    """A mistake in what the user handed us (a path, a flag value, a file's contents).

    Command lines catch it, print ``error: <message>`` on one line and exit with
    status 2; the message names the thing that is wrong and, where there is one,
    the fix.
    """
