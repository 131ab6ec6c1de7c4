"""Continuing prefixes with a fairseq language model, as the original evaluation
script did (``docs/reference.md``, fairseq evaluation): greedy, top-k and
nucleus sampling over the model's incremental decoder, batched; beam search
through fairseq's ``SequenceGenerator``.

Greedy / sampling (the original's ``generate_completion``):

* greedy when ``top_k == 1 and top_p == 0``, with the padding logit set to
  ``-inf`` first;
* ``top_k > 1``: the padding logit set to ``-1e10``, the logits outside the top
  k removed, a draw from the softmax (``top_p`` is then not used, as in the
  original);
* otherwise nucleus sampling over the smallest set of sorted tokens whose
  probability mass reaches ``top_p``.

The filters are :func:`scalegrad.generation.top_k_top_p_filtering` (one home
for them); the original set removed logits to ``-1e5`` rather than ``-inf``,
which gives the same probabilities in float32, and kept a nucleus token when
the mass before it is ``< p`` where the shared filter keeps it when it is
``<= p`` (they differ only when that mass equals ``p`` exactly). Draws come from
a ``torch.Generator`` seeded by ``--seed``.

Contrastive search (``--penalty-alpha A`` with ``--topk K > 1``;
``docs/contrastive-search.md``): :func:`contrastive_continuations`, the core's
per-step loop (:func:`scalegrad.contrastive_decoding.contrastive_steps`) over the model's
decoder: the final hidden states are the decoder's features (``features_only``,
the input of its output projection), the K candidates of each row are fed on
copies of the row's incremental state (fairseq's
``reorder_incremental_state_scripting``, as beam search reorders it), and the
padding id is never a candidate.

Beam search: fairseq's generator always starts a hypothesis with a
beginning-of-sequence token. Here that position holds each prefix's first id
(the prefix's other ids are forced as fairseq's ``prefix_tokens``), so the model
reads exactly the prefix, as in greedy decoding; beam size 1 then gives the
greedy continuations. (The original put id 0 there and forced the whole
prefix.) The end-of-sequence id is banned until the continuation has its full
length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..contrastive_decoding import CandidatesByReorder, check_contrastive, contrastive_steps
from ..generation import is_greedy, top_k_top_p_filtering


def next_tokens(logits: torch.Tensor, *, top_k: int, top_p: float, pad: int | None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """``(B, 1)`` next ids from ``(B, V)`` logits by the original's rule (see the
    module doc). ``pad`` outside the logits (a ``gpt2_pretrained`` model) is skipped."""
    logits = logits.float().clone()
    has_pad = pad is not None and 0 <= pad < logits.size(-1)
    if is_greedy(top_k, top_p):
        if has_pad:
            logits[:, pad] = -float("inf")
        return logits.argmax(dim=-1, keepdim=True)
    if top_k > 1:
        if has_pad:
            logits[:, pad] = -1e10
        filtered = top_k_top_p_filtering(logits, top_k=top_k)
    else:
        filtered = top_k_top_p_filtering(logits, top_p=top_p)
    probs = F.softmax(filtered, dim=-1)
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator)


def _is_incremental(model) -> bool:
    from fairseq.models import FairseqIncrementalDecoder

    return isinstance(getattr(model, "decoder", None), FairseqIncrementalDecoder)


@torch.no_grad()
def continue_prefixes(model, prefixes: torch.Tensor, length: int, *, top_k: int = 1,
                      top_p: float = 0.0, pad: int | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """``(B, length)`` continuation of ``prefixes`` ``(B, P)``, the whole batch at
    once, with the decoder's incremental state (its key/value cache) when it
    has one: the prefix is read one position at a time, as fairseq's
    incremental decoders only take the newest position."""
    incremental = _is_incremental(model)
    state = {} if incremental else None
    if incremental:
        for step in range(1, prefixes.size(1)):
            model(prefixes[:, :step], incremental_state=state)
    tokens = prefixes
    generated = []
    for _ in range(length):
        net_output = model(tokens, incremental_state=state) if incremental else model(tokens)
        token = next_tokens(net_output[0][:, -1, :], top_k=top_k, top_p=top_p, pad=pad,
                            generator=generator)
        generated.append(token)
        tokens = torch.cat((tokens, token), dim=1)
    if not generated:
        return prefixes.new_zeros(prefixes.size(0), 0)
    return torch.cat(generated, dim=1)


@torch.no_grad()
def contrastive_continuations(model, prefixes: torch.Tensor, length: int, *, penalty_alpha: float,
                              top_k: int, pad: int | None = None) -> torch.Tensor:
    """``(B, length)`` contrastive-search continuation of ``prefixes`` ``(B, P)``, the
    whole batch at once (see the module doc)."""
    check_contrastive(penalty_alpha, top_k)
    if length == 0:
        return prefixes.new_zeros(prefixes.size(0), 0)
    stepper = FairseqStepper(model)
    logits, context, _ = stepper.start(prefixes)
    return contrastive_steps(stepper, logits, context, None, length, penalty_alpha=penalty_alpha,
                             top_k=top_k, banned_token=pad)


class FairseqStepper(CandidatesByReorder):
    """A fairseq language model's state during contrastive search: the ids so far and
    the decoder's incremental state (:func:`scalegrad.contrastive_decoding.contrastive_steps`)."""

    def __init__(self, model):
        self.model = model
        decoder = getattr(model, "decoder", None)
        if getattr(decoder, "adaptive_softmax", None) is not None \
                or not callable(getattr(decoder, "output_layer", None)):
            raise UserError("contrastive search (--penalty-alpha) needs a decoder whose logits "
                            "are its output layer applied to its features; this model's "
                            "decoder has an adaptive softmax or no output layer")
        self.decoder = decoder
        self.state = {} if _is_incremental(model) else None
        self.tokens = None
        self.last = None  # the features after the last token fed, per row

    def _features(self, tokens: torch.Tensor) -> torch.Tensor:
        try:
            if self.state is None:
                features, _ = self.model(tokens, features_only=True)
            else:
                features, _ = self.model(tokens, incremental_state=self.state, features_only=True)
        except TypeError as exc:
            raise UserError(f"contrastive search (--penalty-alpha) needs the decoder's features "
                            f"(features_only=True), which this model does not give ({exc})") from None
        return features

    def start(self, prefixes: torch.Tensor):
        self.tokens = prefixes
        if self.state is None:
            hidden = self._features(prefixes)
        else:  # an incremental decoder takes the newest position only
            hidden = torch.cat([self._features(prefixes[:, :step])[:, -1:]
                                for step in range(1, prefixes.size(1) + 1)], dim=1)
        return self.decoder.output_layer(hidden[:, -1]), hidden, None

    def reorder(self, rows: torch.Tensor) -> None:
        self.tokens = self.tokens[rows]
        if self.last is not None:
            self.last = self.last[rows]
        if self.state is not None:
            self.decoder.reorder_incremental_state_scripting(self.state, rows)

    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens = torch.cat([self.tokens, tokens], dim=1)
        self.last = self._features(self.tokens)[:, -1]
        return self.last

    def next_logits(self) -> torch.Tensor:
        """The output layer on the features of the rows held (the chosen candidates)."""
        return self.decoder.output_layer(self.last)


