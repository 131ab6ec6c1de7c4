"""scripts/run_gpt2.py: flags, result files, evaluation numbers, bad input.

The runs use the tiny model and tokenizer of conftest.py and short prefixes of
its data splits, in process (``scalegrad.gpt2.driver.run``); a few bad-input
cases also run the script itself to check its one-line errors.
"""

from __future__ import annotations

import json
import re
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from scalegrad.data import load_split, save_split, split_path
from scalegrad.errors import UserError
from scalegrad.gpt2.driver import run
from scalegrad.gpt2.evaluate import completion_filename, singletoken_filename
from scalegrad.gpt2.options import ORIGINAL_DEFAULTS, parse_args, result_model_name
from scalegrad.metrics import split_words
from tests.references import dense_pct_repeat, dense_ranking_metrics

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "run_gpt2.py"

SMALL_SPLITS = {"train": 6000, "valid": 1300, "test": 1300}


@pytest.fixture(scope="module")
def small_data_base(tiny_data_base, tmp_path_factory):
    """The first tokens of each tiny split: enough for a few chunks, fast to evaluate."""
    path = tmp_path_factory.mktemp("small_data")
    for split, size in SMALL_SPLITS.items():
        save_split(load_split(split_path(tiny_data_base, split))[:size], split_path(path, split))
    return str(path)


def base_argv(data_base, output_dir, model_dir, *extra):
    return ["--data-base", str(data_base), "--output-dir", str(output_dir),
            "--model-load-dir", str(model_dir), "--model-name", "tiny", "--no-progress",
            *map(str, extra)]


def load_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


# --------------------------------------------------------------------------- #
# Flags
# --------------------------------------------------------------------------- #

def test_original_flags_keep_their_defaults(tmp_path):
    args = parse_args(["--output-dir", str(tmp_path / "out"), "--data-base", str(tmp_path),
                       "--eval-split", "valid"])
    for name, default in ORIGINAL_DEFAULTS.items():
        if name in ("output_dir", "data_base", "eval_split"):
            continue
        if name in ("max_grad_norm", "gradient_accumulation_steps"):
            # Parsed but never used by the original: "not given" reproduces that.
            assert getattr(args, name) is None
            continue
        assert getattr(args, name) == default, name
    assert args.sequence_tune_rate == 0.0 and args.sequence_ngram_n == 4
    assert args.completion_batch_size is None and args.device is None
    assert not (args.fp16 or args.bf16 or args.resume or args.enable_dropout
                or args.exact_train_n_steps)
    assert args.adamw == "original" and args.max_nonfinite_steps == 10


