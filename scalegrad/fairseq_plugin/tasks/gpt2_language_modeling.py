"""``gpt2_language_modeling``: finetune a pretrained GPT-2 with fairseq on GPT-2 token ids.

Data. ``--data`` (the task's positional ``data``) is either

* a folder with the original ``{split}_tokens_bpe_gpt2.pt`` files (``docs/reference.md``, section
  4), read with :func:`scalegrad.data.load_split` (``weights_only``), or
* a fairseq ``data-bin`` (``dict.txt`` plus ``{split}.bin/.idx``), as
  ``scripts/prepare_data.py --fairseq-data-bin`` writes it, or any data-bin whose
  dictionary symbols are GPT-2 ids (fairseq's own GPT-2 BPE data-bins, the
  unlikelihood release). Each fairseq index is mapped back to its GPT-2 id
  through the dictionary (for ``prepare_data.py``'s data-bins: id = index - 4);
  the ``</s>`` that fairseq-preprocess appends to every line is dropped, or
  replaced by ``--data-bin-eos-id``.

Either way a split becomes one flat tensor of GPT-2 ids, cut as the GPT-2 driver
cuts it: non-overlapping chunks of ``--tokens-per-sample + 1`` ids from the
start, the tail dropped (:func:`scalegrad.data.chunk_tokens`); the model reads
the first ``n`` ids of a chunk and is scored on the last ``n``. So a fairseq run
trains and validates on exactly the chunks of ``run_gpt2.py --train-batch-size
n``, and ``evaluate_fairseq.py`` on those of ``run_gpt2.py``'s evaluation.
(fairseq's ``language_modeling`` cuts blocks of ``n`` targets whose inputs are
shifted by one, with ``</s>`` in front of the first; that would feed GPT-2 a
token it never saw in this role, and differ from the GPT-2 driver.) Only
``--sample-break-mode none`` is offered, and ``--add-bos-token`` is refused.

Ids and padding. GPT-2 ids reach the model unchanged: the dictionary's index
``i`` is GPT-2 id ``i`` for ``i < V`` (the model's vocabulary size, from
``--pretrained-model``'s config), and one more index, ``V``, is padding (also
``<unk>``). No real id can collide with it, and since every chunk has the same
length, the task's batches are never padded; padding that another component
adds is kept away from the embedding by the model (see
:mod:`scalegrad.models.gpt2_pretrained`) and ignored by the criteria, which
skip ``padding_idx`` targets. The end-of-text id of the model is the
dictionary's ``eos`` (fairseq's generators end hypotheses on it).

On top of ``language_modeling_with_generation`` (token metrics every
``--compute-metrics-interval`` updates, optional sequence-level unlikelihood
steps), ``--eval-completion`` continues the prefixes of every validation chunk
greedily (``--eval-prefix-length``, ``--eval-continuation-length``; the GPT-2
driver's generation code) and logs ``seq_rep_1`` .. ``seq_rep_4`` (mean over
continuations, in BPE tokens) and ``uniq_seq`` (distinct space-separated pieces
of the decoded continuations) with the validation stats. ``uniq_seq`` is
counted per process: with several processes it is the sum of their counts (an
upper bound); ``evaluate_fairseq.py`` gives the exact figure. With several
``--valid-subset`` values it counts over all of them.
"""


import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from fairseq import utils
from fairseq.data import Dictionary, FairseqDataset, data_utils, indexed_dataset
from fairseq.logging import metrics
from fairseq.tasks import register_task
from omegaconf import OmegaConf, open_dict

from ...data import SPLITS, chunk_tokens, load_split, make_prefixes, split_path
from ...errors import UserError, first_line
from ...hf import unwrap
from ...metrics import CompletionMetrics, ngram_metrics
from ..models.gpt2_pretrained import (
    PRETRAINED_MODEL_HELP,
    GPT2PretrainedModel,
    max_positions_of,
    resolve_source,
)
from .language_modeling_with_generation import (
    LanguageModelingWithGenerationConfig,
    LanguageModelingWithGenerationTask,
)

logger = logging.getLogger(__name__)

NGRAM_ORDERS = (1, 2, 3, 4)
COMPLETION_KEYS = ["completion_count", "uniq_seq_new"] + [f"seq_rep_{n}_sum" for n in NGRAM_ORDERS]


# --------------------------------------------------------------------------- #
# Dictionary and dataset
# --------------------------------------------------------------------------- #

