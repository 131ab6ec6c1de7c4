"""``gpt2_pretrained``: a pretrained Hugging Face GPT-2 as a fairseq language model.

The fairseq model is a thin shell around ``transformers``' causal LM
(``GPT2LMHeadModel`` for GPT-2): ``--pretrained-model`` (a hub name or a folder
written by ``save_pretrained``) gives the architecture and the starting weights;
the logits are the Hugging Face model's, unchanged.

Token ids. The model reads GPT-2 ids as they are; the task
``gpt2_language_modeling`` hands them over unchanged and gives every fairseq
component a dictionary whose index ``i`` is GPT-2 id ``i`` for ``i < V`` (the
model's vocabulary size), plus one extra entry, ``V``, used as padding (see
:class:`~scalegrad.tasks.gpt2_language_modeling.GPT2Dictionary`). So:

* ``net_output[0]`` holds the model's ``V`` logits per position: the criteria
  (ScaleGrad, cross-entropy, the token metrics) see exactly what the Hugging
  Face model computes;
* :meth:`get_normalized_probs` is a distribution over the task's dictionary, so
  it has ``V + 1`` columns, the padding column at probability 0 (log-prob
  ``-inf``): fairseq's generators index ``lprobs[:, pad]`` and need it there;
* padding (id ``V``) never reaches the embedding: it is replaced by id 0 before
  the forward pass. Padding must be on the right (what fairseq's language
  model collaters do; the task's own batches are never padded): the causal
  attention then keeps it out of every real position, and the targets there
  are padding, which the criteria ignore.

Incremental decoding keeps the Hugging Face key/value cache in fairseq's
``incremental_state``; each call feeds only the tokens not yet in the cache, so
both fairseq's conventions work (the whole prefix every step, as
``SequenceGenerator`` passes it, or one token at a time), and beams are
reordered with the cache's ``reorder_cache``.

Checkpoints. The task records the Hugging Face config (as JSON) in
``model.hf_config`` of the run's config, which fairseq saves in every
checkpoint; a model built from a checkpoint uses it and skips loading the
pretrained weights, so evaluation and ``scripts/export_fairseq_to_hf.py`` need
neither the hub nor the original folder.
"""


import json
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from fairseq.dataclass import FairseqDataclass
from fairseq.models import FairseqIncrementalDecoder, FairseqLanguageModel, register_model
from torch import Tensor

from ...hf import (cache_argument, check_linear_head, hf_config_from_dict, reorder_cache,
                   returned_cache)

logger = logging.getLogger(__name__)

PRETRAINED_MODEL_HELP = (
    "Hugging Face hub name (gpt2, gpt2-medium, ...) or folder written by save_pretrained: "
    "the model to finetune, whose vocabulary the data uses (read by both the task and "
    "the architecture)"
)


@dataclass
class GPT2PretrainedConfig(FairseqDataclass):
    pretrained_model: str = field(default="gpt2", metadata={"help": PRETRAINED_MODEL_HELP})
    dropout: Optional[float] = field(
        default=None,
        metadata={
            "help": "residual and embedding dropout (GPT-2's resid_pdrop and embd_pdrop); "
            "default: the pretrained config's (0.1 for GPT-2). The GPT-2 driver trains "
            "with dropout off (a quirk of the original): pass 0 here and to "
            "--attention-dropout to match it"
        },
    )
    attention_dropout: Optional[float] = field(
        default=None,
        metadata={"help": "attention dropout (GPT-2's attn_pdrop); default: the pretrained config's"},
    )
    hf_config: Optional[str] = field(
        default=None,
        metadata={
            "help": "set by the task, not by hand: the Hugging Face config as JSON, saved "
            "with each checkpoint so that it loads without the pretrained model"
        },
    )


_DROPOUT_ATTRIBUTES = {"dropout": ("resid_pdrop", "embd_pdrop"), "attention_dropout": ("attn_pdrop",)}


def load_hf_config(cfg):
    """The Hugging Face config the model is built with: ``cfg.hf_config`` when
    set (a checkpoint's), else the pretrained model's; dropout overrides applied."""
    from transformers import AutoConfig

    if getattr(cfg, "hf_config", None):
        config = hf_config_from_dict(json.loads(cfg.hf_config))
    else:
        config = AutoConfig.from_pretrained(resolve_source(cfg.pretrained_model))
    for option, attributes in _DROPOUT_ATTRIBUTES.items():
        value = getattr(cfg, option, None)
        if value is None:
            continue
        if not 0.0 <= float(value) < 1.0:
            raise ValueError(f"--{option.replace('_', '-')} must be in [0, 1), got {value}")
        for attribute in attributes:
            if not hasattr(config, attribute):
                raise ValueError(f"--{option.replace('_', '-')}: the {config.model_type} config has "
                                 f"no {attribute}; leave the option out for this model")
            setattr(config, attribute, float(value))
    return config


def resolve_source(name: str) -> str:
    """A hub name as it is; a local path with ``~`` expanded."""
    expanded = os.path.expanduser(name)
    return expanded if os.path.exists(expanded) else name


def vocab_size_of(config) -> int:
    return int(config.vocab_size)


def max_positions_of(config) -> int:
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return int(1e6)


