"""Reading fairseq checkpoints (no fairseq needed), choosing them in a save
directory as the original evaluation script did, and exporting ``gpt2_pretrained``
checkpoints to Hugging Face folders (``scripts/export_fairseq_to_hf.py``).

Checkpoints are read with ``torch.load(..., weights_only=True)``: fairseq stores
its config as plain containers, so nothing else is needed, and a crafted pickle
is refused.
"""

import argparse
import json
import os
from glob import glob
from pathlib import Path
from typing import Optional

from ..errors import UserError
from ..hf import hf_config_from_dict
from ..io import atomic_path, load_plain_torch_file

MODEL_PREFIX = "decoder.model."
ARCH_NAME = "gpt2_pretrained"


# --------------------------------------------------------------------------- #
# Reading checkpoints (no fairseq needed)
# --------------------------------------------------------------------------- #

def read_checkpoint(path) -> dict:
    """A fairseq checkpoint's contents, read with ``weights_only=True``.

    Every way it can be wrong (missing, unreadable, not a fairseq checkpoint)
    is a :class:`UserError`. Any architecture is accepted; see
    :func:`read_gpt2_checkpoint` for the ``gpt2_pretrained`` requirements.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        state = load_plain_torch_file(path)
    except UserError as exc:
        raise UserError(f"checkpoint {path} cannot be read: {exc}") from None
    if not isinstance(state, dict) or "model" not in state or not isinstance(state.get("cfg"), dict):
        raise UserError(f"{path} is not a fairseq checkpoint (no 'model' and 'cfg' entries)")
    # fairseq records the config of an argparse-registered architecture (fconv_lm,
    # transformer, ...) as an argparse.Namespace: read it as the dict it holds.
    state["cfg"] = {key: vars(value) if isinstance(value, argparse.Namespace) else value
                    for key, value in state["cfg"].items()}
    return state


def checkpoint_arch(state: dict) -> Optional[str]:
    """The registered model name (``_name``) recorded in the checkpoint's config."""
    return (state["cfg"].get("model") or {}).get("_name")


def checkpoint_task(state: dict) -> Optional[str]:
    return (state["cfg"].get("task") or {}).get("_name")


def read_gpt2_checkpoint(path) -> dict:
    """:func:`read_checkpoint`, and a ``gpt2_pretrained`` model with its recorded
    Hugging Face config (what the export needs)."""
    state = read_checkpoint(path)
    model_cfg = state["cfg"].get("model") or {}
    if checkpoint_arch(state) != ARCH_NAME:
        raise UserError(f"checkpoint {Path(path).expanduser()} holds a "
                        f"{checkpoint_arch(state) or 'unknown'} model; expected {ARCH_NAME} "
                        f"(fairseq-train --arch {ARCH_NAME})")
    if not model_cfg.get("hf_config"):
        raise UserError(f"checkpoint {Path(path).expanduser()} records no Hugging Face config "
                        f"(model.hf_config); it was not trained with --task gpt2_language_modeling")
    return state


def checkpoint_num_updates(state: dict) -> Optional[int]:
    """The step of a checkpoint, as the original evaluation took it: the last
    ``optimizer_history`` entry's ``num_updates`` (``None`` when there is none)."""
    history = state.get("optimizer_history") or []
    return history[-1].get("num_updates") if history else None


def checkpoint_hf_config(state: dict):
    return hf_config_from_dict(json.loads(state["cfg"]["model"]["hf_config"]))


def hf_state_dict(state: dict) -> dict:
    """The Hugging Face model's weights: the checkpoint's ``decoder.model.*`` entries."""
    weights = {key[len(MODEL_PREFIX):]: value for key, value in state["model"].items()
               if key.startswith(MODEL_PREFIX)}
    if not weights:
        raise UserError(f"the checkpoint holds no weights under {MODEL_PREFIX}")
    return weights


def checkpoint_tokenizer_source(state: dict) -> Optional[str]:
    task_cfg = state["cfg"].get("task") or {}
    return task_cfg.get("hf_tokenizer") or task_cfg.get("pretrained_model") \
        or (state["cfg"].get("model") or {}).get("pretrained_model")


def export_to_hf(checkpoint, output_dir, *, tokenizer: Optional[str] = None,
                 save_tokenizer: bool = True) -> Path:
    """Write the checkpoint's model (and tokenizer) with ``save_pretrained`` into
    ``output_dir`` (replaced atomically). Returns the folder."""
    from transformers import AutoModelForCausalLM

    state = read_gpt2_checkpoint(checkpoint)
    config = checkpoint_hf_config(state)
    tokenizer_object = None
    if save_tokenizer:
        from ..tokenization import load_tokenizer

        source = tokenizer or checkpoint_tokenizer_source(state)
        if not source:
            raise UserError("the checkpoint names no tokenizer; pass --tokenizer or --no-tokenizer")
        try:
            tokenizer_object = load_tokenizer(os.path.expanduser(source))
        except UserError as exc:
            raise UserError(f"{exc}; pass --tokenizer NAME_OR_FOLDER, or --no-tokenizer") from None
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(hf_state_dict(state), strict=False)
    if missing or unexpected:
        raise UserError(f"the checkpoint's weights do not fit its recorded config "
                        f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    model.eval()
    with atomic_path(Path(output_dir).expanduser(), is_dir=True) as tmp:
        model.save_pretrained(tmp)
        if tokenizer_object is not None:
            tokenizer_object.save_pretrained(tmp)
    return Path(output_dir)


def find_checkpoints(model_path, which: str = "best", step: Optional[str] = None,
                     epoch: Optional[str] = None) -> list[str]:
    """The original's checkpoint selection in a fairseq save directory."""
    model_path = os.path.expanduser(model_path)
    if not os.path.isdir(model_path):
        raise UserError(f"--model-path {model_path} is not a folder")
    patterns = {
        "best": "checkpoint_best.pt",
        "last": "checkpoint_last.pt",
        "step": f"checkpoint_*_{step}.pt",
        "epoch": f"checkpoint{epoch}.pt",
        "all": "checkpoint*.pt",
    }
    if which == "step" and step is None:
        raise UserError("--ckpt step needs --ckpt-step N")
    if which == "epoch" and epoch is None:
        raise UserError("--ckpt epoch needs --ckpt-epoch N")
    found = sorted(glob(os.path.join(model_path, patterns[which])))
    if not found:
        raise UserError(f"no checkpoint matches {patterns[which]} in {model_path}")
    return found
