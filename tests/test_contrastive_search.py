"""Contrastive search (docs/contrastive-search.md): one step against SimCTG's
``ranking_fast``, the batched, cached loop against a plain full-recompute loop
written here, rows of different lengths (left and right padding) against one-row
runs, ``penalty_alpha = 0`` against greedy decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scalegrad.errors import UserError
from scalegrad.generation import (contrastive_scores, contrastive_search, generate_continuations)
from scalegrad.hf import reorder_cache
from tests.helpers import build_tiny_model

VOCAB = 97


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(VOCAB, seed=3, n_positions=128)


@pytest.fixture(scope="module")
def prefixes():
    ids = torch.randint(0, VOCAB, (6, 9), generator=torch.Generator().manual_seed(5))
    ids[0, :4] = 0  # token id 0, repeated
    ids[1] = torch.tensor([4, 4, 4, 4, 4, 4, 4, 4, 4])  # one token repeated
    return ids


# -- references ---------------------------------------------------------------------

def plain_contrastive(model, prefix: list[int], length: int, alpha: float, k: int) -> list[int]:
    """One row, everything recomputed from the ids at every step, no cache: the K
    most probable next ids, each appended and run through the model for its final
    hidden state, scored (1 - alpha) p - alpha max_j cos(h_v, h_j), best taken."""
    ids = list(prefix)
    with torch.no_grad():
        for _ in range(length):
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
            context = out.hidden_states[-1][0]  # (S, E)
            probs = F.softmax(out.logits[0, -1].float(), dim=-1)
            best, best_score = None, None
            for v in torch.topk(probs, k).indices.tolist():
                h = model(input_ids=torch.tensor([ids + [v]]),
                          output_hidden_states=True).hidden_states[-1][0, -1]
                penalty = max(float(F.cosine_similarity(h, c, dim=0, eps=0)) for c in context)
                score = (1 - alpha) * float(probs[v]) - alpha * penalty
                if best_score is None or score > best_score:
                    best, best_score = v, score
            ids.append(best)
    return ids[len(prefix):]


# -- one step: SimCTG's ranking_fast -------------------------------------------------

@pytest.mark.parametrize("alpha", [0.0, 0.4, 0.6, 1.0])
def test_one_step_equals_simctg_ranking_fast(alpha):
    import simctg.utlisgpt as utlisgpt  # the oracle: pip install --no-deps simctg==0.7 (setup_env.sh)
    g = torch.Generator().manual_seed(0)
    B, K, S, E = 7, 5, 11, 16
    context = torch.randn(B, S, E, generator=g)
    candidates = torch.randn(B, K, E, generator=g)
    candidates[0, 2] = context[0, 3]  # a candidate equal to a previous state: cosine 1
    candidates[1] = candidates[1, :1]  # equal candidates (a tie between them)
    probs = torch.softmax(torch.randn(B, K, generator=g), dim=-1)
    scores = contrastive_scores(context, None, candidates, probs, alpha)
    expected = utlisgpt.ranking_fast(
        context.unsqueeze(1).expand(-1, K, -1, -1).reshape(B * K, S, E),
        candidates.reshape(B * K, 1, E), probs, alpha, K)
    assert torch.equal(scores.argmax(dim=-1), expected)
    # the scores themselves, by hand
    for b in range(B):
        for j in range(K):
            cos = max(float(F.cosine_similarity(candidates[b, j], c, dim=0, eps=0)) for c in context[b])
            assert float(scores[b, j]) == pytest.approx((1 - alpha) * float(probs[b, j]) - alpha * cos,
                                                        abs=1e-6)


def test_padding_takes_no_part_in_the_penalty():
    import simctg.utlisgpt as utlisgpt
    g = torch.Generator().manual_seed(1)
    B, K, S, E = 4, 3, 6, 8
    context = torch.randn(B, S, E, generator=g)
    candidates = torch.randn(B, K, E, generator=g)
    probs = torch.softmax(torch.randn(B, K, generator=g), dim=-1)
    lengths = [6, 1, 3, 5]
    mask = torch.zeros(B, S, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, S - n:] = True  # left padding
        context[b, :S - n] = candidates[b, 0]  # padding that would give cosine 1
    scores = contrastive_scores(context, mask, candidates, probs, 0.7)
    for b, n in enumerate(lengths):
        row = contrastive_scores(context[b:b + 1, S - n:], None, candidates[b:b + 1], probs[b:b + 1], 0.7)
        assert torch.equal(scores[b], row[0])
        expected = utlisgpt.ranking_fast(context[b, S - n:].expand(K, -1, -1), candidates[b][:, None],
                                         probs[b:b + 1], 0.7, K)
        assert int(scores[b].argmax()) == int(expected[0])


# -- the batched loop ---------------------------------------------------------------

@pytest.mark.parametrize("alpha, k", [(0.6, 4), (0.3, 2), (1.0, 6)])
def test_batched_rows_equal_the_plain_loop(model, prefixes, alpha, k):
    out = contrastive_search(model, prefixes, 10, penalty_alpha=alpha, top_k=k)
    assert out.shape == (6, 10) and out.dtype == torch.int64
    for row, prefix in zip(out.tolist(), prefixes.tolist()):
        assert row == plain_contrastive(model, prefix, 10, alpha, k)


def test_rows_of_different_lengths_left_or_right_padded(model, prefixes):
    lengths = [9, 1, 4, 7, 2, 9]  # a length-1 prefix among them
    right = torch.zeros(6, 9, dtype=torch.long)
    left = torch.zeros(6, 9, dtype=torch.long)
    for i, n in enumerate(lengths):
        right[i, :n] = 1
        left[i, 9 - n:] = 1
    right_ids = prefixes.masked_fill(right == 0, 13)
    left_ids = torch.full_like(prefixes, 21)
    for i, n in enumerate(lengths):
        left_ids[i, 9 - n:] = prefixes[i, :n]
    from_right = contrastive_search(model, right_ids, 8, penalty_alpha=0.6, top_k=5,
                                    attention_mask=right)
    from_left = contrastive_search(model, left_ids, 8, penalty_alpha=0.6, top_k=5,
                                   attention_mask=left, batch_size=4)
    for i, n in enumerate(lengths):
        alone = contrastive_search(model, prefixes[i:i + 1, :n], 8, penalty_alpha=0.6, top_k=5)
        plain = plain_contrastive(model, prefixes[i, :n].tolist(), 8, 0.6, 5)
        assert alone[0].tolist() == plain
        assert from_right[i].tolist() == plain, i
        assert from_left[i].tolist() == plain, i


def test_alpha_zero_is_greedy(model, prefixes):
    greedy = generate_continuations(model, prefixes, 12)[:, prefixes.size(1):]
    for k in (2, 7):
        assert torch.equal(contrastive_search(model, prefixes, 12, penalty_alpha=0.0, top_k=k), greedy)


def test_generate_continuations_dispatches_and_batch_size_does_not_matter(model, prefixes):
    full = generate_continuations(model, prefixes, 9, top_k=3, penalty_alpha=0.5)
    assert torch.equal(full[:, :9], prefixes)
    assert torch.equal(full[:, 9:], contrastive_search(model, prefixes, 9, penalty_alpha=0.5, top_k=3))
    for batch_size in (1, 4, 100):
        assert torch.equal(generate_continuations(model, prefixes, 9, top_k=3, penalty_alpha=0.5,
                                                  batch_size=batch_size), full)


def test_penalty_changes_the_output_and_top_k_beyond_the_vocabulary(model, prefixes):
    greedy = contrastive_search(model, prefixes, 15, penalty_alpha=0.0, top_k=4)
    contrastive = contrastive_search(model, prefixes, 15, penalty_alpha=0.9, top_k=4)
    assert not torch.equal(greedy, contrastive)
    everything = contrastive_search(model, prefixes[:2], 3, penalty_alpha=0.5, top_k=500)
    assert everything[0].tolist() == plain_contrastive(model, prefixes[0].tolist(), 3, 0.5, VOCAB)


@pytest.mark.parametrize("mode", [True, False])
def test_model_mode_restored_and_edges(model, prefixes, mode):
    model.train(mode)
    try:
        assert contrastive_search(model, prefixes, 0, penalty_alpha=0.5, top_k=3).shape == (6, 0)
        assert contrastive_search(model, prefixes[:0], 4, penalty_alpha=0.5, top_k=3).shape == (0, 4)
        out = contrastive_search(model, prefixes[:2], 4, penalty_alpha=0.5, top_k=3)
        assert model.training is mode
    finally:
        model.eval()
    assert out.tolist() == contrastive_search(model, prefixes[:2], 4, penalty_alpha=0.5, top_k=3).tolist()


@pytest.mark.parametrize("kwargs, words", [
    (dict(penalty_alpha=1.5, top_k=4), "--penalty-alpha must be between 0 and 1"),
    (dict(penalty_alpha=-0.1, top_k=4), "--penalty-alpha must be between 0 and 1"),
    (dict(penalty_alpha=float("nan"), top_k=4), "--penalty-alpha must be between 0 and 1"),
    (dict(penalty_alpha=0.5, top_k=1), "needs --top-k K > 1"),
    (dict(penalty_alpha=0.5, top_k=0), "needs --top-k K > 1"),
    (dict(penalty_alpha=0.5, top_k=4, top_p=0.9), "takes no --top-p"),
    (dict(penalty_alpha=0.5, top_k=4, batch_size=0), "batch size"),
])
def test_bad_settings(model, prefixes, kwargs, words):
    with pytest.raises(UserError, match=words):
        contrastive_search(model, prefixes, 4, **kwargs)


def test_too_long_and_empty_rows(model, prefixes):
    with pytest.raises(UserError, match="exceeds the model's 128 positions"):
        contrastive_search(model, prefixes, 120, penalty_alpha=0.5, top_k=3)
    mask = torch.ones_like(prefixes)
    mask[2] = 0
    with pytest.raises(UserError, match="at least one token"):
        contrastive_search(model, prefixes, 4, penalty_alpha=0.5, top_k=3, attention_mask=mask)


def test_reorder_cache_repeats_and_picks_rows(model, prefixes):
    from scalegrad.hf import cache_argument, returned_cache

    with torch.no_grad():
        cache = returned_cache(model(input_ids=prefixes[:3], use_cache=True))
        keys = [layer.keys.clone() for layer in cache.layers]
        rows = torch.tensor([2, 2, 0, 1])
        cache = reorder_cache(cache, rows)
        for before, layer in zip(keys, cache.layers):
            assert torch.equal(layer.keys, before[rows])
        # the reordered cache continues rows as if they had been computed so
        out = model(input_ids=torch.tensor([[5], [6], [7], [8]]), use_cache=True,
                    **{cache_argument(model): cache}).logits[:, -1]
        full = model(input_ids=torch.cat([prefixes[rows], torch.tensor([[5], [6], [7], [8]])], 1)).logits[:, -1]
    assert torch.allclose(out, full, atol=1e-5)
    legacy = ((torch.arange(6.).view(3, 2), torch.arange(3.).view(3, 1)),)
    picked = reorder_cache(legacy, torch.tensor([1, 1]))
    assert picked[0][0].tolist() == [[2.0, 3.0], [2.0, 3.0]] and picked[0][1].tolist() == [[1.0], [1.0]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu(model, prefixes):
    cpu = contrastive_search(model, prefixes, 6, penalty_alpha=0.6, top_k=4)
    cuda_model = build_tiny_model(VOCAB, seed=3, n_positions=128).cuda()
    cuda = contrastive_search(cuda_model, prefixes.cuda(), 6, penalty_alpha=0.6, top_k=4)
    assert cuda.device.type == "cuda" and cuda.cpu().tolist() == cpu.tolist()


def test_a_model_whose_logits_are_not_its_head_output():
    """Cohere scales its logits (logit_scale): the candidates then go through the whole
    model, and the result still equals the plain loop."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from scalegrad.generation import HFStepper

    config = AutoConfig.for_model("cohere", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                  max_position_embeddings=64, logit_scale=0.5, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cohere = AutoModelForCausalLM.from_config(config).eval()
    prefixes = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(2))
    stepper = HFStepper(cohere)
    with torch.inference_mode():
        stepper.start(prefixes)
    assert stepper.head is None  # the fallback path
    out = contrastive_search(cohere, prefixes, 6, penalty_alpha=0.6, top_k=3)
    for row, prefix in zip(out.tolist(), prefixes.tolist()):
        assert row == plain_contrastive(cohere, prefix, 6, 0.6, 3)