class GPT2Dictionary(Dictionary):
    """Index ``i`` is GPT-2 id ``i`` (``i < V``); index ``V`` is padding and ``<unk>``.

    ``eos``/``bos`` are the model's end-of-text id when known, else the padding
    index. Nothing is added in front (fairseq's own dictionaries put four
    special symbols first); the symbols are the ids as strings.
    """

    PAD_WORD = "<pad>"

    def __init__(self, vocab_size: int, eos_id: Optional[int] = None):
        if vocab_size < 1:
            raise ValueError(f"vocabulary size must be >= 1, got {vocab_size}")
        self.symbols = [str(i) for i in range(vocab_size)] + [self.PAD_WORD]
        self.count = [1] * len(self.symbols)
        self.indices = {symbol: index for index, symbol in enumerate(self.symbols)}
        self.pad_index = self.unk_index = vocab_size
        if eos_id is None or not 0 <= int(eos_id) < vocab_size:
            eos_id = vocab_size
        self.eos_index = self.bos_index = int(eos_id)
        self.pad_word = self.unk_word = self.PAD_WORD
        self.eos_word = self.bos_word = self.symbols[self.eos_index]
        self.nspecial = 0

    @property
    def vocab_size(self) -> int:
        """The number of GPT-2 ids (the padding index)."""
        return self.pad_index


class GPT2ChunkDataset(FairseqDataset):
    """Chunks of ``n + 1`` GPT-2 ids; item ``i`` reads ``chunk[:-1]``, targets ``chunk[1:]``.

    All items have the same length, so batches are plain stacks (no padding).
    ``ordered_indices`` is a random permutation when ``shuffle`` (fairseq draws
    it under ``seed + epoch``), as fairseq's ``MonolingualDataset`` does.
    """

    def __init__(self, chunks: torch.Tensor, shuffle: bool = True):
        if chunks.dim() != 2 or chunks.size(1) < 2:
            raise ValueError(f"expected chunks of shape (num_chunks, n + 1), got {tuple(chunks.shape)}")
        # int32 halves the memory of a big split (every process holds its own copy).
        self.chunks = chunks.to(torch.int32) if int(chunks.max()) < 2**31 else chunks
        self.length = chunks.size(1) - 1
        self.shuffle = shuffle
        self.sizes = np.full(chunks.size(0), self.length, dtype=np.int64)

    def __getitem__(self, index):
        chunk = self.chunks[index].long()
        return {"id": index, "source": chunk[:-1], "target": chunk[1:]}

    def __len__(self):
        return self.chunks.size(0)

    def collater(self, samples):
        if len(samples) == 0:
            return {}
        source = torch.stack([s["source"] for s in samples])
        return {
            "id": torch.tensor([s["id"] for s in samples], dtype=torch.long),
            "nsentences": len(samples),
            "ntokens": source.numel(),
            "net_input": {
                "src_tokens": source,
                "src_lengths": torch.full((len(samples),), self.length, dtype=torch.long),
            },
            "target": torch.stack([s["target"] for s in samples]),
        }

    def num_tokens(self, index):
        return self.length

    def num_tokens_vec(self, indices):
        return np.full(len(indices), self.length, dtype=np.int64)

    def size(self, index):
        return self.length

    def ordered_indices(self):
        if self.shuffle:
            return np.random.permutation(len(self))
        return np.arange(len(self))

    @property
    def supports_prefetch(self):
        return False


# --------------------------------------------------------------------------- #
# Reading the data
# --------------------------------------------------------------------------- #

def data_format(data_dir: str) -> str:
    """``"pt"`` for a folder of ``{split}_tokens_bpe_gpt2.pt``, ``"data-bin"`` for a
    fairseq data-bin; an error naming the folder otherwise."""
    if not os.path.isdir(data_dir):
        raise UserError(f"data folder {data_dir} does not exist")
    if any(os.path.isfile(split_path(data_dir, split)) for split in SPLITS):
        return "pt"
    if os.path.isfile(os.path.join(data_dir, "dict.txt")):
        return "data-bin"
    raise UserError(f"data folder {data_dir} holds neither {{train,valid,test}}_tokens_bpe_gpt2.pt "
                    f"nor a fairseq data-bin (dict.txt); make one with scripts/prepare_data.py")


