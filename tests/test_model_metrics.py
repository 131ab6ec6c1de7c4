"""MAUVE and coherence (docs/metrics-2022.md) with tiny local models, offline:
features equal to mauve-text's own featurizer, MAUVE equal to mauve.compute_mauve,
coherence equal to a dense one-row re-derivation."""

import sys

import numpy as np
import pytest
import torch

from scalegrad.errors import UserError
from scalegrad.model_metrics import (cut_pairs, last_token_features, load_pretrained,
                                     logprob_coherence, mauve_score, simcse_coherence)
from tests import helpers


def corpus_texts(count, words):
    from pydoc_data.topics import topics

    tokens = " ".join(topics[k] for k in sorted(topics)[10:20]).split()
    return [" ".join(tokens[i * words:(i + 1) * words]) for i in range(count)]


@pytest.fixture(scope="module")
def featurizer_dir(tmp_path_factory, tiny_tokenizer):
    # mauve-text's own featurizer only accepts model names containing "gpt2".
    return helpers.save_tiny_model_dir(tiny_tokenizer, tmp_path_factory.mktemp("f") / "tiny-gpt2")


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory, tiny_tokenizer):
    from transformers import OPTConfig, OPTForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = OPTForCausalLM(OPTConfig(
            vocab_size=len(tiny_tokenizer), hidden_size=16, num_hidden_layers=2, ffn_dim=32,
            num_attention_heads=2, max_position_embeddings=600, word_embed_proj_dim=16,
            bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
            pad_token_id=tiny_tokenizer.eos_token_id))
    path = tmp_path_factory.mktemp("opt") / "tiny-opt"
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, tiny_tokenizer):
    from transformers import BertConfig, BertModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        model = BertModel(BertConfig(vocab_size=len(tiny_tokenizer), hidden_size=32,
                                     num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=200))
    path = tmp_path_factory.mktemp("bert") / "tiny-sup-simcse"
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


def test_features_equal_mauve_texts_own_featurizer(featurizer_dir):
    from mauve.utils import featurize_tokens_from_model
    from transformers import AutoModel

    model, tokenizer = load_pretrained(featurizer_dir, "featurizer")
    lists = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in corpus_texts(7, 9)]
    lists[2] = lists[2][:1]  # length 1
    lists[3] = [0] + lists[3][:5]  # token id 0, the padding id
    ours = last_token_features(model, lists, batch_size=3)
    theirs_model = AutoModel.from_pretrained(featurizer_dir).eval()
    theirs = featurize_tokens_from_model(theirs_model, [torch.tensor([x]) for x in lists],
                                         batch_size=1).numpy()
    assert ours.shape == (7, 32)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_cut_pairs_hand_counted(tiny_tokenizer):
    refs, gens = cut_pairs(tiny_tokenizer, ["one two three four", "", "x y"],
                           ["a b", "c d", "p q r s t u"], max_text_length=3)
    enc = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in
           ("one two three four", "a b", "x y", "p q r s t u")]
    m0 = min(len(enc[0]), len(enc[1]), 3)
    m2 = min(len(enc[2]), len(enc[3]), 3)
    assert refs == [enc[0][:m0], enc[2][:m2]]  # the empty reference's pair dropped
    assert gens == [enc[1][:m0], enc[3][:m2]]


def test_mauve_equals_mauve_compute_mauve_end_to_end(featurizer_dir):
    """Ours against mauve-text featurizing the same cut token ids with its own code
    (model loaded by mauve from the folder) and computing MAUVE."""
    import mauve

    refs = corpus_texts(40, 12)
    gens = corpus_texts(80, 7)[40:]
    gens[5] = "the the the the the the the"
    options = dict(max_text_length=9, mauve_scaling_factor=3.0, seed=7)
    ours = mauve_score(refs, gens, featurizer_dir, batch_size=4, **options)
    _, tokenizer = load_pretrained(featurizer_dir, "featurizer")
    p_ids, q_ids = cut_pairs(tokenizer, refs, gens, options["max_text_length"])
    theirs = mauve.compute_mauve(
        p_tokens=[torch.tensor([x]) for x in p_ids], q_tokens=[torch.tensor([x]) for x in q_ids],
        featurize_model_name=featurizer_dir, batch_size=4, verbose=False,
        mauve_scaling_factor=3.0, seed=7, max_text_length=9).mauve
    assert ours == pytest.approx(theirs, abs=1e-9)
    assert 0 < ours < 1


