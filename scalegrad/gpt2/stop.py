"""Stopping a training run cleanly: SIGINT or SIGTERM (a cluster scheduler's
preemption) ask the loop to stop after the current step.

The handler only sets a flag; the loop reads it after every step, and under
torchrun every rank asks all the others (``Runtime.any_rank``), so all ranks stop
after the same step and write one consistent checkpoint, whichever of them got
the signal.
"""

from __future__ import annotations

import logging
import signal

logger = logging.getLogger(__name__)

__all__ = ["StopRequest"]


class StopRequest:
    """A context manager: inside it SIGINT and SIGTERM set :attr:`signal_name`; a second
    SIGINT stops at once (``KeyboardInterrupt``). :meth:`request` sets it by hand."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal_name = signal.Signals(signum).name
        logger.warning("%s received: stopping after this step with a checkpoint", self.signal_name)

    def request(self, name: str = "request") -> None:
        self.signal_name = name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False