@register_model("gpt2_pretrained", dataclass=GPT2PretrainedConfig)
class GPT2PretrainedModel(FairseqLanguageModel):
    """A Hugging Face causal LM (GPT-2) as a fairseq language model; see the module doc."""

    @classmethod
    def build_model(cls, cfg, task):
        from transformers import AutoModelForCausalLM

        config = load_hf_config(cfg)
        if getattr(cfg, "hf_config", None):
            # From a checkpoint (or a recorded config): the weights come from the checkpoint.
            hf_model = AutoModelForCausalLM.from_config(config)
        else:
            source = resolve_source(cfg.pretrained_model)
            logger.info("loading the pretrained model %s", source)
            hf_model = AutoModelForCausalLM.from_pretrained(source, config=config)
        if any(p.dtype != torch.float32 for p in hf_model.parameters()):
            hf_model = hf_model.float()
        dictionary = task.target_dictionary
        vocab = vocab_size_of(hf_model.config)
        if len(dictionary) != vocab + 1 or dictionary.pad() != vocab:
            raise ValueError(
                f"the task's dictionary ({len(dictionary)} entries, padding {dictionary.pad()}) "
                f"does not fit the model's vocabulary of {vocab} ids (it needs {vocab + 1} "
                f"entries, padding {vocab}): use the gpt2_language_modeling task with the same "
                f"--pretrained-model"
            )
        return cls(GPT2PretrainedDecoder(dictionary, hf_model))

    @property
    def hf_model(self):
        """The wrapped Hugging Face model (``GPT2LMHeadModel``)."""
        return self.decoder.model

    def output_projection(self):
        """``(weight, bias)`` of the output embedding (``bias`` is None for GPT-2): for
        a GPT-2-like head the logits are ``features @ weight.T (+ bias)``, with
        ``features`` the final hidden states that ``model(src_tokens,
        features_only=True)[0]`` returns (``ScaleGradCriterion``'s ``--fused-loss``).
        :meth:`check_output_projection` checks that this holds for the wrapped model."""
        head = self.hf_model.get_output_embeddings()
        return head.weight, getattr(head, "bias", None)

    def check_output_projection(self, src_tokens: Tensor) -> None:
        """Raise ``ValueError`` (saying why) unless the logits are the final hidden states
        times the output embedding on ``src_tokens`` (a few tokens suffice); see
        :func:`scalegrad.hf.check_linear_head`."""
        check_linear_head(self.hf_model, self.decoder._real_ids(src_tokens))


class GPT2PretrainedDecoder(FairseqIncrementalDecoder):
    def __init__(self, dictionary, hf_model):
        super().__init__(dictionary)
        self.model = hf_model
        self.vocab_size = vocab_size_of(hf_model.config)
        self.padding_idx = dictionary.pad()
        self._cache_argument = cache_argument(hf_model)

    # -- forward -------------------------------------------------------------

    def _real_ids(self, tokens: Tensor) -> Tensor:
        """Padding (any index >= V) replaced by id 0; see the module doc."""
        return tokens.masked_fill(tokens >= self.vocab_size, 0)

    def forward(self, prev_output_tokens, encoder_out=None, incremental_state=None,
                features_only: bool = False, src_lengths=None, **kwargs):
        if features_only:
            return self.extract_features(prev_output_tokens, incremental_state=incremental_state)
        tokens = self._real_ids(prev_output_tokens)
        if incremental_state is None:
            logits = self.model(input_ids=tokens, use_cache=False).logits
        else:
            logits = self._incremental(tokens, incremental_state).logits
        return logits, {"attn": [None], "inner_states": None}

    def extract_features(self, prev_output_tokens, encoder_out=None, incremental_state=None,
                         **kwargs):
        """The final hidden states ``(batch, time, dim)`` (before the LM head)."""
        tokens = self._real_ids(prev_output_tokens)
        if incremental_state is None:
            hidden = self.model.base_model(input_ids=tokens, use_cache=False).last_hidden_state
        else:
            hidden = self._incremental(tokens, incremental_state, base=True).last_hidden_state
        return hidden, {"attn": [None], "inner_states": None}

    def output_layer(self, features, **kwargs):
        return self.model.get_output_embeddings()(features)

    def _incremental(self, tokens: Tensor, incremental_state, base: bool = False):
        saved = self.get_incremental_state(incremental_state, "hf")
        cache = saved.get("cache") if saved else None
        cached = cache.get_seq_length() if cache is not None else 0
        new_tokens = tokens[:, cached:]
        if new_tokens.size(1) == 0:
            raise ValueError("incremental decoding was handed no new token")
        module = self.model.base_model if base else self.model
        output = module(input_ids=new_tokens, use_cache=True, **{self._cache_argument: cache})
        self.set_incremental_state(incremental_state, "hf", {"cache": returned_cache(output)})
        return output

    def reorder_incremental_state(self, incremental_state: Dict[str, Dict[str, Optional[Tensor]]],
                                  new_order: Tensor):
        saved = self.get_incremental_state(incremental_state, "hf")
        if saved and saved.get("cache") is not None:
            saved["cache"] = reorder_cache(saved["cache"], new_order)

    # -- distributions -------------------------------------------------------

    def get_normalized_probs(self, net_output, log_probs: bool, sample=None):
        """Over the task's dictionary: the model's ``V`` columns and the padding column(s)."""
        logits = net_output[0].float()
        out = F.log_softmax(logits, dim=-1) if log_probs else F.softmax(logits, dim=-1)
        extra = len(self.dictionary) - out.size(-1)
        if extra > 0:
            out = F.pad(out, (0, extra), value=float("-inf") if log_probs else 0.0)
        return out

    def max_positions(self):
        return max_positions_of(self.model.config)