def test_mauve_equals_compute_mauve_on_our_features_and_is_one_for_equal_sets(featurizer_dir):
    import mauve

    refs, gens = corpus_texts(30, 10), corpus_texts(60, 10)[30:]
    model, tokenizer = load_pretrained(featurizer_dir, "featurizer")
    p_ids, q_ids = cut_pairs(tokenizer, refs, gens, 200)
    p, q = last_token_features(model, p_ids), last_token_features(model, q_ids)
    theirs = mauve.compute_mauve(p_features=p, q_features=q, verbose=False).mauve
    assert mauve_score(refs, gens, featurizer_dir) == pytest.approx(theirs, abs=1e-9)
    assert mauve_score(refs, refs, featurizer_dir) == pytest.approx(1.0)


def dense_coherence(model_dir, prefixes, continuations):
    """Per pair one forward pass of bos + prefix + continuation; log of the softmax
    probability of each continuation token, in float64; means."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    scores = []
    for prefix, continuation in zip(prefixes, continuations):
        if not continuation.split():
            continue
        context = [tokenizer.bos_token_id] + tokenizer(prefix, add_special_tokens=False)["input_ids"]
        target = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([context + target])).logits[0].double()
        logps = []
        for j, token in enumerate(target):
            probs = torch.softmax(logits[len(context) + j - 1], dim=-1)
            logps.append(float(torch.log(probs[token])))
        scores.append(sum(logps) / len(logps))
    return sum(scores) / len(scores)


@pytest.mark.parametrize("which", ["gpt2", "opt"])
def test_logprob_coherence_equals_dense(which, featurizer_dir, opt_dir):
    model_dir = featurizer_dir if which == "gpt2" else opt_dir
    prefixes = corpus_texts(9, 11)
    continuations = corpus_texts(18, 5)[9:]
    continuations[1] = "   "  # skipped, as Su and Collier's script
    continuations[4] = "x"  # one token
    prefixes[6] = ""  # bos alone
    ours = logprob_coherence(prefixes, continuations, model_dir, batch_size=4)
    assert ours == pytest.approx(dense_coherence(model_dir, prefixes, continuations), abs=1e-5)


def test_simcse_coherence_equals_dense(bert_dir, tiny_tokenizer):
    from transformers import AutoModel

    prefixes = corpus_texts(6, 30)
    continuations = corpus_texts(12, 4)[6:]
    continuations[2] = ""
    prefixes[0] = " ".join(corpus_texts(1, 300))  # longer than 128 tokens: cut
    ours = simcse_coherence(prefixes, continuations, bert_dir, batch_size=4)
    model = AutoModel.from_pretrained(bert_dir).eval()
    cosines = []
    for a, b in zip(prefixes, continuations):
        with torch.no_grad():
            ea = model(**tiny_tokenizer(a, truncation=True, max_length=128,
                                        return_tensors="pt")).pooler_output[0]
            eb = model(**tiny_tokenizer(b, truncation=True, max_length=128,
                                        return_tensors="pt")).pooler_output[0] if b else None
        if eb is None:  # an empty text: the padded row of a batch, mask all zero
            eb = model(input_ids=torch.tensor([[tiny_tokenizer.eos_token_id]]),
                       attention_mask=torch.tensor([[0]])).pooler_output[0].detach()
        cosines.append(float(torch.nn.functional.cosine_similarity(ea, eb, dim=0)))
    assert ours == pytest.approx(sum(cosines) / len(cosines), abs=1e-5)
    before = simcse_coherence(prefixes, continuations, bert_dir, pooler="cls_before_pooler")
    assert before != pytest.approx(ours)


def test_featurizer_not_found_locally(tmp_path, monkeypatch):
    from huggingface_hub import constants

    with pytest.raises(UserError, match=r"featurizer .*nope: not found locally"):
        mauve_score(["a b", "c d"], ["e f", "g h"], str(tmp_path / "nope"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"featurizer no-such-org/no-such-lm: not found locally"):
        mauve_score(["a b", "c d"], ["e f", "g h"], "no-such-org/no-such-lm")


def test_mauve_without_the_extra(monkeypatch, featurizer_dir):
    monkeypatch.setitem(sys.modules, "mauve", None)
    with pytest.raises(UserError, match=r"eval extra .*scalegrad\[eval\]"):
        mauve_score(["a b", "c d"], ["e f", "g h"], featurizer_dir)


def test_mauve_needs_two_texts(featurizer_dir):
    with pytest.raises(UserError, match="at least 2 non-empty generations"):
        mauve_score(["a b c", "d e"], ["f g", ""], featurizer_dir)
