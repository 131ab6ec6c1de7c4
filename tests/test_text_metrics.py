"""The 2022 papers' text metrics (docs/metrics-2022.md): rep-n, diversity, generation
length against simctg==0.7's own evaluation and by hand; mean and std over samples."""

import math

import pytest

from scalegrad.metrics import CompletionMetrics, split_words
from scalegrad.text_metrics import (TextMetricOptions, generation_length, ngram_counts,
                                    rep_n_and_diversity, score_samples, score_texts,
                                    summarize_samples, word_sequence_metrics)


def real_texts(count=60, words=40):
    """Pieces of the Python documentation: real English, with its repetitions,
    short pieces (0, 1, 2, 4 words), newlines and runs of spaces."""
    from pydoc_data.topics import topics

    tokens = " ".join(topics[k] for k in sorted(topics)[:6]).split(" ")
    texts, start = [], 0
    for i in range(count):
        length = (0, 1, 2, 4, words, words // 2, 3 * words)[i % 7]
        texts.append(" ".join(tokens[start:start + length]))
        start += length
    if count > 6:
        texts[5] = texts[4] + "\n" + texts[4]  # a repeated passage
        texts[6] = "  the the the the the  \n"
    return texts


def dense_rep_n(texts, n, count_last):
    """rep-n spelled out: every window of n tokens of each text, the last left out
    unless ``count_last``; 100 * (1 - sum of distinct / sum of all)."""
    distinct = total = 0
    for text in texts:
        tokens = text.split()
        windows = []
        for i in range(len(tokens)):
            if i + n < len(tokens) or (count_last and i + n == len(tokens)):
                windows.append(" ".join(tokens[i:i + n]))
        distinct += len(set(windows))
        total += len(windows)
    return 100 * (1 - distinct / total)


def test_rep_n_and_diversity_identical_to_simctg():
    from simctg.evaluation import measure_repetition_and_diversity

    texts = real_texts()
    rep2, rep3, rep4, div = measure_repetition_and_diversity(texts)
    ours = rep_n_and_diversity(texts)
    assert ours == {"rep-2": rep2, "rep-3": rep3, "rep-4": rep4, "diversity": div}
    assert rep4 > 0  # the texts do repeat


@pytest.mark.parametrize("seed", range(5))
def test_rep_n_identical_to_simctg_on_random_word_salads(seed):
    import random

    from simctg.evaluation import measure_repetition_and_diversity

    rng = random.Random(seed)
    vocab = ["a", "b", "c", "0", "d."]
    texts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(3, 30))) for _ in range(20)]
    rep2, rep3, rep4, div = measure_repetition_and_diversity(texts)
    assert rep_n_and_diversity(texts) == {"rep-2": rep2, "rep-3": rep3, "rep-4": rep4,
                                          "diversity": div}


@pytest.mark.parametrize("count_last", [False, True])
def test_rep_n_equals_dense_count_unrounded(count_last):
    texts = real_texts()
    ours = rep_n_and_diversity(texts, count_last_ngram=count_last, round_digits=None)
    for n in (2, 3, 4):
        assert ours[f"rep-{n}"] == pytest.approx(dense_rep_n(texts, n, count_last), abs=1e-12)
    assert ours["diversity"] == pytest.approx(
        math.prod(1 - dense_rep_n(texts, n, count_last) / 100 for n in (2, 3, 4)), abs=1e-12)


def test_rep_n_hand_counted():
    # "a b a b a" has 2-grams ab ba ab ba; simctg stops before the last one: ab ba ab
    # (3 in all, 2 distinct). "c c" has one 2-gram, not counted: (0, 0).
    assert ngram_counts("a b a b a", 2) == (2, 3)
    assert ngram_counts("a b a b a", 2, count_last_ngram=True) == (2, 4)
    assert ngram_counts("c c", 2) == (0, 0)
    assert ngram_counts("c c", 2, count_last_ngram=True) == (1, 1)
    assert ngram_counts("", 2) == (0, 0)
    # 3-grams of "a b a b a": aba bab (aba not counted): 2 distinct of 2.
    # 4-grams: abab (baba not counted): 1 of 1.
    ours = rep_n_and_diversity(["a b a b a", "c c"])
    assert ours["rep-2"] == round(100 * (1 - 2 / 3), 2) == 33.33
    assert ours["rep-3"] == 0.0 and ours["rep-4"] == 0.0
    assert ours["diversity"] == pytest.approx(1 - 0.3333)
    # Corrected: 2-grams ab ba ab ba + cc: 3 distinct of 5 -> 40; 3-grams aba bab aba:
    # 2 of 3 -> 33.33; 4-grams abab baba: 2 of 2 -> 0.
    fixed = rep_n_and_diversity(["a b a b a", "c c"], count_last_ngram=True)
    assert (fixed["rep-2"], fixed["rep-3"], fixed["rep-4"]) == (40.0, 33.33, 0.0)


