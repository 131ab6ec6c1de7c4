import json
import math
from pathlib import Path

import pytest
import torch

from scalegrad.metrics import (
    RANKING_METRIC_NAMES,
    CompletionMetrics,
    NgramMetrics,
    aggregate_ranking_metrics,
    ngram_metrics,
    ranking_metrics,
    repeat_at_1,
    split_words,
    text_continuation_words,
)
from tests.references import dense_pct_repeat, dense_ranking_metrics

GOLDEN = json.loads((Path(__file__).parent / "data" / "original_outputs.json").read_text())


@pytest.mark.parametrize("case", range(len(GOLDEN["ranking"])))
def test_ranking_matches_original_outputs(case):
    entry = GOLDEN["ranking"][case]
    ours = ranking_metrics(torch.tensor(entry["logits"]), torch.tensor(entry["targets"]))
    assert ours == entry["ranking_metrics"]


@pytest.mark.parametrize("case", range(len(GOLDEN["ngram"])))
def test_ngrams_match_original_outputs(case):
    entry = GOLDEN["ngram"][case]
    ours = ngram_metrics(entry["tokens"], pad=entry["pad"])
    assert ours == pytest.approx(entry["ngram_metrics"], abs=1e-12)


@pytest.mark.parametrize("seed,time,vocab", [(0, 40, 6), (1, 700, 9), (2, 33, 50), (3, 1, 4), (4, 2, 3)])
def test_ranking_equals_dense_count(seed, time, vocab):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(time, vocab, generator=g)
    logits[::5, 0] = logits[::5, 1]  # ties: never counted as "greater"
    targets = torch.randint(0, vocab, (time,), generator=g)
    targets[::4] = 0  # token id 0
    assert ranking_metrics(logits, targets) == dense_ranking_metrics(logits, targets)


def test_repeat_at_1_hand_counted():
    # targets y = [3, 1, 3, 2]; predictions (argmax) = [3, 3, 1, 2]
    targets = torch.tensor([3, 1, 3, 2])
    logits = torch.nn.functional.one_hot(torch.tensor([3, 3, 1, 2]), 4).float()
    # t=0: window [] -> nothing. t=1: window [3]: pred 3 in -> repeat, wrong (3 != 1).
    # t=2: window [3,1]: pred 1 in -> repeat, wrong; target 3 in -> human.
    # t=3: window [3,1,3]: pred 2 not in; target 2 not in.
    assert repeat_at_1(logits, targets, 16) == (2, 2, 1)
    # Window of 1: t=1 [3] -> rep, wrong; t=2 [1] -> rep, wrong (pred 1), human no; t=3 [3] no.
    assert repeat_at_1(logits, targets, 1) == (2, 2, 0)


def test_median_is_lower_middle_for_even_counts():
    # ranks 0, 1, 2, 3 -> torch.median gives 1 (not 1.5)
    logits = torch.tensor([[4.0, 3, 2, 1]] * 4)
    targets = torch.tensor([0, 1, 2, 3])
    assert ranking_metrics(logits, targets)["median_target_rank"] == 1.0


def test_aggregate_as_original():
    logs = [
        {"loss": 10.0, "ntokens": 5, "sample_size": 5, "normalizer": 5, "median_target_rank": 2.0,
         "target_rank": 7.0, "hits_at_1": 1.0},
        {"loss": 6.0, "ntokens": 3, "sample_size": 3, "normalizer": 3, "median_target_rank": 5.0,
         "target_rank": 1.0, "hits_at_1": 2.0},
    ]
    agg = aggregate_ranking_metrics(logs)
    assert agg["loss"] == pytest.approx(16 / 8 / math.log(2))
    assert agg["median_target_rank"] == 3.5  # mean of chunk medians
    assert agg["target_rank"] == 1.0
    assert agg["hits_at_1"] == pytest.approx(3 / 8)
    assert set(RANKING_METRIC_NAMES) <= set(agg)
    assert "nll_loss" not in agg
    assert aggregate_ranking_metrics([dict(logs[0], sample_size=1)])["nll_loss"] == pytest.approx(
        10 / 5 / math.log(2))