def data_bin_index_to_id(dictionary: Dictionary) -> torch.Tensor:
    """GPT-2 id of every fairseq index of a data-bin dictionary (``-1``: not an id:
    the special symbols and fairseq's ``madeupword`` fillers)."""
    ids = torch.full((len(dictionary),), -1, dtype=torch.long)
    for index, symbol in enumerate(dictionary.symbols):
        if index < dictionary.nspecial:
            continue
        try:
            ids[index] = int(symbol)
        except ValueError:
            continue
    return ids


def load_data_bin_split(data_dir: str, split: str, *, eos_id: Optional[int] = None) -> torch.Tensor:
    """One data-bin split as a flat tensor of GPT-2 ids (``</s>`` dropped or replaced)."""
    dict_path = os.path.join(data_dir, "dict.txt")
    try:
        dictionary = Dictionary.load(dict_path)
    except Exception as exc:
        raise UserError(f"cannot read {dict_path}: {exc}") from None
    index_to_id = data_bin_index_to_id(dictionary)
    if int((index_to_id >= 0).sum()) == 0:
        raise UserError(f"{dict_path} lists no GPT-2 ids (its symbols should be the ids, as "
                        f"scripts/prepare_data.py --fairseq-data-bin writes them)")
    prefix = os.path.join(data_dir, split)
    dataset = data_utils.load_indexed_dataset(prefix, dictionary)
    if dataset is None:
        raise UserError(f"split {split!r} not found in data-bin {data_dir} ({prefix}.bin/.idx)")
    if len(dataset) == 0:
        raise UserError(f"split {split!r} of data-bin {data_dir} is empty")
    indices = _all_items(dataset)
    line_end = indices == dictionary.eos()
    if eos_id is None:
        indices = indices[~line_end]
        ids = index_to_id[indices]
    else:
        ids = index_to_id[indices]
        ids[line_end] = int(eos_id)
    bad = ids < 0
    if bool(bad.any()):
        symbol = dictionary.symbols[int(indices[bad.nonzero()[0, 0]])]
        raise UserError(f"split {split!r} of data-bin {data_dir} holds {symbol!r}, which is not a "
                        f"GPT-2 id; the data-bin must be made from GPT-2 ids "
                        f"(scripts/prepare_data.py --fairseq-data-bin)")
    return ids


def _all_items(dataset) -> torch.Tensor:
    """Every item of an indexed dataset, concatenated (int64)."""
    index = getattr(dataset, "_index", None)
    buffer = getattr(dataset, "_bin_buffer", None)
    if isinstance(dataset, indexed_dataset.MMapIndexedDataset) and index is not None \
            and buffer is not None:
        # The .bin of an mmap data-bin is the items back to back: read it at once
        # (a data-bin of text lines has millions of items).
        total = int(np.asarray(dataset.sizes, dtype=np.int64).sum())
        return torch.from_numpy(np.frombuffer(buffer, dtype=index.dtype, count=total).astype(np.int64))
    return torch.cat([dataset[i] for i in range(len(dataset))]).long()


# --------------------------------------------------------------------------- #
# The task
# --------------------------------------------------------------------------- #

@dataclass
class GPT2LanguageModelingConfig(LanguageModelingWithGenerationConfig):
    pretrained_model: str = field(default="gpt2", metadata={"help": PRETRAINED_MODEL_HELP})
    hf_tokenizer: Optional[str] = field(
        default=None,
        metadata={"help": "Hugging Face tokenizer (hub name or folder) that decodes the "
                          "continuations for uniq_seq; default: --pretrained-model"},
    )
    data_bin_eos_id: Optional[int] = field(
        default=None,
        metadata={"help": "GPT-2 id that replaces the </s> fairseq-preprocess puts at the end of "
                          "every line of a data-bin; default: drop them (right for "
                          "prepare_data.py's data-bins; for a data-bin of text lines, 198, "
                          "GPT-2's newline, keeps the line breaks)"},
    )
    eval_completion: bool = field(
        default=False,
        metadata={"help": "in validation, continue the prefixes of every chunk greedily and log "
                          "seq_rep_1..4 and uniq_seq"},
    )
    eval_prefix_length: int = field(
        default=50, metadata={"help": "prefix length of --eval-completion"}
    )
    eval_continuation_length: int = field(
        default=100, metadata={"help": "continuation length of --eval-completion"}
    )