def test_no_ngram_at_all_gives_zero_not_a_division_by_zero():
    assert rep_n_and_diversity(["one", ""]) == {"rep-2": 0.0, "rep-3": 0.0, "rep-4": 0.0,
                                                "diversity": 1.0}


def test_generation_length():
    assert generation_length(["a b  c\n", "", " d "]) == pytest.approx(4 / 3)
    assert generation_length([]) == 0.0


def test_word_sequence_metrics_equal_the_drivers(tiny_tokenizer):
    """The scorer's seq-rep-N / uniq-seq on continuation texts equal the drivers'
    CompletionMetrics on the ids of the same continuations."""
    texts = [t for t in real_texts(28) if t.strip()]
    completions, continuations = [], []
    prefix = tiny_tokenizer("Prefix text here.", add_special_tokens=False)["input_ids"]
    for text in texts:
        ids = tiny_tokenizer(" " + text.replace("\n", " "), add_special_tokens=False)["input_ids"]
        completions.append(prefix + ids)
        continuations.append(tiny_tokenizer.decode(ids, clean_up_tokenization_spaces=False))
    driver = CompletionMetrics(tiny_tokenizer, len(prefix))
    driver.update(completions)
    report = driver.report("test")
    ours = word_sequence_metrics(continuations)
    for n in range(1, 5):
        assert ours[f"seq-rep-{n}"] == report["word_metrics"][f"word_test/pct_repeat_{n}grams"]
    assert ours["uniq-seq"] == report["uniq"]
    assert any(len(split_words(c)) <= 3 for c in continuations)  # the short ones skipped


def test_summarize_samples_is_numpy_mean_and_population_std():
    import numpy as np

    per_sample = [{"rep-2": 1.0, "mauve": 0.5, "x": None}, {"rep-2": 2.0, "mauve": 0.7, "x": 1},
                  {"rep-2": 4.0, "mauve": 0.9, "x": 2}]
    mean, std = summarize_samples(per_sample)
    assert set(mean) == {"rep-2", "mauve"}
    assert mean["rep-2"] == pytest.approx(np.mean([1, 2, 4]))
    assert std["rep-2"] == pytest.approx(np.std([1, 2, 4]))
    assert std["mauve"] == pytest.approx(np.std([0.5, 0.7, 0.9]))


def test_score_samples_layout():
    texts = real_texts(14)
    samples = [texts[:7], texts[7:]]
    result = score_samples(None, samples, references=texts[3:10])
    assert result["num_samples"] == 2 and result["num_prefixes"] == 7
    assert result["per_sample"][0] == score_texts(None, texts[:7])
    assert result["metrics"]["rep-2"] == pytest.approx(
        (result["per_sample"][0]["rep-2"] + result["per_sample"][1]["rep-2"]) / 2)
    assert result["std"]["gen-length"] == pytest.approx(
        abs(generation_length(texts[:7]) - generation_length(texts[7:])) / 2)
    assert result["human"]["rep-3"] == rep_n_and_diversity(texts[3:10])["rep-3"]
    assert "mauve" not in result["human"]
    one = score_samples(None, [texts[:7]])
    assert "std" not in one and one["metrics"] == one["per_sample"][0]


def test_count_mismatch_is_a_user_error():
    from scalegrad.errors import UserError

    with pytest.raises(UserError, match="3 prefixes but 2 continuations"):
        score_texts(["a", "b", "c"], ["x", "y"])
    with pytest.raises(UserError, match="references"):
        score_texts(None, ["x", "y"], ["r"])
    with pytest.raises(UserError, match="references"):
        score_texts(None, ["x", "y"], options=TextMetricOptions(featurizer="gpt2"))


def test_the_text_columns_need_no_extra(monkeypatch):
    import sys

    for name in ("mauve", "faiss", "sklearn"):
        monkeypatch.setitem(sys.modules, name, None)
    texts = real_texts(10)
    assert score_texts(["p"] * 10, texts, texts)["rep-2"] == rep_n_and_diversity(texts)["rep-2"]