@pytest.mark.parametrize("seed", range(5))
def test_ngram_metrics_equal_hand_count(seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 4, (25,), generator=g).tolist()
    ours = ngram_metrics(tokens, pad=3)
    for n in range(1, 5):
        assert ours[f"pct_repeat_{n}grams"] == pytest.approx(dense_pct_repeat(tokens, n, pad=3))


def test_ngram_short_list_has_no_repeats():
    assert ngram_metrics([5, 6], pad=-1) == {
        "pct_repeat_1grams": 0.0, "pct_repeat_2grams": 0.0,
        "pct_repeat_3grams": 0.0, "pct_repeat_4grams": 0.0}


def test_ngram_report_means_and_rounds():
    m = NgramMetrics(pad=-1)
    m.update([[1, 1, 1], [1, 2, 3]])
    assert m.report("bpe_valid")["bpe_valid/pct_repeat_1grams"] == round((2 / 3 + 0) / 2, 4)
    assert len(m) == 2


def test_split_words():
    assert split_words("Hello, world!\nIt's 3.5") == ["Hello", ",", "world", "!", "\n", "It", "'", "s", "3", ".", "5"]


def test_text_continuation_and_completion_metrics(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    prefix = tok.encode(" the cat sat on the mat")
    continuation = tok.encode(" and the cat sat on the mat and the cat sat")
    completion = prefix + continuation
    words = text_continuation_words(tok, completion, len(prefix))
    assert words == split_words(" and the cat sat on the mat and the cat sat".replace(" the cat sat on the mat", ""))
    metrics = CompletionMetrics(tok, len(prefix))
    metrics.update([completion, prefix + tok.encode(" x")])
    report = metrics.report("test")
    assert report["bpe_metrics"]["bpe_test/pct_repeat_1grams"] == round(
        (dense_pct_repeat(continuation, 1) + 0.0) / 2, 4)
    # The second continuation has <= 3 words and is skipped in the word view.
    assert report["word_metrics"]["word_test/pct_repeat_4grams"] == pytest.approx(
        round(dense_pct_repeat(words, 4), 4))
    pieces = set(tok.decode(continuation).split(" ")) | {"", "x"}
    assert report["uniq"] == len(pieces)
    assert report["completions"][0] == tok.decode(completion)


def test_decoding_cleans_up_as_pytorch_transformers(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from scalegrad.metrics import clean_up_tokenization

    assert clean_up_tokenization("I do not know , it 's here . Why ?") == "I don't know, it's here. Why?"
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    metrics = CompletionMetrics(tok, 1)
    ids = tok.encode("The end . It is")
    metrics.update([ids])
    assert metrics.report("valid")["completions"] == ["The end. It is"]


@pytest.mark.parametrize("block_size", [1, 7, 256, 10_000])
def test_token_statistics_blocks_equal_whole_tensor(block_size):
    from scalegrad.metrics import token_statistics

    g = torch.Generator().manual_seed(block_size)
    logits = torch.randn(300, 40, generator=g)
    logits[::3, 5] = logits[::3, 6]  # ties
    targets = torch.randint(0, 40, (300,), generator=g)
    stats = token_statistics(logits, targets, block_size=block_size)
    torch.testing.assert_close(stats["nll"], torch.nn.functional.cross_entropy(logits, targets, reduction="none"))
    assert torch.equal(stats["higher"], (logits > logits.gather(1, targets[:, None])).sum(1))
    assert torch.equal(stats["predictions"], logits.argmax(1))
    assert set(token_statistics(logits, targets, nll=False)) == {"higher", "predictions"}
    assert set(token_statistics(logits, targets, ranks=False)) == {"nll"}