def test_gpt2_candidates_skip_the_vocabulary_projection(model, prefixes):
    from scalegrad.generation import HFStepper

    stepper = HFStepper(model)
    with torch.inference_mode():
        stepper.start(prefixes)
    assert stepper.head is model.lm_head


# -- the tree candidates (K tokens at one position under a 4D mask) ------------------

def _steps(model, ids, mask, length, alpha, k, tree):
    from scalegrad.generation import HFStepper, contrastive_steps
    from scalegrad.prefix_batches import left_aligned as _left_aligned

    stepper = HFStepper(model, tree=tree)
    with torch.inference_mode():
        if mask is not None:
            ids, mask = _left_aligned(ids, mask.bool())
        logits, context, context_mask = stepper.start(ids, mask)
        out = contrastive_steps(stepper, logits, context, context_mask, length,
                                penalty_alpha=alpha, top_k=k)
    return out, stepper


def _tiny(model_type, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).eval()


def test_tree_candidates_equal_copied_caches(model, prefixes):
    """The default way (tree) and the copied caches give the same continuations, padded
    rows included, and the tree way leaves the unchosen candidates masked in the cache."""
    from scalegrad.generation import tree_candidates_work

    assert tree_candidates_work(model)
    mask = torch.ones_like(prefixes)
    mask[2, :5] = 0
    mask[4, :8] = 0  # a length-1 prefix
    tree, stepper = _steps(model, prefixes, mask, 7, 0.6, 4, tree=True)
    copied, copied_stepper = _steps(model, prefixes, mask, 7, 0.6, 4, tree=False)
    assert stepper.tree and not copied_stepper.tree
    assert torch.equal(tree, copied)
    # 9 prefix positions + 6 steps of 4 candidates (the 7th step keeps none): 1 visible each
    assert stepper.visible.shape == (6, 9 + 6 * 4)
    assert stepper.visible.sum(dim=1).tolist() == [int(m) + 6 for m in mask.sum(dim=1)]