@register_task("gpt2_language_modeling", dataclass=GPT2LanguageModelingConfig)
class GPT2LanguageModelingTask(LanguageModelingWithGenerationTask):
    """Finetune a pretrained GPT-2 (``--arch gpt2_pretrained``) on GPT-2 ids; see the module doc."""

    def __init__(self, args, dictionary, output_dictionary=None, targets=None):
        super().__init__(args, dictionary, output_dictionary=output_dictionary, targets=targets)
        if str(getattr(args, "sample_break_mode", "none")) not in ("none", "None"):
            raise ValueError("gpt2_language_modeling cuts the ids into chunks of --tokens-per-sample "
                             "+ 1 (as the GPT-2 driver); only --sample-break-mode none is supported")
        if getattr(args, "add_bos_token", False):
            raise ValueError("gpt2_language_modeling feeds GPT-2 ids as they are; "
                             "--add-bos-token is not supported")
        if args.eval_completion:
            if not 1 <= args.eval_prefix_length <= args.tokens_per_sample:
                raise ValueError(f"--eval-prefix-length must be between 1 and --tokens-per-sample "
                                 f"({args.tokens_per_sample}), got {args.eval_prefix_length}")
            if args.eval_continuation_length < 1:
                raise ValueError(f"--eval-continuation-length must be >= 1, "
                                 f"got {args.eval_continuation_length}")
        self._tokenizer = None
        self._valid_completions: Optional[CompletionMetrics] = None

    @classmethod
    def setup_task(cls, cfg, vocab_size: Optional[int] = None, eos_id: Optional[int] = None, **kwargs):
        """Build the dictionary from the model's vocabulary.

        ``vocab_size``/``eos_id`` (used by ``scripts/evaluate_fairseq.py`` with a
        checkpoint's recorded config) skip reading ``--pretrained-model``'s config.
        """
        if not cfg.data:
            raise ValueError("gpt2_language_modeling needs a data folder (the first argument of "
                             "fairseq-train, or task.data)")
        paths = utils.split_paths(cfg.data)
        if len(paths) > 1:
            raise ValueError(f"gpt2_language_modeling reads one data folder, got {len(paths)}: "
                             f"{cfg.data}")
        data_format(paths[0])  # a clear error before anything else
        if vocab_size is None:
            vocab_size, eos_id = pretrained_vocabulary(cfg.pretrained_model)
        dictionary = GPT2Dictionary(vocab_size, eos_id)
        logger.info("dictionary: %d GPT-2 ids + padding (index %d), end-of-text id %s",
                    vocab_size, dictionary.pad(), eos_id)
        return cls(cfg, dictionary, dictionary, targets=["future"])

    # -- data ----------------------------------------------------------------

    def load_tokens(self, split: str) -> torch.Tensor:
        """The split as one flat tensor of GPT-2 ids (either data format)."""
        data_dir = utils.split_paths(self.args.data)[0]
        vocab = self.dictionary.vocab_size
        if data_format(data_dir) == "pt":
            tokens = load_split(split_path(data_dir, split), vocab_size=vocab)
        else:
            tokens = load_data_bin_split(data_dir, split, eos_id=self.args.data_bin_eos_id)
            if int(tokens.max()) >= vocab:
                raise UserError(f"split {split!r} of data-bin {data_dir} holds GPT-2 id "
                                f"{int(tokens.max())}, outside the model's vocabulary of {vocab}")
        return tokens

    def load_dataset(self, split: str, epoch=1, combine=False, **kwargs):
        tokens = self.load_tokens(split)
        chunks = chunk_tokens(tokens, self.args.tokens_per_sample)
        self.datasets[split] = GPT2ChunkDataset(chunks, shuffle=True)
        logger.info("%s: %d ids, %d chunks of %d + 1", split, tokens.numel(), chunks.size(0),
                    self.args.tokens_per_sample)
        return self.datasets[split]

    def build_dataset_for_inference(self, src_tokens, src_lengths, **kwargs):
        raise NotImplementedError("gpt2_language_modeling: use scripts/evaluate_fairseq.py")

    # -- model -----------------------------------------------------------------

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        hf_model = hf_model_of(model)
        if hf_model is not None:
            record_hf_config(cfg, hf_model.config)
            positions = max_positions_of(hf_model.config)
            needed = self.args.eval_prefix_length + self.args.eval_continuation_length
            if self.args.eval_completion and needed > positions:
                raise ValueError(f"--eval-prefix-length + --eval-continuation-length = {needed} "
                                 f"exceeds the model's {positions} positions")
        return model

    # -- generation-based validation --------------------------------------------

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from ...tokenization import load_tokenizer

            name = self.args.hf_tokenizer or self.args.pretrained_model
            self._tokenizer = load_tokenizer(resolve_source(name))
        return self._tokenizer

    def begin_valid_epoch(self, epoch, model):
        super().begin_valid_epoch(epoch, model)
        self._valid_completions = None

    def valid_step(self, sample, model, criterion):
        loss, sample_size, logging_output = super().valid_step(sample, model, criterion)
        if self.args.eval_completion:
            logging_output.update(self.completion_logging(sample, model))
        return loss, sample_size, logging_output

    def completion_logging(self, sample, model) -> dict:
        """Summable completion stats of one validation batch: its chunks' prefixes
        continued greedily."""
        out = {key: 0.0 for key in COMPLETION_KEYS}
        if not sample or "target" not in sample:
            return out
        source, target = sample["net_input"]["src_tokens"], sample["target"]
        chunks = torch.cat([source[:, :1], target], dim=1)
        prefix_length = self.args.eval_prefix_length
        prefixes = make_prefixes(chunks, prefix_length)
        completions = greedy_completions(model, prefixes, self.args.eval_continuation_length)
        if self._valid_completions is None:
            self._valid_completions = CompletionMetrics(self.tokenizer, prefix_length)
        seen = len(self._valid_completions.unique_pieces)
        self._valid_completions.update(completions)
        out["uniq_seq_new"] = float(len(self._valid_completions.unique_pieces) - seen)
        out["completion_count"] = float(len(completions))
        for completion in completions:
            stats = ngram_metrics(completion[prefix_length:], pad=-1)
            for n in NGRAM_ORDERS:
                out[f"seq_rep_{n}_sum"] += stats[f"pct_repeat_{n}grams"]
        return out

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        count = sum(float(log.get("completion_count", 0)) for log in logging_outputs)
        if count > 0:
            for n in NGRAM_ORDERS:
                total = sum(float(log.get(f"seq_rep_{n}_sum", 0)) for log in logging_outputs)
                metrics.log_scalar(f"seq_rep_{n}", total / count, count, round=4)
            metrics.log_scalar_sum(
                "uniq_seq", sum(float(log.get("uniq_seq_new", 0)) for log in logging_outputs))