def test_config_file_merges_and_command_line_wins(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("gamma: 0.2\nlearning-rate: 2.0e-5\ntrain_n_steps: 7\nmode: train\n"
                      "enable_dropout: true\ntop_p: 0\n")
    args = parse_args(["--config", str(config), "--output-dir", str(tmp_path / "o"),
                       "--data-base", str(tmp_path), "--train-n-steps", "3"])
    assert args.gamma == 0.2 and args.learning_rate == 2e-5 and args.mode == "train"
    assert args.train_n_steps == 3 and args.enable_dropout is True
    assert isinstance(args.top_p, float)


@pytest.mark.parametrize("content, message", [
    ("gamma: 0.2\nnot_a_flag: 1\n", "unknown key 'not_a_flag'"),
    ("mode: finetune\n", "must be one of"),
    ("train_n_steps: many\n", "must be of type int"),
    ("resume: 1\n", "true or false"),
    ("- gamma\n", "mapping"),
])
def test_bad_config_file(tmp_path, content, message):
    config = tmp_path / "run.yaml"
    config.write_text(content)
    with pytest.raises(UserError, match=message):
        parse_args(["--config", str(config), "--output-dir", str(tmp_path / "o"),
                    "--data-base", str(tmp_path), "--eval-split", "valid"])


def test_presets_parse(tmp_path):
    presets = sorted((REPO / "configs" / "gpt2").glob("*.yaml"))
    assert len(presets) >= 5
    for preset in presets:
        args = parse_args(["--config", str(preset), "--output-dir", str(tmp_path / "o"),
                           "--data-base", str(tmp_path), "--eval-split", "valid"])
        assert args.gamma in (0.2, 0.5, 0.8, 1.0), preset


def test_result_file_names(tmp_path):
    args = parse_args(["--output-dir", str(tmp_path), "--data-base", str(tmp_path),
                       "--eval-split", "test"])
    assert singletoken_filename(args) == "singletoken__gpt2-medium__spl_test__bsz_1024.json"
    assert singletoken_filename(args, 2000) == "singletoken__gpt2-medium__spl_test__bsz_1024_2000.json"
    assert completion_filename(args) == (
        "completion__gpt2-medium__spl_test__topk_1__topp_0.0__pfl_50__cnl_100.json")
    assert result_model_name(str(tmp_path) + "/") == tmp_path.name
    assert result_model_name("openai-community/gpt2") == "openai-community--gpt2"


# --------------------------------------------------------------------------- #
# Single-token evaluation
# --------------------------------------------------------------------------- #

def dense_singletoken(model, tokens, n):
    """docs/reference.md, section 2, by hand: chunks of n + 1, dense counts, the
    original's normalisation."""
    chunks = tokens[: tokens.numel() // (n + 1) * (n + 1)].view(-1, n + 1)
    sums, medians, loss, predicted, targets = {}, [], 0.0, set(), set()
    with torch.no_grad():
        for chunk in chunks:
            logits = model(input_ids=chunk[:-1].unsqueeze(0)).logits[0]
            target = chunk[1:]
            loss += -F.log_softmax(logits.double(), dim=-1).gather(1, target[:, None]).sum().item()
            counts = dense_ranking_metrics(logits, target)
            medians.append(counts.pop("median_target_rank"))
            counts.pop("normalizer")
            for key, value in counts.items():
                sums[key] = sums.get(key, 0.0) + value
            predicted.update(logits.argmax(-1).tolist())
            targets.update(target.tolist())
    ntokens = chunks.size(0) * n
    expected = {key: value / ntokens for key, value in sums.items()}
    expected["median_target_rank"] = sum(medians) / len(medians)
    expected["loss"] = loss / ntokens / math.log(2)
    expected["ppl"] = 2 ** expected["loss"]
    expected["uniq"] = len(predicted)
    expected["human_uniq"] = len(targets)
    expected["ntokens"] = expected["sample_size"] = ntokens
    return expected


def test_eval_singletoken_equals_dense_rederivation(tiny_model_dir, small_data_base, tmp_path):
    # Four chunks of 100 + 1 and a tail that is dropped: the dense counts are slow.
    data_base = tmp_path / "data"
    for split in SMALL_SPLITS:
        tokens = load_split(split_path(small_data_base, split))
        save_split(tokens[:450] if split == "valid" else tokens, split_path(data_base, split))
    out = tmp_path / "out"
    run(parse_args(base_argv(data_base, out, tiny_model_dir, "--mode", "eval-singletoken",
                             "--eval-split", "valid", "--batch-size-singletoken", 100)))
    files = sorted(p.name for p in out.iterdir())
    assert files == ["singletoken__tiny__spl_valid__bsz_100.json"]
    result = json.loads((out / files[0]).read_text())
    assert set(result) == {"metrics", "config"}
    assert result["config"]["n_layer"] == 2 and result["config"]["model_type"] == "gpt2"
    metrics = result["metrics"]
    expected = dense_singletoken(load_model(tiny_model_dir),
                                 load_split(split_path(data_base, "valid")), 100)
    assert expected["ntokens"] == 400
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert metrics["nsentences"] == 0


# --------------------------------------------------------------------------- #
# Completion evaluation
# --------------------------------------------------------------------------- #

def one_prefix_greedy(model, prefix, length):
    """The plainest greedy loop: the whole sequence through the model every step."""
    ids = prefix.tolist()
    with torch.no_grad():
        for _ in range(length):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids


def expected_completion_report(tokenizer, completions, prefix_length, split):
    decode = lambda ids: tokenizer.decode(ids, clean_up_tokenization_spaces=True)  # noqa: E731
    bpe = [c[prefix_length:] for c in completions]
    words = []
    for c in completions:
        text, prefix = decode(c), decode(c[:prefix_length])
        if prefix not in text:
            prefix = " ".join(prefix.split(" ")[:-2])
        w = split_words(text.replace(prefix, "") if prefix else text)
        if len(w) > 3:
            words.append(w)
    mean = lambda lists, n: round(sum(dense_pct_repeat(x, n) for x in lists) / len(lists), 4)  # noqa: E731
    pieces = set()
    for b in bpe:
        pieces.update(decode(b).split(" "))
    return {
        "bpe_metrics": {f"bpe_{split}/pct_repeat_{n}grams": mean(bpe, n) for n in range(1, 5)},
        "word_metrics": {f"word_{split}/pct_repeat_{n}grams": mean(words, n) for n in range(1, 5)},
        "uniq": len(pieces),
        "completions": [decode(c) for c in completions],
    }


def test_eval_completion_equals_one_prefix_at_a_time_greedy(tiny_model_dir, tiny_tokenizer,
                                                            small_data_base, tmp_path):
    out = tmp_path / "out"
    run(parse_args(base_argv(small_data_base, out, tiny_model_dir, "--mode", "eval-completion",
                             "--eval-split", "test", "--batch-size-completion", 60,
                             "--prefix-length", 10, "--continuation-length", 8,
                             "--completion-batch-size", 32)))
    name = "completion__tiny__spl_test__topk_1__topp_0.0__pfl_10__cnl_8.json"
    assert sorted(p.name for p in out.iterdir()) == [name]
    result = json.loads((out / name).read_text())
    # the original's keys first, as they were; then the 2022 papers' columns and the decoding
    assert list(result) == ["bpe_metrics", "word_metrics", "uniq", "config", "completions",
                            "text_metrics", "decoding", "prefixes", "continuations", "references"]
    assert result["decoding"] == {"greedy": True}

    model = load_model(tiny_model_dir)
    tokens = load_split(split_path(small_data_base, "test"))
    chunks = tokens[: tokens.numel() // 61 * 61].view(-1, 61)
    completions = []
    for chunk in chunks:  # 6 prefixes of 10 per chunk of 61, chunk by chunk
        for start in range(0, 60, 10):
            completions.append(one_prefix_greedy(model, chunk[start:start + 10], 8))
    expected = expected_completion_report(tiny_tokenizer, completions, 10, "test")
    assert len(result["completions"]) == len(completions) == chunks.size(0) * 6
    assert result["completions"] == expected["completions"]
    assert result["bpe_metrics"] == expected["bpe_metrics"]
    assert result["word_metrics"] == expected["word_metrics"]
    assert result["uniq"] == expected["uniq"]


def test_eval_both_and_sampling_is_seeded(tiny_model_dir, small_data_base, tmp_path):
    argv = ["--mode", "eval-both", "--eval-split", "valid", "--batch-size-singletoken", 400,
            "--batch-size-completion", 100, "--prefix-length", 20, "--continuation-length", 6,
            "--top-k", 5, "--top-p", 0.9, "--completion-batch-size", 64]
    first = run(parse_args(base_argv(small_data_base, tmp_path / "a", tiny_model_dir, *argv)))
    second = run(parse_args(base_argv(small_data_base, tmp_path / "b", tiny_model_dir, *argv)))
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "completion__tiny__spl_valid__topk_5__topp_0.9__pfl_20__cnl_6.json",
        "singletoken__tiny__spl_valid__bsz_400.json"]
    assert first.completion["completions"] == second.completion["completions"]
    assert first.singletoken == second.singletoken


# --------------------------------------------------------------------------- #
# Bad input: one clear error, nothing written
# --------------------------------------------------------------------------- #

class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.fixture()
def bad_data(small_data_base, tmp_path):
    """Data folders each broken in one way."""
    def make(kind):
        base = tmp_path / f"data_{kind}"
        base.mkdir()
        for split in SMALL_SPLITS:
            tokens = load_split(split_path(small_data_base, split))
            if split == "valid":
                if kind == "missing":
                    continue
                if kind == "out_of_vocab":
                    tokens = tokens.clone()
                    tokens[5] = 100_000
                if kind == "two_dim":
                    tokens = tokens[:1200].view(2, 600)
                if kind == "float":
                    tokens = tokens.float()
                if kind == "pickle":
                    torch.save({"tokens": _Evil()}, split_path(base, split))
                    continue
            torch.save(tokens, split_path(base, split))
        return str(base)
    return make


BAD_INPUTS = [
    # (data kind, extra flags, message)
    ("missing", [], "valid_tokens_bpe_gpt2.pt does not exist"),
    ("out_of_vocab", [], "outside the model's vocabulary"),
    ("two_dim", [], "expected a 1-D tensor"),
    ("float", [], "expected integer token ids"),
    ("pickle", [], "refused"),
    ("ok", ["--prefix-length", "61", "--batch-size-completion", "60"], "--prefix-length 61"),
    ("ok", ["--continuation-length", "0"], "--continuation-length"),
    ("ok", ["--top-k", "-1"], "--top-k"),
    ("ok", ["--top-p", "1.5"], "--top-p"),
    ("ok", ["--gamma", "0"], "gamma must be a number > 0"),
    ("ok", ["--gamma", "-0.5"], "gamma must be a number > 0"),
    ("ok", ["--batch-size-completion", "1500"], "fewer than the 1501 needed"),
    ("ok", ["--batch-size-singletoken", "1200"], "longer than the model's 1100 positions"),
]


@pytest.mark.parametrize("kind, extra, message", BAD_INPUTS)
def test_bad_input_is_one_user_error_and_writes_nothing(tiny_model_dir, bad_data, tmp_path,
                                                        kind, extra, message):
    data_base = bad_data(kind)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=re.escape(message)):
        run(parse_args(base_argv(data_base, out, tiny_model_dir, "--mode", "eval-both",
                                 "--eval-split", "valid", "--batch-size-singletoken", 200,
                                 "--batch-size-completion", 60, "--prefix-length", 10,
                                 "--continuation-length", 8, *extra)))
    assert not out.exists()


def test_bad_model_and_paths(tiny_model_dir, small_data_base, tmp_path):
    common = ["--mode", "eval-singletoken", "--eval-split", "valid", "--batch-size-singletoken", 200]
    out = tmp_path / "out"
    with pytest.raises(UserError, match="does not exist"):
        run(parse_args(base_argv(small_data_base, out, tmp_path / "no_such_model", *common)))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((Path(tiny_model_dir) / "config.json").read_text())
    with pytest.raises(UserError, match="cannot load a model"):
        run(parse_args(base_argv(small_data_base, out, no_weights, *common)))
    with pytest.raises(UserError, match="--data-base .* is not a folder"):
        run(parse_args(base_argv(tmp_path / "no_data", out, tiny_model_dir, *common)))
    with pytest.raises(UserError, match="needs --eval-split"):
        run(parse_args(base_argv(small_data_base, out, tiny_model_dir, "--mode", "eval-both")))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UserError, match="is a file, not a folder"):
        run(parse_args(base_argv(small_data_base, blocker / "out", tiny_model_dir, *common)))
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("extra, message", [
    (["--gamma", "0"], "error: --gamma must be a number > 0"),
    (["--model-load-dir", "/no/such/model"], "error: --model-load-dir /no/such/model does not exist"),
    (["--config", "CONFIG"], "error: config file"),
])
def test_script_prints_one_line_and_exits_2(tiny_model_dir, small_data_base, tmp_path, extra, message):
    config = tmp_path / "bad.yaml"
    config.write_text("learning_rate: 1e-4\nbatch_size: 8\n")
    extra = [str(config) if e == "CONFIG" else e for e in extra]
    out = tmp_path / "out"
    argv = base_argv(small_data_base, out, tiny_model_dir, "--mode", "eval-singletoken",
                     "--eval-split", "valid") + extra
    proc = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(message), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