def test_tree_candidates_with_rotary_positions_and_grouped_heads(prefixes):
    """Llama (rotary position ids, grouped key/value heads): the tree way is used, and
    padded rows equal the plain loop."""
    from scalegrad.generation import tree_candidates_work

    llama = _tiny("llama")
    assert tree_candidates_work(llama)
    mask = torch.ones_like(prefixes[:3])
    mask[1, :6] = 0
    out = contrastive_search(llama, prefixes[:3], 6, penalty_alpha=0.6, top_k=3, attention_mask=mask)
    for i in range(3):
        row = prefixes[i][mask[i].bool()].tolist()
        assert out[i].tolist() == plain_contrastive(llama, row, 6, 0.6, 3), i


def test_models_the_tree_way_does_not_fit_fall_back_to_copied_caches(prefixes):
    """A sliding-window model, and a model that drops the attention mask: the check says
    no, the copied caches are used, and the continuations still equal the plain loop."""
    from transformers import GPT2LMHeadModel

    from scalegrad.generation import tree_candidates_work

    class DropsTheMask(GPT2LMHeadModel):
        def forward(self, *args, attention_mask=None, **kwargs):
            return super().forward(*args, **kwargs)

    mistral = _tiny("mistral", sliding_window=4)
    dropping = DropsTheMask(build_tiny_model(VOCAB, seed=3, n_positions=128).config).eval()
    for other in (mistral, dropping):
        assert not tree_candidates_work(other)
        out, stepper = _steps(other, prefixes[:2], None, 5, 0.6, 3, tree=None)
        assert not stepper.tree
        for i in range(2):
            assert out[i].tolist() == plain_contrastive(other, prefixes[i].tolist(), 5, 0.6, 3), i