# --------------------------------------------------------------------------- #
# Helpers shared with scripts/evaluate_fairseq.py
# --------------------------------------------------------------------------- #

def pretrained_vocabulary(pretrained_model: Optional[str]) -> tuple[int, Optional[int]]:
    """``(vocab_size, eos_token_id)`` from the pretrained model's config."""
    if not pretrained_model:
        raise ValueError("gpt2_language_modeling needs --pretrained-model (task.pretrained_model): "
                         "the model whose vocabulary the data uses")
    from transformers import AutoConfig

    source = resolve_source(pretrained_model)
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as exc:
        raise ValueError(f"cannot read the config of --pretrained-model {pretrained_model!r}: "
                         f"{first_line(exc)} (a hub name needs internet access; or pass a local "
                         f"folder)") from None
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return int(config.vocab_size), eos


def hf_model_of(model):
    """The Hugging Face model of a ``gpt2_pretrained`` model (``None`` for other models)."""
    model = unwrap(model)
    return model.hf_model if isinstance(model, GPT2PretrainedModel) else None


def greedy_completions(model, prefixes: torch.Tensor, continuation_length: int) -> list[list[int]]:
    """Prefix + greedy continuation ids of every prefix: the GPT-2 driver's generation
    code on a ``gpt2_pretrained`` model; fairseq's incremental decoding on others."""
    hf_model = hf_model_of(model)
    if hf_model is not None:
        from ...generation import generate_continuations

        return generate_continuations(hf_model, prefixes, continuation_length).tolist()
    from ..criterions.sequence_penalty import greedy_continuation

    fairseq_model = unwrap(model)
    was_training = fairseq_model.training
    fairseq_model.eval()
    try:
        continuation = greedy_continuation(fairseq_model, prefixes, continuation_length)
    finally:
        fairseq_model.train(was_training)
    return torch.cat([prefixes, continuation], dim=1).tolist()


def record_hf_config(cfg, config) -> None:
    """Write the Hugging Face config into the model's fairseq config (saved with
    every checkpoint), so a checkpoint loads without the pretrained model."""
    text = config.to_json_string(use_diff=False)
    if OmegaConf.is_config(cfg):
        with open_dict(cfg):
            cfg.hf_config = text
    else:
        setattr(cfg, "hf_config", text)

