"""The original fairseq workflow end to end: ``fairseq-train`` a tiny
``transformer_lm_ul`` with each of the plugin's criteria, ``evaluate_fairseq.py``
with the original's flags, ``report_metrics.py --eval-dirs``.

Every number is checked against a plain re-derivation written out here: the
single-token metrics from the model's logits by loops over the blocks, the
greedy continuations by full (non-incremental) forward passes, the report's
columns from the text files with ``collections.Counter``.

The three training runs (module fixture, started together) take most of the time.
"""

import csv
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("fairseq")

from fairseq.data import Dictionary, data_utils  # noqa: E402

from scalegrad import register_fairseq  # noqa: E402
from scalegrad.fairseq_plugin.decoding import beam_continuations  # noqa: E402
from scalegrad.fairseq_plugin.loading import load_model  # noqa: E402

register_fairseq()

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO / "scalegrad"
PFX, CMPL, BS_CMPL, BS_SPRD = 8, 16, 4, 64

MODEL = ["--task", "language_modeling_with_generation", "--arch", "transformer_lm_ul",
         "--decoder-layers", "2", "--decoder-embed-dim", "64", "--decoder-ffn-embed-dim", "128",
         "--decoder-attention-heads", "2", "--decoder-input-dim", "64", "--decoder-output-dim", "64",
         "--tokens-per-sample", "64", "--max-tokens", "512", "--cpu", "--seed", "1",
         "--num-workers", "0", "--optimizer", "adam", "--lr", "0.005", "--max-update", "4",
         "--save-interval-updates", "2", "--log-format", "json", "--no-progress-bar"]
RUNS = {
    "sg": ["--criterion", "scalegrad", "--gamma", "0.2"],
    "mle": ["--criterion", "cross_entropy_wcustom_metrics", "--sequence-level-train-rate", "0.5",
            "--sequence-prefix-length", "8", "--sequence-completion-length", "16"],
    "ul": ["--criterion", "candidate_penalty_cross_entropy", "--rank-alpha", "1.0",
           "--candidate-type", "prev_context"],
}


def subprocess_env():
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def preprocess(raw, dest, nwords):
    subprocess.run([sys.executable, "-m", "fairseq_cli.preprocess", "--only-source",
                    "--trainpref", str(raw / "train.txt"), "--validpref", str(raw / "valid.txt"),
                    "--destdir", str(dest), "--workers", "1", "--nwordssrc", str(nwords)],
                   check=True, capture_output=True, env=subprocess_env())
    return dest


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    from pydoc_data.topics import topics

    raw = tmp_path_factory.mktemp("eval_raw")
    lines = [line.strip() for key in sorted(topics) for line in topics[key].splitlines()
             if line.strip()]
    (raw / "train.txt").write_text("\n".join(lines[:1500]) + "\n", encoding="utf-8")
    (raw / "valid.txt").write_text("\n".join(lines[1500:1580]) + "\n", encoding="utf-8")
    return preprocess(raw, tmp_path_factory.mktemp("eval_bin"), 2000)


@pytest.fixture(scope="module")
def trained(data_bin, tmp_path_factory):
    """{run: save_dir}: the three fairseq-train runs, started together."""
    root = tmp_path_factory.mktemp("eval_ckpt")
    procs = {}
    for name, extra in RUNS.items():
        command = [sys.executable, "-m", "fairseq_cli.train", str(data_bin), "--user-dir",
                   str(PACKAGE_DIR), *MODEL, *extra, "--save-dir", str(root / name)]
        procs[name] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True, env=subprocess_env())
    for name, proc in procs.items():
        output = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, f"fairseq-train {name} failed:\n{output[-4000:]}"
    return {name: root / name for name in RUNS}


def evaluate(data_bin, model_path, save_path, *extra):
    argv = ["--data-dir", str(data_bin), "--base-dir", "/unused", "--model-path", str(model_path),
            "--save-path", str(save_path), "--data-prefix-length", str(PFX),
            "--completion-length", str(CMPL), "--batch-size-completions", str(BS_CMPL),
            "--batch-size-single-prediction", str(BS_SPRD), "--no-progress", *map(str, extra)]
    assert load_script("evaluate_fairseq").main(argv) == 0


def suffix(model, step, *, bms=1, bnb=0, tpk=1, tpp=0.0, sttpk=1, sttpp=0.0, ckpt="best"):
    return (f"_{model}__st_{step}__spl_valid__pfx_{PFX}__cmpl_{CMPL}__bs_cmpl_{BS_CMPL}"
            f"__bs_sprd_{BS_SPRD}__bms_{bms}__bnb_{bnb}__tpk_{tpk}__tpp_{tpp}__sttpk_{sttpk}"
            f"__sttpp_{sttpp}__ckst_None__ckep_None__ckpt_{ckpt}")


