"""Loading a fairseq language model checkpoint for evaluation, and reading a
split in the blocks of its task (``docs/reference.md``, fairseq evaluation).

Any fairseq language model (``transformer_lm``, ``transformer_lm_ul``, any
decoder registered with fairseq) is loaded, as the original evaluation script
did, through the task ``language_modeling_with_generation`` on ``--data-dir``,
with ``--sample-break-mode none`` and no beginning-of-sentence token; the block
length (``--tokens-per-sample``) is set per pass. A ``gpt2_pretrained``
checkpoint keeps its own task, ``gpt2_language_modeling`` (GPT-2 ids, chunks of
``n + 1`` ids as ``run_gpt2.py`` cuts them), so both drivers see the same blocks.

The model's own config is taken from the checkpoint with its interpolations
resolved against the training task, so changing the block length never changes
the model (its positions stay those it was trained with).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from ..errors import UserError, first_line
from .checkpoints import (ARCH_NAME, checkpoint_arch, checkpoint_hf_config, checkpoint_num_updates,
                          checkpoint_task, read_checkpoint)

logger = logging.getLogger(__name__)

LM_TASKS = ("language_modeling", "language_modeling_with_generation")
GPT2_TASK = "gpt2_language_modeling"
EVAL_TASK = "language_modeling_with_generation"


@dataclass
class LoadedModel:
    """A checkpoint's model in evaluation mode, its task and its step."""

    path: str
    task: object
    model: object
    num_updates: Optional[int]
    state_cfg: dict

    @property
    def dictionary(self):
        return self.task.target_dictionary

    @property
    def is_gpt2(self) -> bool:
        return self.state_cfg["model"].get("_name") == ARCH_NAME

    @property
    def hf_model(self):
        return self.model.hf_model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def max_positions(self) -> Optional[int]:
        positions = self.model.max_positions()
        if isinstance(positions, tuple):
            positions = positions[0]
        if positions is None or positions == float("inf"):  # no limit (fconv_lm, lstm_lm: inf)
            return None
        return int(positions)

    def positions_are_sinusoidal(self) -> bool:
        from fairseq.modules import SinusoidalPositionalEmbedding

        embed = getattr(getattr(self.model, "decoder", None), "embed_positions", None)
        return isinstance(embed, SinusoidalPositionalEmbedding)


def _resolved_cfg(state: dict) -> dict:
    """The checkpoint's config with ``${...}`` interpolations resolved (as training saw it)."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.create(state["cfg"]), resolve=True)
    except Exception:  # an interpolation to a missing key: keep what is there
        return OmegaConf.to_container(OmegaConf.create(state["cfg"]), resolve=False)


def load_model(path, data_dir, *, device="cpu") -> LoadedModel:
    """The task and model of a fairseq language model checkpoint, on ``data_dir``.

    Errors a user can cause (not a checkpoint, not a language model, a data
    folder that is not a data-bin, a dictionary that does not fit the
    checkpoint's embedding) are :class:`UserError`.
    """
    from fairseq import tasks
    from omegaconf import OmegaConf

    from . import register

    register()
    state = read_checkpoint(path)
    task_name, arch = checkpoint_task(state), checkpoint_arch(state)
    cfg = _resolved_cfg(state)
    data_dir = str(Path(data_dir).expanduser())
    if not Path(data_dir).is_dir():
        raise UserError(f"--data-dir {data_dir} is not a folder")
    kwargs = {}
    if arch == ARCH_NAME:
        if task_name != GPT2_TASK:
            raise UserError(f"checkpoint {path} holds a {ARCH_NAME} model trained with task "
                            f"{task_name}; expected {GPT2_TASK}")
        config = checkpoint_hf_config(state)
        kwargs = {"vocab_size": int(config.vocab_size), "eos_id": getattr(config, "eos_token_id", None)}
        task_cfg = dict(cfg["task"])
    elif task_name in LM_TASKS:
        # The original evaluation: language_modeling_with_generation, no BOS, no breaks.
        task_cfg = {key: value for key, value in cfg["task"].items()}
        task_cfg["_name"] = EVAL_TASK
        task_cfg["sample_break_mode"] = "none"
        task_cfg["add_bos_token"] = False
        task_cfg["sequence_level_train_rate"] = 0.0
    else:
        raise UserError(f"checkpoint {path} was trained with task {task_name or 'unknown'}, not a "
                        f"language modeling task ({', '.join(LM_TASKS + (GPT2_TASK,))})")
    task_cfg["data"] = data_dir
    model_cfg = OmegaConf.create(cfg["model"])
    try:
        task = tasks.setup_task(OmegaConf.create(task_cfg), from_checkpoint=True, **kwargs)
        model = task.build_model(model_cfg, from_checkpoint=True)
    except UserError:
        raise
    except (ValueError, KeyError, FileNotFoundError, OSError) as exc:
        raise UserError(f"cannot set up the task and model of {path} on --data-dir {data_dir}: "
                        f"{first_line(exc)}") from None
    _check_dictionary(state, task, path, data_dir)
    try:
        model.load_state_dict(state["model"], strict=True, model_cfg=model_cfg)
    except RuntimeError as exc:
        raise UserError(f"the weights of {path} do not fit the model built from its config on "
                        f"--data-dir {data_dir}: {first_line(exc)}") from None
    if getattr(getattr(model, "decoder", None), "adaptive_softmax", None) is not None:
        raise UserError(f"{path} uses an adaptive softmax; its logits cover only part of the "
                        f"vocabulary, which the evaluation does not support")
    model.to(device).eval()
    return LoadedModel(str(path), task, model, checkpoint_num_updates(state), cfg)


def _check_dictionary(state: dict, task, path, data_dir) -> None:
    """The data-bin's dictionary must have as many symbols as the model's embedding rows."""
    weights = state["model"]
    embedding = weights.get("decoder.embed_tokens.weight")
    if embedding is None:
        return
    size = len(task.source_dictionary)
    if embedding.size(0) != size:
        raise UserError(f"the dictionary of --data-dir {data_dir} has {size} symbols but {path} "
                        f"was trained with {embedding.size(0)}; use the data-bin the model was "
                        f"trained on (its dict.txt)")


def load_blocks(loaded: LoadedModel, split: str, block_length: int):
    """The task's dataset of ``split`` with blocks of ``block_length`` tokens
    (``--tokens-per-sample``), in file order."""
    from omegaconf import open_dict

    task = loaded.task
    with open_dict(task.args):
        task.args.tokens_per_sample = int(block_length)
    try:
        task.load_dataset(split)
    except FileNotFoundError as exc:
        raise UserError(f"split {split!r} not found in the data folder: {first_line(exc)}") from None
    return task.dataset(split)


def iterate_blocks(dataset, blocks_per_batch: int = 1) -> Iterator[dict]:
    """Batches of ``blocks_per_batch`` consecutive blocks, collated by the dataset
    (a short last block is right-padded with the dictionary's padding)."""
    for start in range(0, len(dataset), blocks_per_batch):
        items = [dataset[i] for i in range(start, min(start + blocks_per_batch, len(dataset)))]
        yield dataset.collater(items)
