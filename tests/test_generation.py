"""scalegrad.generation: the filter against the original, batched decoding against a plain loop."""

from __future__ import annotations

import pytest
import torch

from scalegrad.errors import UserError
from scalegrad.generation import generate_continuations, is_greedy, top_k_top_p_filtering
from tests.references import original_filter_one_row

VOCAB = 97


# -- references ---------------------------------------------------------------------

def greedy_without_cache(model, prefix, continuation_length):
    """One prefix, the whole sequence recomputed at every step, no cache."""
    tokens = prefix[None]
    with torch.no_grad():
        for _ in range(continuation_length):
            next_token = model(tokens).logits[:, -1].argmax(dim=-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
    return tokens[0]


@pytest.fixture(scope="module")
def model():
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=256,
                            bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def prefixes():
    generator = torch.Generator().manual_seed(7)
    return torch.randint(0, VOCAB, (5, 8), generator=generator)


class _Output(dict):
    def __getattr__(self, name):
        return self[name]


class BigramLM(torch.nn.Module):
    """A model whose next-token logits depend only on the last token: exact filters to check.

    It takes ``past_key_values`` (the older transformers name) and checks that only
    the new token is fed once a cache is given.
    """

    def __init__(self, vocab=VOCAB, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=generator) * 3)
        self.calls = []

    def forward(self, input_ids, past_key_values=None, use_cache=True):
        assert use_cache
        if past_key_values is not None:
            assert input_ids.size(1) == 1, "only the new token is fed after the first step"
            seen = past_key_values + 1
        else:
            seen = input_ids.size(1)
        self.calls.append((tuple(input_ids.shape), torch.is_inference_mode_enabled(), self.training))
        return _Output(logits=self.table[input_ids], past_key_values=seen)


# -- top_k_top_p_filtering ----------------------------------------------------------

def _logit_cases():
    generator = torch.Generator().manual_seed(0)
    yield "random", torch.randn(6, 50, generator=generator) * 2
    yield "ties", torch.randint(-3, 3, (6, 50), generator=generator).float()  # many equal logits
    peaked = torch.randn(4, 50, generator=generator)
    peaked[:, 3] = 30.0
    yield "peaked", peaked
    yield "flat", torch.zeros(3, 50)


@pytest.mark.parametrize("name, logits", list(_logit_cases()))
@pytest.mark.parametrize("top_k, top_p", [
    (0, 0.0), (1, 0.0), (5, 0.0), (50, 0.0), (80, 0.0), (0, 0.3), (0, 0.9), (0, 1.0),
    (10, 0.5), (3, 0.95), (1, 0.5), (-1, 0.0), (0, 0.02),
])
def test_filter_equals_the_original_row_by_row(name, logits, top_k, top_p):
    before = logits.clone()
    filtered = top_k_top_p_filtering(logits, top_k=top_k, top_p=top_p)
    assert torch.equal(logits, before), "the input must not be modified"
    expected = torch.stack([original_filter_one_row(row[None].clone(), top_k, top_p) for row in logits])
    assert torch.equal(filtered, expected)
    assert torch.isfinite(filtered).any(dim=-1).all(), "the most likely token is always kept"


def test_filter_value_and_shapes():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert top_k_top_p_filtering(logits, top_k=2, filter_value=-1e4).tolist() == [[-1e4, 3.0, 2.0, -1e4]]
    # softmax of [3, 2, 1, 0] ~ [.64, .24, .09, .03]: p=0.7 keeps the first two (first above kept)
    assert top_k_top_p_filtering(logits, top_p=0.7).tolist() == [[-float("inf"), 3.0, 2.0, -float("inf")]]
    with pytest.raises(ValueError):
        top_k_top_p_filtering(logits[0], top_k=2)


# -- greedy --------------------------------------------------------------------------

def test_greedy_batched_with_cache_equals_a_full_recompute_loop(model, prefixes):
    out = generate_continuations(model, prefixes, 20)
    assert out.shape == (prefixes.size(0), prefixes.size(1) + 20) and out.dtype == torch.int64
    assert torch.equal(out[:, : prefixes.size(1)], prefixes)
    for row, prefix in zip(out, prefixes):
        assert torch.equal(row, greedy_without_cache(model, prefix, 20))


def test_sub_batching_does_not_change_greedy_output(model, prefixes):
    full = generate_continuations(model, prefixes, 10)
    for batch_size in (1, 2, 5, 100):
        assert torch.equal(generate_continuations(model, prefixes, 10, batch_size=batch_size), full)