def num_updates(checkpoint):
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["optimizer_history"][-1]["num_updates"]


@pytest.fixture(scope="module")
def evaluated(data_bin, trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_out")
    for name in RUNS:
        evaluate(data_bin, trained[name], out)  # --ckpt best, greedy, both passes
    sg = trained["sg"]
    evaluate(data_bin, sg, out, "--ckpt", "all", "--eval-mode", "singletoken")
    evaluate(data_bin, sg, out, "--eval-mode", "completion", "--topk", "5")
    evaluate(data_bin, sg, out, "--eval-mode", "completion", "--beam-size", "3",
             "--beam-ngram-block", "2")
    evaluate(data_bin, sg, out, "--eval-mode", "singletoken", "--singletoken-topk", "3",
             "--singletoken-topp", "0.5", "--blocks-per-batch", "5")
    evaluate(data_bin, sg, out, "--eval-mode", "completion", "--penalty-alpha", "0.6", "--topk", "4")
    return out


# --------------------------------------------------------------------------- #
# Plain re-derivations
# --------------------------------------------------------------------------- #

def valid_stream(data_bin):
    """The split as fairseq stores it (every line ends with </s>), and its dictionary."""
    dictionary = Dictionary.load(str(Path(data_bin) / "dict.txt"))
    dataset = data_utils.load_indexed_dataset(str(Path(data_bin) / "valid"), dictionary)
    return torch.cat([dataset[i] for i in range(len(dataset))]).long(), dictionary


def blocks(stream, eos, length):
    """(input, target) blocks of fairseq's language modeling, --sample-break-mode none:
    targets are the stream in pieces of ``length``; inputs the same shifted by one, </s> first."""
    inputs = torch.cat([torch.tensor([eos]), stream[:-1]])
    return [(inputs[s:s + length], stream[s:s + length]) for s in range(0, stream.numel(), length)]


def pct_repeat(tokens, n):
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(Counter(grams)) / len(grams)


@torch.no_grad()
def dense_single_token(model, data_bin):
    stream, dictionary = valid_stream(data_bin)
    pad = dictionary.pad()
    totals = Counter()
    medians, predictions, targets = [], [], []
    nll = wrong_mass = 0.0
    for source, target in blocks(stream, dictionary.eos(), BS_SPRD):
        logits = model(source[None])[0][0].clone()
        logits[:, pad] = -1e19
        lprobs = F.log_softmax(logits, dim=-1)
        probs = lprobs.exp()
        ranks = []
        for t in range(target.numel()):
            y = int(target[t])
            rank = int((logits[t] > logits[t, y]).sum())
            ranks.append(rank)
            nll -= float(lprobs[t, y])
            wrong_mass += float(probs[t][logits[t] > logits[t, y]].sum())
            prediction = int(logits[t].argmax())
            totals["target_rank"] += rank
            totals["hits_at_1"] += rank == 0
            totals["hits_at_10"] += rank < 10
            for length in (16, 32, 128, 512):
                window = set(target[max(0, t - length):t].tolist())
                totals[f"repeat_at_1/{length}"] += prediction in window
                totals[f"wrong_repeat_at_1/{length}"] += prediction in window and prediction != y
                totals[f"human_repeat_at_1/{length}"] += y in window
        medians.append(sorted(ranks)[(len(ranks) - 1) // 2])  # torch.median: the lower middle
        predictions.append([dictionary[int(i)] for i in logits.argmax(-1)])
        targets.append([dictionary[int(i)] for i in target])
    n = stream.numel()
    metrics = {key: value / n for key, value in totals.items()}
    metrics["median_target_rank"] = sum(medians) / len(medians)
    metrics["ppl"] = math.exp(nll / n)
    metrics["avg_wrong_mass"] = wrong_mass / n
    return metrics, predictions, targets


def read_lines(path):
    return [line.split() for line in Path(path).read_text().splitlines()]


# --------------------------------------------------------------------------- #
# Evaluation
# --------------------------------------------------------------------------- #

@pytest.mark.slow
def test_single_token_files_equal_a_dense_rederivation(evaluated, trained, data_bin):
    best = trained["sg"] / "checkpoint_best.pt"
    name = suffix("sg", num_updates(best))
    stored = json.loads((evaluated / f"metrics_{name}.json").read_text())
    assert stored["checkpoint_step"] == num_updates(best)
    loaded = load_model(best, data_bin)
    metrics, predictions, targets = dense_single_token(loaded.model, data_bin)
    assert set(stored) == {f"valid/{k}" for k in metrics} | {"checkpoint_step"}
    for key, value in metrics.items():
        assert stored[f"valid/{key}"] == pytest.approx(value, rel=1e-5, abs=1e-9), key
    assert read_lines(evaluated / f"single_token_predictions_{name}.txt") == predictions
    assert read_lines(evaluated / f"targets_{name}.txt") == targets


@pytest.mark.slow
def test_single_token_topk_topp_masses(evaluated, trained, data_bin):
    best = trained["sg"] / "checkpoint_best.pt"
    name = suffix("sg", num_updates(best), sttpk=3, sttpp=0.5)
    stored = json.loads((evaluated / f"metrics_{name}.json").read_text())
    plain = json.loads((evaluated / f"metrics_{suffix('sg', num_updates(best))}.json").read_text())
    assert stored["valid/ppl"] == pytest.approx(plain["valid/ppl"], rel=1e-6)  # 5 blocks a batch
    stream, dictionary = valid_stream(data_bin)
    model = load_model(best, data_bin).model
    sums = Counter()
    with torch.no_grad():
        for source, target in blocks(stream, dictionary.eos(), BS_SPRD):
            logits = model(source[None])[0][0].clone()
            logits[:, dictionary.pad()] = -1e19
            for t in range(target.numel()):
                y, row = int(target[t]), logits[t]
                context = set(target[max(0, t - 128):t].tolist())
                top = row.topk(3).indices.tolist()
                topk_probs = F.softmax(row[top], dim=0)
                topk = {i: float(p) for i, p in zip(top, topk_probs)}
                probs = F.softmax(row, dim=0)
                order = probs.argsort(descending=True).tolist()
                nucleus, mass = {}, 0.0
                for i in order:  # keep while the mass before the token is below p
                    if nucleus and mass >= 0.5:
                        break
                    nucleus[i] = float(probs[i])
                    mass += float(probs[i])
                for kind, dist in (("topk_3", topk), ("topp_0.5", nucleus)):
                    sums[f"true_{kind}_prob"] += dist.get(y, 0.0)
                    sums[f"repeat_{kind}"] += sum(p for i, p in dist.items() if i in context)
                    sums[f"wrepeat_{kind}"] += sum(p for i, p in dist.items() if i in context and i != y)
    for key, value in sums.items():
        assert stored[f"valid/{key}"] == pytest.approx(value / stream.numel(), rel=1e-4, abs=1e-7), key
    assert 1 <= stored["valid/nextunique_topk_3"] <= len(dictionary)
    assert 1 <= stored["valid/nextunique_topp_0.5"] <= len(dictionary)


@pytest.mark.slow
def test_completion_files_hold_prefix_and_greedy_continuation(evaluated, trained, data_bin):
    best = trained["sg"] / "checkpoint_best.pt"
    lines = read_lines(evaluated / f"completions_{suffix('sg', num_updates(best))}.txt")
    stream, dictionary = valid_stream(data_bin)
    prefixes = []
    for source, _ in blocks(stream, dictionary.eos(), PFX * BS_CMPL):
        for start in range(0, source.numel() - PFX + 1, PFX):
            prefixes.append(source[start:start + PFX].tolist())
    assert len(lines) == len(prefixes)
    assert all(len(line) == PFX + CMPL for line in lines)
    assert [line[:PFX] for line in lines] == [[dictionary[i] for i in p] for p in prefixes]
    model = load_model(best, data_bin).model
    with torch.no_grad():
        for prefix, line in list(zip(prefixes, lines))[::7]:
            tokens = list(prefix)
            for _ in range(CMPL):  # full forward passes, no cache
                logits = model(torch.tensor([tokens]))[0][0, -1].clone()
                logits[dictionary.pad()] = -math.inf
                tokens.append(int(logits.argmax()))
            assert [dictionary[i] for i in tokens] == line


@pytest.mark.slow
def test_topk_beam_and_ckpt_all_files(evaluated, trained, data_bin):
    sg = trained["sg"]
    step = num_updates(sg / "checkpoint_best.pt")
    greedy = read_lines(evaluated / f"completions_{suffix('sg', step)}.txt")
    topk = read_lines(evaluated / f"completions_{suffix('sg', step, tpk=5)}.txt")
    beam = read_lines(evaluated / f"completions_{suffix('sg', step, bms=3, bnb=2)}.txt")
    for lines in (topk, beam):
        assert [line[:PFX] for line in lines] == [line[:PFX] for line in greedy]
        assert all(len(line) == PFX + CMPL for line in lines)
    assert topk != greedy
    for line in beam:  # no 2-gram of a continuation occurs earlier in prefix + continuation
        for t in range(PFX, PFX + CMPL):
            assert tuple(line[t - 1:t + 1]) not in {tuple(line[i:i + 2]) for i in range(t - 1)}
    loaded = load_model(sg / "checkpoint_best.pt", data_bin)
    index = {s: i for i, s in enumerate(loaded.dictionary.symbols)}
    prefixes = torch.tensor([[index[s] for s in line[:PFX]] for line in greedy[:6]])
    beam_one = beam_continuations(loaded.model, loaded.dictionary, prefixes, CMPL, beam_size=1,
                                  eos=len(loaded.dictionary) - 1)
    assert [[loaded.dictionary[i] for i in c] for c in beam_one] == [g[PFX:] for g in greedy[:6]]
    steps = {num_updates(p) for p in sg.glob("checkpoint*.pt")}
    assert steps == {2, 4}
    for s in steps:
        for kind in ("metrics", "single_token_predictions", "targets"):
            extension = "json" if kind == "metrics" else "txt"
            assert (evaluated / f"{kind}_{suffix('sg', s, ckpt='all')}.{extension}").is_file()


@torch.no_grad()
def plain_fairseq_contrastive(model, prefix, length, alpha, k, pad):
    """One row, full forward passes (no incremental state): the decoder's features are
    the hidden states, the padding id is never a candidate."""
    ids = list(prefix)
    for _ in range(length):
        features = model(torch.tensor([ids]), features_only=True)[0][0]
        logits = model.decoder.output_layer(features[-1]).clone()
        logits[pad] = -math.inf
        probs = F.softmax(logits, dim=-1)
        scored = []
        for v in logits.topk(k).indices.tolist():
            h = model(torch.tensor([ids + [v]]), features_only=True)[0][0, -1]
            penalty = max(float(F.cosine_similarity(h, c, dim=0, eps=0)) for c in features)
            scored.append(((1 - alpha) * float(probs[v]) - alpha * penalty, -len(scored), v))
        ids.append(max(scored)[2])
    return ids


@pytest.mark.slow
def test_contrastive_search_completions_and_text_metrics(evaluated, trained, data_bin):
    from scalegrad.text_metrics import score_samples

    best = trained["sg"] / "checkpoint_best.pt"
    name = suffix("sg", num_updates(best), tpk=4) + "__alpha_0.6"
    lines = read_lines(evaluated / f"completions_{name}.txt")
    greedy = read_lines(evaluated / f"completions_{suffix('sg', num_updates(best))}.txt")
    assert [line[:PFX] for line in lines] == [line[:PFX] for line in greedy] and lines != greedy
    loaded = load_model(best, data_bin)
    index = {s: i for i, s in enumerate(loaded.dictionary.symbols)}
    for line in lines[::5]:
        prefix = [index[s] for s in line[:PFX]]
        expected = plain_fairseq_contrastive(loaded.model, prefix, CMPL, 0.6, 4,
                                             loaded.dictionary.pad())
        assert [loaded.dictionary[i] for i in expected] == line
    # the papers' columns of the completions, and of the true continuations (human row)
    stored = json.loads((evaluated / f"text_metrics_{name}.json").read_text())
    stream, dictionary = valid_stream(data_bin)
    sources = torch.cat([source for source, _ in blocks(stream, dictionary.eos(), PFX * BS_CMPL)])
    references, offset = [], 0
    for source, _ in blocks(stream, dictionary.eos(), PFX * BS_CMPL):
        for start in range(0, source.numel() - PFX + 1, PFX):
            after = sources[offset + start + PFX:offset + start + PFX + CMPL]
            references.append(" ".join(dictionary[int(i)] for i in after))
        offset += source.numel()
    expected = score_samples([" ".join(line[:PFX]) for line in lines],
                             [[" ".join(line[PFX:]) for line in lines]], references)
    assert stored["metrics"] == expected["metrics"] and stored["human"] == expected["human"]


# --------------------------------------------------------------------------- #
# The report
# --------------------------------------------------------------------------- #

def fmt(value):
    return str(int(value)) if float(value).is_integer() else f"{value:.3f}"


@pytest.mark.slow
def test_report_equals_a_rederivation_from_the_files(evaluated, trained, capsys):
    report = load_script("report_metrics")
    assert report.main(["--eval-dirs", str(evaluated), "--model-names", "sg", "mle", "ul",
                        "--format", "csv"]) == 0
    table = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert table[0] == ["run", "model", "split", "decoding", "seq-rep-1", "seq-rep-4", "uniq-seq",
                        "ppl", "acc", "rep", "wrep", "uniq"]
    rows = {(r[0], r[1], r[3]): r[4:] for r in table[1:]}
    for name in RUNS:
        step = num_updates(trained[name] / "checkpoint_best.pt")
        name_suffix = suffix(name, step)
        continuations = [line[PFX:] for line in read_lines(evaluated / f"completions_{name_suffix}.txt")]
        metrics = json.loads((evaluated / f"metrics_{name_suffix}.json").read_text())
        predictions = read_lines(evaluated / f"single_token_predictions_{name_suffix}.txt")
        expected = [
            fmt(round(sum(pct_repeat(c, 1) for c in continuations) / len(continuations), 4)),
            fmt(round(sum(pct_repeat(c, 4) for c in continuations) / len(continuations), 4)),
            fmt(len({t for c in continuations for t in c})),
            fmt(metrics["valid/ppl"]), fmt(metrics["valid/hits_at_1"]),
            fmt(metrics["valid/repeat_at_1/128"]), fmt(metrics["valid/wrong_repeat_at_1/128"]),
            fmt(len({t for p in predictions for t in p})),
        ]
        label = f"step {step}" + ("; ckpt best; sttpk 1; sttpp 0.0" if name == "sg" else "")
        assert rows[(name, f"{name} ({label})", "greedy")] == expected, name
    targets = read_lines(evaluated / f"targets_{suffix('sg', num_updates(trained['sg'] / 'checkpoint_best.pt'))}.txt")
    pieces = [t[i:i + CMPL] for t in targets for i in range(0, len(t) - CMPL + 1, CMPL)]
    human = rows[("human", "-", "-")]
    uniq = fmt(len({t for line in targets for t in line}))
    assert human[:3] == [fmt(round(sum(pct_repeat(p, 1) for p in pieces) / len(pieces), 4)),
                         fmt(round(sum(pct_repeat(p, 4) for p in pieces) / len(pieces), 4)), uniq]
    assert human[7] == uniq
    assert ("sg", f"sg (step {num_updates(trained['sg'] / 'checkpoint_best.pt')}; ckpt best; "
            f"sttpk 1; sttpp 0.0)", "beam 3, 2-gram block") in rows
    assert ("sg", f"sg (step {num_updates(trained['sg'] / 'checkpoint_best.pt')}; ckpt best; "
            f"sttpk 1; sttpp 0.0)", "contrastive, alpha 0.6, top-k 4") in rows


# --------------------------------------------------------------------------- #
# Bad input
# --------------------------------------------------------------------------- #

@pytest.mark.slow
def test_bad_input_is_one_line_and_writes_nothing(trained, data_bin, tmp_path, capsys):
    evaluate_main = load_script("evaluate_fairseq").main
    common = ["--no-progress", "--batch-size-single-prediction", "64", "--completion-length", "4"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "checkpoint_best.pt").write_bytes(b"not a checkpoint")
    raw = tmp_path / "raw"
    raw.mkdir()
    from pydoc_data.topics import topics
    text = "\n".join(topics["if"].splitlines()[:40]) + "\n"
    (raw / "train.txt").write_text(text)
    (raw / "valid.txt").write_text(text)
    other_bin = preprocess(raw, tmp_path / "other_bin", 100)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (["--data-dir", str(data_bin), "--model-path", str(bad), "--save-path", str(tmp_path / "o1")],
         "cannot be read"),
        (["--data-dir", str(other_bin), "--model-path", str(trained["sg"]), "--save-path",
          str(tmp_path / "o2")], "dictionary"),
        (["--data-dir", str(data_bin), "--model-path", str(trained["sg"]), "--save-path",
          str(a_file / "out")], "is a file"),
        (["--data-dir", str(data_bin), "--model-path", str(trained["sg"]), "--save-path",
          str(tmp_path / "o3"), "--penalty-alpha", "1.2", "--topk", "4"],
         "--penalty-alpha must be between 0 and 1"),
        (["--data-dir", str(data_bin), "--model-path", str(trained["sg"]), "--save-path",
          str(tmp_path / "o3"), "--penalty-alpha", "0.5"], "needs --top-k K > 1"),
        (["--data-dir", str(data_bin), "--model-path", str(trained["sg"]), "--save-path",
          str(tmp_path / "o3"), "--penalty-alpha", "0.5", "--topk", "4", "--beam-size", "2"],
         "needs --beam-size 1"),
    ]
    for argv, message in cases:
        assert evaluate_main(argv + common) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert not (tmp_path / "o3").exists()
    assert a_file.read_text() == "x"
