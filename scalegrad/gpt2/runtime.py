"""Where the driver runs: device, mixed precision, torchrun processes, the model and
its tokenizer.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) a process group is
started (NCCL on CUDA, gloo on the CPU); every process has a rank, and only rank
0 writes files or shows progress bars.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..errors import UserError, first_line
from ..io import check_folder_path, complete_copy, make_folder

logger = logging.getLogger(__name__)

#: Files that mark a folder as holding a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model",
                   "spiece.model")


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    amp_dtype: torch.dtype | None = None
    progress: bool = True

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def show_progress(self) -> bool:
        return self.progress and self.is_main

    def autocast(self):
        """Mixed-precision autocast for forward passes (a no-op without --fp16/--bf16)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather_objects(self, obj: Any) -> list:
        """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
        if not self.distributed:
            return [obj]
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on at least one."""
        if not self.distributed:
            return bool(flag)
        value = torch.tensor([1.0 if flag else 0.0], device=self._collective_device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def setup_runtime(args) -> Runtime:
    """Pick the device and precision, and join the torchrun process group if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    if args.device:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise UserError(f"--device {args.device!r} is not a device (use cpu, cuda or cuda:N)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {args.device} asked for CUDA, which is not available here; "
                            f"use --device cpu")
        if device.type == "cuda" and world_size > 1 and device.index is None:
            device = torch.device("cuda", local_rank)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    amp_dtype = None
    if args.fp16:
        if device.type != "cuda":
            raise UserError("--fp16 needs a CUDA device; use --bf16 on the CPU, or neither")
        amp_dtype = torch.float16
    elif args.bf16:
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("--bf16: this GPU does not support bfloat16; use --fp16")
        amp_dtype = torch.bfloat16

    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    runtime = Runtime(device=device, rank=rank, world_size=world_size, local_rank=local_rank,
                      amp_dtype=amp_dtype, progress=not args.no_progress)
    if runtime.is_main:
        logger.info("device %s, %d process(es), precision %s", device, world_size,
                    {None: "float32", torch.float16: "fp16 autocast",
                     torch.bfloat16: "bf16 autocast"}[amp_dtype])
    return runtime


def teardown_runtime(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices), as the original does."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# --------------------------------------------------------------------------- #
# Model and tokenizer
# --------------------------------------------------------------------------- #

def _looks_like_path(name: str) -> bool:
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1
            or os.path.sep != "/" and os.path.sep in name)


def model_source(args) -> str:
    """Where the model comes from: ``--model-load-dir``, else ``--model-name``."""
    return args.model_load_dir or args.model_name


def load_model(source: str, *, flag: str = "--model-name"):
    """``AutoModelForCausalLM.from_pretrained(source)`` in float32 and evaluation mode.

    A missing folder, a folder without weights, an unknown hub name (or no
    internet) end as one :class:`UserError` line.
    """
    from transformers import AutoModelForCausalLM

    source = os.path.expanduser(source)
    if not os.path.exists(source):
        copy = complete_copy(source)  # a write of this folder was interrupted
        if copy is not None and os.fspath(copy) != source:
            logger.warning("%s %s: reading the complete copy %s that an interrupted write "
                           "left", flag, source, copy)
            source = os.fspath(copy)
    if os.path.exists(source):
        if not os.path.isdir(source):
            raise UserError(f"{flag} {source} is a file; expected a model folder written by "
                            f"save_pretrained")
        if not os.path.isfile(os.path.join(source, "config.json")):
            raise UserError(f"{flag} {source} holds no config.json; expected a model folder "
                            f"written by save_pretrained")
    elif flag == "--model-load-dir" or _looks_like_path(source):
        raise UserError(f"{flag} {source} does not exist")
    try:
        model = AutoModelForCausalLM.from_pretrained(source)
    except Exception as exc:
        if os.path.isdir(source):
            raise UserError(f"cannot load a model from {flag} {source}: {first_line(exc)}") from None
        raise UserError(f"cannot load the model {source!r} ({flag}): {first_line(exc)}; a hub "
                        f"name needs internet access, or pass a local folder") from None
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = model.float()
    return model.eval()


def has_tokenizer(folder: str | os.PathLike) -> bool:
    return os.path.isdir(folder) and any(
        os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES)


def tokenizer_source(args, source: str | None = None) -> str:
    """``--tokenizer``; else the model folder when it holds a tokenizer; else ``--model-name``."""
    if args.tokenizer:
        return args.tokenizer
    source = source if source is not None else model_source(args)
    if has_tokenizer(os.path.expanduser(source)):
        return source
    return args.model_name


def load_tokenizer_for(args, source: str | None = None):
    from ..tokenization import load_tokenizer

    return load_tokenizer(os.path.expanduser(tokenizer_source(args, source)))


def check_output_dir(output_dir: str) -> None:
    """Fail early (before any work) when ``output_dir`` cannot be created or written."""
    check_folder_path(output_dir, "--output-dir")


def make_output_dir(output_dir: str) -> Path:
    return make_folder(output_dir, "--output-dir")


def check_positions(model, name: str, length: int) -> None:
    """A sequence of ``length`` tokens must fit the model's position embeddings."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and length > positions:
        raise UserError(f"{name} {length} is longer than the model's {positions} positions; "
                        f"use a smaller value")