def test_sampling_with_top_k_1_is_greedy(model, prefixes):
    assert not is_greedy(1, 0.5) and is_greedy(1, 0.0) and not is_greedy(0, 0.0)
    greedy = generate_continuations(model, prefixes, 10)
    sampled = generate_continuations(model, prefixes, 10, top_k=1, top_p=0.5,
                                     generator=torch.Generator().manual_seed(3))
    assert torch.equal(sampled, greedy)


@pytest.mark.parametrize("mode", [True, False])
def test_model_mode_is_restored_and_inference_mode_used(mode):
    lm = BigramLM()
    lm.train(mode)
    prefixes = torch.randint(0, VOCAB, (4, 5))
    out = generate_continuations(lm, prefixes, 6, batch_size=3)
    assert lm.training is mode
    assert out.shape == (4, 11)
    assert [shape for shape, _, _ in lm.calls] == [(3, 5)] + [(3, 1)] * 5 + [(1, 5)] + [(1, 1)] * 5
    assert all(inference and not training for _, inference, training in lm.calls)
    # greedy on a bigram model: every next token is the argmax of the last one's row
    for row in out:
        for t in range(5, 11):
            assert row[t] == lm.table[row[t - 1]].argmax()


def test_tiny_model_dir_fixture_generates(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prefixes = torch.randint(0, model.config.vocab_size, (2, 50))
    out = generate_continuations(model, prefixes, 20, progress=True)
    assert out.shape == (2, 70)
    assert torch.equal(out[0], greedy_without_cache(model, prefixes[0], 20))


# -- sampling ------------------------------------------------------------------------

@pytest.mark.parametrize("top_k, top_p", [(5, 0.0), (0, 0.5), (10, 0.8), (0, 0.0), (200, 0.0)])
def test_sampling_is_reproducible_and_stays_in_the_filter(top_k, top_p):
    lm = BigramLM()
    prefixes = torch.randint(0, VOCAB, (16, 3), generator=torch.Generator().manual_seed(1))

    def sample(seed, **kwargs):
        return generate_continuations(lm, prefixes, 30, top_k=top_k, top_p=top_p,
                                      generator=torch.Generator().manual_seed(seed), **kwargs)

    first = sample(11)
    assert torch.equal(sample(11), first)
    assert not torch.equal(sample(12), first)
    allowed = torch.isfinite(top_k_top_p_filtering(lm.table.detach(), top_k=top_k, top_p=top_p))
    previous, chosen = first[:, 2:-1].flatten(), first[:, 3:].flatten()
    assert allowed[previous, chosen].all(), "a sampled token was outside the top-k/top-p set"
    if top_k == 5:
        assert len(set(zip(previous.tolist(), chosen.tolist()))) > len(set(previous.tolist()))


def test_sampling_follows_the_distribution():
    lm = BigramLM(vocab=4)
    with torch.no_grad():
        lm.table.zero_()
        lm.table[:, 1] = torch.log(torch.tensor(3.0))  # p = [1, 3, 1, 1] / 6
    prefixes = torch.zeros(3000, 1, dtype=torch.long)
    out = generate_continuations(lm, prefixes, 1, top_k=0, top_p=0.0,
                                 generator=torch.Generator().manual_seed(0))
    frequency = torch.bincount(out[:, 1], minlength=4).float() / 3000
    assert torch.allclose(frequency, torch.tensor([1, 3, 1, 1]) / 6.0, atol=0.03)


# -- edges ---------------------------------------------------------------------------

def test_zero_continuation_and_empty_batch(model, prefixes):
    assert torch.equal(generate_continuations(model, prefixes, 0), prefixes)
    assert generate_continuations(model, prefixes[:0], 5).shape == (0, 8)


@pytest.mark.parametrize("kwargs, words", [
    (dict(continuation_length=250), "exceeds the model's 256 positions"),
    (dict(continuation_length=-1), "continuation length"),
    (dict(continuation_length=5, top_k=-2), "top-k"),
    (dict(continuation_length=5, top_p=1.5), "top-p"),
    (dict(continuation_length=5, batch_size=0), "batch size"),
])
def test_bad_arguments_are_user_errors(model, prefixes, kwargs, words):
    with pytest.raises(UserError, match=words):
        generate_continuations(model, prefixes, **kwargs)