@torch.no_grad()
def beam_continuations(model, dictionary, prefixes: torch.Tensor, length: int, *, beam_size: int,
                       ngram_block: int = 0, eos: int | None = None) -> list[list[int]]:
    """The best beam's ``length`` ids after each prefix (fairseq's
    ``SequenceGenerator``; see the module doc). ``eos`` defaults to the
    dictionary's."""
    from fairseq.sequence_generator import SequenceGenerator

    eos = dictionary.eos() if eos is None else eos
    prefix_length = prefixes.size(1)
    steps = prefix_length - 1 + length  # forced prefix ids + the continuation
    generator = SequenceGenerator(
        [model], dictionary, beam_size=beam_size, max_len_a=0, max_len_b=steps,
        max_len=prefix_length + length, min_len=steps, no_repeat_ngram_size=ngram_block, eos=eos)
    if generator.repeat_ngram_blocker is not None:
        generator.repeat_ngram_blocker = _ContinuationNgramBlock(generator.repeat_ngram_blocker,
                                                                 first_step=prefix_length - 1)
    sample = {"net_input": {"src_tokens": prefixes,
                            "src_lengths": torch.full((prefixes.size(0),), prefix_length,
                                                      dtype=torch.long, device=prefixes.device)}}
    hypotheses = generator.generate(
        [model], sample, prefix_tokens=prefixes[:, 1:],
        # One first id per row (fairseq takes a single int; a tensor fills the column).
        bos_token=prefixes[:, 0].repeat_interleave(beam_size))
    continuations = []
    for row, hypos in zip(prefixes.tolist(), hypotheses):
        best = hypos[0]["tokens"].tolist()
        if best[:prefix_length - 1] != row[1:]:
            raise RuntimeError("fairseq's beam search did not keep the prefix")
        continuations.append(best[prefix_length - 1:prefix_length - 1 + length])
    return continuations


class _ContinuationNgramBlock(torch.nn.Module):
    """fairseq's n-gram blocker, applied only where the continuation is generated.

    fairseq blocks after forcing the prefix tokens, so a prefix that itself repeats
    an n-gram would have its forced token banned (every candidate at ``-inf``).
    The n-grams of the prefix still count: a continuation never repeats them.
    fairseq's CPU fallback (used without its CUDA extension) reads the last
    ``n - 1`` entries of the whole token buffer, which are padding, so it never
    blocks anything; it is handed the tokens generated so far instead.
    """

    def __init__(self, blocker, first_step: int):
        super().__init__()
        self.blocker = blocker
        self.first_step = first_step

    def forward(self, tokens, lprobs, bsz: int, beam_size: int, step: int):
        if step < self.first_step:
            return lprobs
        if not getattr(self.blocker, "use_extension", False):
            tokens = tokens[:, :step + 1]
        return self.blocker(tokens, lprobs, bsz, beam_size, step)
