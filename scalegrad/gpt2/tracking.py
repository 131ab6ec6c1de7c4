"""Experiment tracking for ``--mode train``: TensorBoard and Weights & Biases.

``--tensorboard-logdir DIR`` (fairseq's name for it) and ``--wandb-project NAME``
each add a writer to :attr:`scalegrad.gpt2.trainer.Trainer.scalar_sinks`: every
training report (tags ``train/<metric>``) and every validation's metrics (tags
``valid/<metric>``) become scalars against the update number (the step count the
result files and the log use). Only rank 0 writes. Both are off by default.

TensorBoard writes through ``torch.utils.tensorboard`` when the ``tensorboard``
package is installed, else through ``tensorboardX``; W&B through ``wandb``
(``WANDB_MODE=offline`` needs no network or login; the run folder goes where W&B
puts it, ``./wandb`` or ``$WANDB_DIR``). ``pip install "scalegrad[tracking]"``
installs both.

:func:`check_tracking` runs with the other flag checks, before anything is
loaded or written: a missing package or a log folder that cannot be written ends
in one ``error:`` line.
"""

from __future__ import annotations

import importlib.util
import logging
import numbers
import os

from ..errors import UserError, first_line
from ..io import check_folder_path

logger = logging.getLogger(__name__)

TRACKING_EXTRA = 'pip install "scalegrad[tracking]"'


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def tensorboard_backend() -> str | None:
    """``"tensorboard"`` (torch.utils.tensorboard), ``"tensorboardX"``, or None."""
    if _installed("tensorboard"):
        return "tensorboard"
    if _installed("tensorboardX"):
        return "tensorboardX"
    return None


def check_logdir(path: str, flag: str) -> None:
    """``path`` can be created (or is a folder) and written; nothing is created here."""
    check_folder_path(path, flag)


def check_tracking(args) -> None:
    """Check ``--tensorboard-logdir`` and ``--wandb-project`` (packages, paths, mode)."""
    logdir = getattr(args, "tensorboard_logdir", None)
    project = getattr(args, "wandb_project", None)
    for flag, value in (("--tensorboard-logdir", logdir), ("--wandb-project", project)):
        if value is not None and args.mode != "train":
            raise UserError(f"{flag} only applies to --mode train (it records the training "
                            f"reports and validations); drop it for --mode {args.mode}")
    if logdir is not None:
        if not logdir.strip():
            raise UserError("--tensorboard-logdir is empty; give a folder for the event files")
        if tensorboard_backend() is None:
            raise UserError(f"--tensorboard-logdir needs tensorboard or tensorboardX, neither is "
                            f"installed here: {TRACKING_EXTRA} (or pip install tensorboardX), "
                            f"or drop --tensorboard-logdir")
        check_logdir(logdir, "--tensorboard-logdir")
    if project is not None:
        if not project.strip():
            raise UserError("--wandb-project is empty; give the W&B project name")
        if not _installed("wandb"):
            raise UserError(f"--wandb-project needs Weights & Biases (wandb), which is not "
                            f"installed here: {TRACKING_EXTRA} (or pip install wandb), or drop "
                            f"--wandb-project")


def flat_scalars(prefix: str, scalars: dict) -> dict[str, float]:
    """``{"<prefix>/<name>": float}`` for every number in ``scalars`` (nested dicts
    give ``<prefix>/<name>/<key>``); anything else (text, lists, booleans) is left out."""
    out: dict[str, float] = {}
    for name, value in scalars.items():
        tag = f"{prefix}/{name}"
        if isinstance(value, dict):
            out.update(flat_scalars(tag, value))
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            out[tag] = float(value)
        elif hasattr(value, "numel") and not isinstance(value, bool) and value.numel() == 1:
            out[tag] = float(value.item())  # a one-element tensor
    return out


class TensorBoardSink:
    """A :data:`~scalegrad.gpt2.trainer.ScalarSink` writing TensorBoard event files."""

    def __init__(self, logdir: str, backend: str | None = None):
        backend = backend or tensorboard_backend()
        if backend == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
        elif backend == "tensorboardX":
            from tensorboardX import SummaryWriter
        else:
            raise UserError(f"--tensorboard-logdir needs tensorboard or tensorboardX: "
                            f"{TRACKING_EXTRA}")
        self.backend = backend
        self.logdir = logdir
        self.writer = SummaryWriter(log_dir=logdir)
        logger.info("TensorBoard event files (%s) go to %s", backend, logdir)

    def __call__(self, step: int, prefix: str, scalars: dict) -> None:
        for tag, value in flat_scalars(prefix, scalars).items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A :data:`~scalegrad.gpt2.trainer.ScalarSink` logging to a Weights & Biases run."""

    def __init__(self, project: str, name: str | None = None, config: dict | None = None):
        import wandb

        try:
            self.run = wandb.init(project=project, name=name, config=config or {})
        except Exception as exc:  # no login, no network in online mode, ...
            raise UserError(f"--wandb-project {project}: W&B could not start a run "
                            f"({first_line(exc)}); log in with `wandb login`, or set "
                            f"WANDB_MODE=offline to record the run locally and `wandb sync` "
                            f"it later") from None
        logger.info("W&B run %s in project %s (%s)", self.run.id, project, self.run.dir)

    def __call__(self, step: int, prefix: str, scalars: dict) -> None:
        self.run.log(flat_scalars(prefix, scalars), step=step)

    def close(self) -> None:
        self.run.finish()


def open_sinks(args, config: dict | None = None) -> list:
    """The writers the flags ask for (call on rank 0 only, after the checks); each has
    ``close()``. W&B starts first: when it cannot, no event file has been written."""
    sinks: list = []
    if getattr(args, "wandb_project", None):
        name = os.path.basename(os.path.normpath(args.output_dir)) if args.output_dir else None
        sinks.append(WandbSink(args.wandb_project, name=name, config=config))
    if getattr(args, "tensorboard_logdir", None):
        try:
            sinks.append(TensorBoardSink(args.tensorboard_logdir))
        except BaseException:
            close_sinks(sinks)
            raise
    return sinks


def close_sinks(sinks: list) -> None:
    for sink in sinks:
        try:
            sink.close()
        except Exception as exc:  # a writer that fails to close must not hide the run's result
            logger.warning("closing %s failed: %s", type(sink).__name__, exc)
