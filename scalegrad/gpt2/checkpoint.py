"""Checkpoints of the driver: model folders and the resumable training state.

Layout of ``--output-dir`` after training::

    model.safetensors, config.json, tokenizer files   the last save (as the original's
                                                      pytorch_model.bin + config + vocab)
    best/            the model with the best validation perplexity, and the
                     singletoken__...json file of every new best
    resume/          model + tokenizer + training_state.pt: what --resume continues from
    singletoken__...__{step}.json                     one per validation

Every folder and file is written through :func:`scalegrad.io.atomic_path`, so at any
moment (a ``kill -9`` included) the newest complete copy of each can be found, and
:func:`recover_output_dir` puts it back in place at the next start
(``docs/failure-behaviour.md``). The top folder's model files are hard links to
``resume/``'s (copies where links are not possible), so they cost no extra disk.

``training_state.pt`` holds only tensors and plain Python values and is read with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from ..io import atomic_path, load_plain_torch_file, recover_folder, write_json

logger = logging.getLogger(__name__)

RESUME_DIR = "resume"
BEST_DIR = "best"
STATE_FILE = "training_state.pt"
STATE_FORMAT = 1


def save_model_folder(model, tokenizer, directory: str | os.PathLike) -> None:
    """``save_pretrained`` of the model (safetensors) and of the tokenizer."""
    model.save_pretrained(os.fspath(directory), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(os.fspath(directory))


# --------------------------------------------------------------------------- #
# Random states
# --------------------------------------------------------------------------- #

def capture_rng_state() -> dict[str, Any]:
    """python, numpy and torch (CPU and CUDA) random states, as plain values and tensors."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"],
                         numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning("the checkpoint has %d CUDA random states for %d devices here; "
                           "the CUDA random states are not restored", len(cuda_states),
                           torch.cuda.device_count())


# --------------------------------------------------------------------------- #
# Writing
# --------------------------------------------------------------------------- #

def _link_or_copy(source: Path, destination: Path) -> None:
    """Put ``source`` at ``destination`` atomically (a hard link, else a copy)."""
    with atomic_path(destination) as tmp:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copy2(source, tmp)


def save_resume_checkpoint(output_dir: str | os.PathLike, model, tokenizer,
                           state: dict[str, Any], *, publish: bool) -> Path:
    """Write ``output_dir/resume`` (model, tokenizer, ``training_state.pt``) atomically.

    With ``publish``, the model files are also put in ``output_dir`` itself (the
    original's place for the last save), each file renamed into place.
    """
    output_dir = Path(output_dir)
    resume = output_dir / RESUME_DIR
    with atomic_path(resume, is_dir=True) as tmp:
        save_model_folder(model, tokenizer, tmp)
        torch.save(state, tmp / STATE_FILE)
    if publish:
        for path in sorted(resume.iterdir()):
            if path.is_file() and path.name != STATE_FILE:
                _link_or_copy(path, output_dir / path.name)
    return resume


def save_best(output_dir: str | os.PathLike, model, tokenizer, result_name: str,
              result: dict) -> Path:
    """Replace ``output_dir/best`` with the model and its single-token result file.

    The result files of earlier bests in ``best/`` are kept, as in the original.
    """
    best = Path(output_dir) / BEST_DIR
    with atomic_path(best, is_dir=True) as tmp:
        if best.is_dir():
            for old in best.glob("singletoken__*.json"):
                shutil.copy2(old, tmp / old.name)
        save_model_folder(model, tokenizer, tmp)
        write_json(tmp / result_name, result)
    logger.info("new best model written to %s", best)
    return best


# --------------------------------------------------------------------------- #
# Reading
# --------------------------------------------------------------------------- #

def resume_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir).expanduser() / RESUME_DIR


def recover_output_dir(output_dir: str | os.PathLike) -> None:
    """Finish what a crash left in ``output_dir`` (``docs/failure-behaviour.md``): every
    checkpoint, best model or file whose write was interrupted gets its newest complete
    copy back in place, and every temporary copy is removed (one log line each). Called
    by the one process that writes, before it reads or writes anything there."""
    output_dir = Path(output_dir).expanduser()
    if output_dir.is_dir():
        recover_folder(output_dir)
        recover_folder(output_dir / BEST_DIR)


def load_training_state(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The state in ``output_dir/resume``, or ``None`` when there is no checkpoint."""
    path = resume_dir(output_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = load_plain_torch_file(path)
    except UserError as exc:
        raise UserError(f"the checkpoint {path} cannot be read: {exc}; remove "
                        f"{resume_dir(output_dir)} to start afresh") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"the checkpoint {path} is not a training state of this driver; remove "
                        f"{resume_dir(output_dir)} to start afresh")
    return state
