"""The fairseq plugin: criteria, task and architecture, in-process and through
``fairseq-train``, on a tiny data-bin built from real English text (the
``pydoc_data.topics`` corpus) with ``fairseq-preprocess``.

In-process tests check the numbers (against the library functions and dense
references); the ``fairseq-train`` runs (marked slow, a few seconds each, most
of it fairseq's start-up) check that the plugin trains and logs what it should.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("fairseq")

from fairseq import options, tasks  # noqa: E402
from fairseq.dataclass.utils import convert_namespace_to_omegaconf  # noqa: E402
from fairseq.logging import metrics as fairseq_metrics  # noqa: E402

from scalegrad import register_fairseq  # noqa: E402
from scalegrad.losses import scalegrad_loss  # noqa: E402
from scalegrad.metrics import RANKING_METRIC_NAMES, ngram_metrics, ranking_metrics  # noqa: E402
from scalegrad.unlikelihood import ngram_repeat_mask  # noqa: E402
from tests.references import dense_candidate_penalty  # noqa: E402
from tests.helpers import make_fairseq_checkout  # noqa: E402

register_fairseq()

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO / "scalegrad"

TINY_MODEL = [
    "--decoder-layers", "2", "--decoder-embed-dim", "64", "--decoder-ffn-embed-dim", "128",
    "--decoder-attention-heads", "2", "--tokens-per-sample", "64", "--max-tokens", "512",
    "--cpu", "--seed", "1", "--dropout", "0", "--num-workers", "0",
]
TRAIN = [
    "--optimizer", "adam", "--lr", "0.005", "--no-save", "--log-format", "json",
    "--log-interval", "1", "--no-progress-bar",
]


def subprocess_env():
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


# --------------------------------------------------------------------------- #
# Fixtures
# --------------------------------------------------------------------------- #

@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    """train / valid / test from the pydoc corpus, binarised by fairseq-preprocess."""
    from pydoc_data.topics import topics

    raw = tmp_path_factory.mktemp("fairseq_raw")
    lines = [line.strip() for key in sorted(topics) for line in topics[key].splitlines()
             if line.strip()]
    splits = {"train": lines[:1500], "valid": lines[1500:1700], "test": lines[1700:1900]}
    for split, split_lines in splits.items():
        (raw / f"{split}.txt").write_text("\n".join(split_lines) + "\n", encoding="utf-8")
    dest = tmp_path_factory.mktemp("fairseq_data_bin")
    subprocess.run(
        [sys.executable, "-m", "fairseq_cli.preprocess", "--only-source",
         "--trainpref", str(raw / "train.txt"), "--validpref", str(raw / "valid.txt"),
         "--testpref", str(raw / "test.txt"), "--destdir", str(dest), "--workers", "1",
         "--nwordssrc", "2000"],
        check=True, capture_output=True, env=subprocess_env(),
    )
    return str(dest)


def build(data_bin, *extra):
    """(cfg, task, model, criterion) as fairseq-train builds them."""
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser, [data_bin, "--arch", "transformer_lm", *TINY_MODEL, *extra]
    )
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(cfg.common.seed)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    return cfg, task, model, criterion


def valid_sample(task, *, pad_tail=0):
    """The first validation batch; ``pad_tail`` trailing targets of the last
    row turned into padding (as a short final block would be)."""
    task.load_dataset("valid")
    itr = task.get_batch_iterator(dataset=task.dataset("valid"), max_tokens=512,
                                  max_positions=64).next_epoch_itr(shuffle=False)
    sample = next(itr)
    if pad_tail:
        pad = task.target_dictionary.pad()
        sample["target"][-1, -pad_tail:] = pad
        sample["net_input"]["src_tokens"][-1, -pad_tail:] = pad
        sample["ntokens"] = int((sample["target"] != pad).sum())
    return sample


def assert_metrics_equal(logging_output, scores, target, pad):
    keep = target.reshape(-1) != pad
    expected = ranking_metrics(scores.reshape(-1, scores.size(-1))[keep], target.reshape(-1)[keep])
    for name in RANKING_METRIC_NAMES + ["normalizer"]:
        assert logging_output[name] == pytest.approx(expected[name], rel=1e-6), name
    assert logging_output["normalizer"] == int(keep.sum())
    assert logging_output["median_target_rank_count"] == 1


# --------------------------------------------------------------------------- #
# In-process: the criteria's numbers
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("name", ["scalegrad", "cross_entropy_wcustom_metrics",
                                  "candidate_penalty_cross_entropy"])
def test_criterion_numbers_match_library(data_bin, name):
    _, task, model, criterion = build(data_bin, "--task", "language_modeling", "--criterion", name)
    sample = valid_sample(task, pad_tail=5)
    pad = task.target_dictionary.pad()
    model.eval()
    with torch.no_grad():
        loss, sample_size, log = criterion(model, sample)
        logits = model(**sample["net_input"])[0]
    target = sample["target"]
    lprobs = torch.log_softmax(logits.float(), dim=-1)
    nll = F.nll_loss(lprobs.view(-1, lprobs.size(-1)), target.view(-1), ignore_index=pad,
                     reduction="sum")
    assert sample_size == sample["ntokens"] == int((target != pad).sum())
    assert_metrics_equal(log, logits, target, pad)

    if name == "scalegrad":
        expected = scalegrad_loss(logits, target, 0.2, ignore_index=pad)
        assert float(loss) == pytest.approx(float(expected), rel=1e-5)
        assert float(log["loss"]) == pytest.approx(float(expected), rel=1e-5)
        assert float(log["nll_loss"]) == pytest.approx(float(nll), rel=1e-5)
    elif name == "cross_entropy_wcustom_metrics":
        assert float(log["loss"]) == pytest.approx(float(nll), rel=1e-5)
    else:
        ref_nll, ref_penalty = dense_candidate_penalty(lprobs.view(-1, lprobs.size(-1)).double(),
                                                       target.view(-1), pad=pad)
        assert float(log["loss"]) == pytest.approx(ref_nll, rel=1e-5)
        assert float(log["custom_loss"]) == pytest.approx(ref_penalty, rel=1e-5)
        assert float(loss) == pytest.approx(ref_nll + 1.0 * ref_penalty, rel=1e-5)


def test_candidates_per_row_option(data_bin):
    _, task, model, criterion = build(
        data_bin, "--task", "language_modeling", "--criterion", "candidate_penalty_cross_entropy",
        "--rank-alpha", "0.5", "--candidates-per-row",
    )
    assert criterion.candidates_per_row and criterion.rank_alpha == 0.5
    sample = valid_sample(task, pad_tail=5)
    pad = task.target_dictionary.pad()
    model.eval()
    with torch.no_grad():
        loss, _, log = criterion(model, sample)
        lprobs = model.get_normalized_probs(model(**sample["net_input"]), log_probs=True)
    target = sample["target"]
    ref_nll, ref_penalty = dense_candidate_penalty(
        lprobs.view(-1, lprobs.size(-1)).double(), target.view(-1), pad=pad,
        row_length=target.size(1), ignore_padding=True,
    )
    assert float(log["custom_loss"]) == pytest.approx(ref_penalty, rel=1e-5)
    assert float(loss) == pytest.approx(ref_nll + 0.5 * ref_penalty, rel=1e-5)


def test_metrics_schedule_and_constant_keys(data_bin):
    """Training: metrics on every 3rd call only; every call logs the same keys
    in the same order (fairseq sums logging outputs key by key)."""
    _, task, model, criterion = build(data_bin, "--task", "language_modeling",
                                      "--criterion", "scalegrad", "--compute-metrics-interval", "3")
    sample = valid_sample(task)
    model.train()
    logs = []
    for _ in range(6):
        _, _, log = criterion(model, sample)
        logs.append(log)
    assert [log["normalizer"] > 0 for log in logs] == [False, False, True, False, False, True]
    assert all(list(log) == list(logs[0]) for log in logs)
    model.eval()
    with torch.no_grad():
        _, _, log = criterion(model, sample)
    assert log["normalizer"] > 0 and list(log) == list(logs[0])


@pytest.mark.parametrize("name", ["scalegrad", "cross_entropy_wcustom_metrics",
                                  "candidate_penalty_cross_entropy"])
def test_metrics_at_every_call_outside_the_generation_task(data_bin, name):
    """Under another task the original computed the token metrics at every call
    (its forward keyword compute_custom_metrics defaulted to True); the keyword
    still decides when given; --compute-metrics-interval thins the calls."""
    _, task, model, criterion = build(data_bin, "--task", "language_modeling", "--criterion", name)
    assert criterion.metrics_schedule.interval == 1
    sample = valid_sample(task)
    model.train()
    computed = [criterion(model, sample)[2]["normalizer"] > 0 for _ in range(3)]
    assert computed == [True, True, True]
    assert criterion(model, sample, compute_custom_metrics=False)[2]["normalizer"] == 0
    _, task, model, criterion = build(data_bin, "--task", "language_modeling", "--criterion", name,
                                      "--compute-metrics-interval", "2")
    model.train()
    computed = [criterion(model, sample)[2]["normalizer"] > 0 for _ in range(4)]
    assert computed == [False, True, False, True]
    assert criterion(model, sample, compute_custom_metrics=True)[2]["normalizer"] > 0


def test_generation_task_interval_and_candidate_type(data_bin):
    """The original's command line: --candidate-type prev_context is accepted by
    the task and the token-level criterion; the task's interval (250) is the
    flag's default and it passes compute_custom_metrics to the criterion."""
    cfg, task, model, criterion = build(
        data_bin, "--task", "language_modeling_with_generation",
        "--criterion", "candidate_penalty_cross_entropy", "--candidate-type", "prev_context",
        "--rank-alpha", "1.0",
    )
    assert cfg.task.candidate_type == "prev_context" == criterion.candidate_type
    assert task.compute_metrics_interval == 250
    sample = valid_sample(task)
    logs = [task.train_step(sample, model, criterion, _BackwardOnly(), update_num=u)[2]
            for u in range(3)]
    assert [log["normalizer"] > 0 for log in logs] == [False, False, False]
    cfg, _, _, criterion = build(data_bin, "--task", "language_modeling",
                                 "--criterion", "candidate_penalty_cross_entropy",
                                 "--candidate-type", "prev_context")
    assert cfg.criterion.candidate_type == "prev_context" == criterion.candidate_type
    _, _, _, criterion = build(data_bin, "--task", "language_modeling",
                               "--criterion", "candidate_penalty_cross_entropy")
    assert criterion.candidate_type == "prev_context"  # the default
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        build(data_bin, "--task", "language_modeling_with_generation",
              "--criterion", "candidate_penalty_cross_entropy", "--candidate-type", "random")


def test_sequence_criterion_reduce_logs_counts(data_bin):
    """The sequence criterion's aggregate: seq_loss, seq_ntokens, seq_nsentences,
    seq_sample_size, seq_repeat_mask, seq_pct_repeat_{1..4}grams, and seq_nll_loss
    only when the sample size is not the token count."""
    from scalegrad.fairseq_plugin.criterions.sequence_penalty import SequencePenaltyCriterion

    _, task, model, criterion = build(
        data_bin, "--task", "language_modeling", "--criterion", "sequence_penalty",
        "--sequence-prefix-length", "8", "--sequence-completion-length", "12",
    )
    sample = valid_sample(task)
    logs = [criterion(model, sample)[2] for _ in range(2)]
    assert logs[0]["seq_ntokens"] == 3 * 12 and logs[0]["seq_nsentences"] == 3
    with fairseq_metrics.aggregate() as agg:
        SequencePenaltyCriterion.reduce_metrics(logs)
    values = agg.get_smoothed_values()
    assert values["seq_ntokens"] == 72 and values["seq_nsentences"] == 6
    assert values["seq_sample_size"] == 72
    loss_sum = float(logs[0]["seq_loss"] + logs[1]["seq_loss"])
    assert values["seq_loss"] == pytest.approx(loss_sum / 72 / math.log(2), abs=1e-3)
    assert values["seq_repeat_mask"] == pytest.approx(
        (logs[0]["seq_repeat_mask"] + logs[1]["seq_repeat_mask"]) / 72, abs=1e-4)
    assert values["seq_pct_repeat_1grams"] == pytest.approx(
        (logs[0]["seq_pct_repeat_1grams"] + logs[1]["seq_pct_repeat_1grams"]) / 6, abs=1e-4)
    assert "seq_nll_loss" not in values
    odd = {"seq_loss": 6.0, "seq_ntokens": 30, "seq_nsentences": 2, "seq_sample_size": 2,
           "seq_repeat_mask": 1.0}
    with fairseq_metrics.aggregate() as agg:
        SequencePenaltyCriterion.reduce_sequence_metrics([odd])
    values = agg.get_smoothed_values()
    assert values["seq_loss"] == pytest.approx(6.0 / 2 / math.log(2), abs=1e-3)
    assert values["seq_nll_loss"] == pytest.approx(6.0 / 30 / math.log(2), abs=1e-3)


def test_reduce_metrics_sums_and_median_mean(data_bin):
    """Aggregation: ratios over the summed normalizer; median = mean of the
    per-call medians; nll_loss and ppl in bits per token."""
    _, task, model, criterion = build(data_bin, "--task", "language_modeling",
                                      "--criterion", "scalegrad")
    sample = valid_sample(task)
    model.eval()
    with torch.no_grad():
        _, _, log_a = criterion(model, sample)
        sample_b = valid_sample(task, pad_tail=7)
        _, _, log_b = criterion(model, sample_b)
    summed = {k: log_a[k] + log_b[k] for k in log_a}  # what fairseq's fast sync does
    with fairseq_metrics.aggregate() as agg:
        criterion.__class__.reduce_metrics([summed])
    values = agg.get_smoothed_values()
    ntokens = log_a["ntokens"] + log_b["ntokens"]
    assert values["nll_loss"] == pytest.approx(
        float(log_a["nll_loss"] + log_b["nll_loss"]) / ntokens / math.log(2), abs=1e-3)
    assert values["ppl"] == pytest.approx(2 ** values["nll_loss"], rel=1e-2)
    normalizer = log_a["normalizer"] + log_b["normalizer"]
    assert values["hits_at_1"] == pytest.approx(
        (log_a["hits_at_1"] + log_b["hits_at_1"]) / normalizer, abs=1e-4)
    assert values["median_target_rank"] == pytest.approx(
        (log_a["median_target_rank"] + log_b["median_target_rank"]) / 2, abs=1e-3)


def original_sequence_step(model, prefixes, completion_length):
    """The original's computation: greedy continuation through the incremental
    decoder with gradients kept, in evaluation mode."""
    model.eval()
    state = {}
    for step in range(1, prefixes.size(1)):
        model.decoder(prefixes[:, :step], incremental_state=state)
    context, tokens, lprobs = prefixes, [], []
    for _ in range(completion_length):
        out = model.decoder(context, incremental_state=state)
        lp = model.get_normalized_probs((out[0][:, -1:], out[1]), log_probs=True)[:, -1]
        token = lp.argmax(dim=1, keepdim=True)
        tokens.append(token)
        lprobs.append(lp)
        context = torch.cat((context, token), 1)
    return torch.cat(tokens, 1), torch.stack(lprobs, 1)


def test_sequence_criterion_matches_incremental_decoding(data_bin):
    _, task, model, criterion = build(
        data_bin, "--task", "language_modeling", "--criterion", "sequence_penalty",
        "--sequence-prefix-length", "8", "--sequence-completion-length", "12",
        "--sequence-ngram-n", "1",
    )
    sample = valid_sample(task)
    model.train()
    loss, _, log = criterion(model, sample)
    model.zero_grad()
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert model.training  # the mode is restored after the step

    # 64 // (8 + 12) = 3 prefixes, from the start of the first row
    prefixes = sample["net_input"]["src_tokens"].reshape(-1, 8)[:3]
    model.zero_grad()
    tokens, lprobs = original_sequence_step(model, prefixes, 12)
    mask = ngram_repeat_mask(tokens, 1).to(lprobs.dtype)
    p = lprobs.gather(2, tokens.unsqueeze(2)).squeeze(2).exp()
    reference = (-torch.log(torch.clamp(1 - p, min=1e-20)) * mask).sum()
    reference.backward()
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-4, abs=1e-6)
    assert log["seq_ntokens"] == 36 and log["seq_nsentences"] == 3
    assert log["seq_repeat_mask"] == float(mask.sum())
    pad = task.target_dictionary.pad()
    for n in (1, 2, 3, 4):
        expected = sum(ngram_metrics(row, pad=pad)[f"pct_repeat_{n}grams"] for row in tokens.tolist())
        assert log[f"seq_pct_repeat_{n}grams"] == pytest.approx(expected)
    for name, param in model.named_parameters():
        if param.grad is not None and name in ours:
            torch.testing.assert_close(ours[name], param.grad, rtol=1e-3, atol=1e-6)


def test_cut_prefixes():
    """As many prefixes as src_len // (prefix + completion), row by row from the
    start of the batch; at least one, shorter when the batch is."""
    from scalegrad.fairseq_plugin.criterions.sequence_penalty import cut_prefixes

    batch = torch.arange(2 * 64).view(2, 64)
    assert cut_prefixes(batch, 16, 48).tolist() == [list(range(16))]
    assert cut_prefixes(batch, 8, 12).tolist() == [list(range(0, 8)), list(range(8, 16)),
                                                   list(range(16, 24))]
    assert cut_prefixes(batch, 30, 4).tolist() == [list(range(30))]  # 64 // 34 = 1
    assert cut_prefixes(batch[:, :40], 16, 48).tolist() == [list(range(16))]
    assert cut_prefixes(batch[:, :10], 16, 48).tolist() == [list(range(10))]


class _BackwardOnly:
    """Stands in for fairseq's optimizer in ``task.train_step``."""

    def backward(self, loss):
        loss.backward()


def test_task_mixes_steps_with_constant_keys(data_bin):
    _, task, model, criterion = build(
        data_bin, "--task", "language_modeling_with_generation", "--criterion", "scalegrad",
        "--sequence-level-train-rate", "0.5", "--compute-metrics-interval", "2",
        "--sequence-prefix-length", "8", "--sequence-completion-length", "8",
    )
    sample = valid_sample(task)
    logs = [task.train_step(sample, model, criterion, _BackwardOnly(), update_num=u)[2]
            for u in range(8)]
    kinds = ["seq" if log["seq_sample_size"] > 0 else "main" for log in logs]
    assert "seq" in kinds and "main" in kinds
    assert all(list(log) == list(logs[0]) for log in logs)
    # main steps: metrics on every 2nd one; sequence steps: main keys zero
    main_logs = [log for log, kind in zip(logs, kinds) if kind == "main"]
    assert [log["normalizer"] > 0 for log in main_logs] == [(i + 1) % 2 == 0 for i in range(len(main_logs))]
    for log, kind in zip(logs, kinds):
        if kind == "seq":
            assert log["sample_size"] == 0 and log["loss"] == 0 and log["seq_loss"] >= 0
    # the draw depends on (seed, update, micro-batch) only
    _, task2, _, _ = build(
        data_bin, "--task", "language_modeling_with_generation", "--criterion", "scalegrad",
        "--sequence-level-train-rate", "0.5",
    )
    assert [task2._sequence_step_drawn(u) for u in range(8)] == [k == "seq" for k in kinds]
    # reduce: both criteria's values are logged, and a sequence-only update works
    with fairseq_metrics.aggregate() as agg:
        task.reduce_metrics(logs, criterion)
    assert {"loss", "nll_loss", "ppl", "seq_loss", "seq_pct_repeat_4grams", "hits_at_1"} <= set(
        agg.get_smoothed_values())
    seq_only = [log for log, kind in zip(logs, kinds) if kind == "seq"]
    with fairseq_metrics.aggregate() as agg:
        task.reduce_metrics(seq_only, criterion)
    assert "seq_loss" in agg.get_smoothed_values()


def test_task_with_a_fairseq_criterion(data_bin):
    """Any criterion works as the main one; the logging keys stay constant."""
    _, task, model, criterion = build(
        data_bin, "--task", "language_modeling_with_generation", "--criterion", "cross_entropy",
        "--sequence-level-train-rate", "0.5",
        "--sequence-prefix-length", "8", "--sequence-completion-length", "8",
    )
    sample = valid_sample(task)
    logs = [task.train_step(sample, model, criterion, _BackwardOnly(), update_num=u)[2]
            for u in range(6)]
    assert all(list(log) == list(logs[0]) for log in logs)
    assert {log["seq_sample_size"] > 0 for log in logs} == {True, False}
    with fairseq_metrics.aggregate() as agg:
        task.reduce_metrics(logs, criterion)
    assert {"loss", "ppl", "seq_loss"} <= set(agg.get_smoothed_values())


def test_transformer_lm_ul_architecture(data_bin):
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [data_bin, "--task", "language_modeling",
                                                "--arch", "transformer_lm_ul"])
    assert args.decoder_layers == 16 and args.decoder_attention_heads == 8
    assert args.decoder_embed_dim == 1024 and args.decoder_ffn_embed_dim == 4096
    assert (args.dropout, args.attention_dropout, args.activation_dropout) == (0.1, 0.0, 0.1)
    assert args.no_decoder_final_norm is False and args.tie_adaptive_proj is True
    args = options.parse_args_and_arch(options.get_training_parser(),
                                       [data_bin, "--task", "language_modeling",
                                        "--arch", "transformer_lm_ul", "--decoder-layers", "2"])
    assert args.decoder_layers == 2


@pytest.mark.parametrize("extra, option", [
    (["--criterion", "scalegrad", "--gamma", "0"], "--gamma"),
    (["--criterion", "scalegrad", "--gamma", "-0.5"], "--gamma"),
    (["--criterion", "scalegrad", "--compute-metrics-interval", "-1"], "--compute-metrics-interval"),
    (["--criterion", "candidate_penalty_cross_entropy", "--rank-alpha", "-1"], "--rank-alpha"),
    (["--criterion", "sequence_penalty", "--sequence-ngram-n", "0"], "--sequence-ngram-n"),
    (["--criterion", "sequence_penalty", "--mask-p", "1.5"], "--mask-p"),
])
def test_bad_criterion_options_name_the_option(data_bin, extra, option):
    with pytest.raises(ValueError, match=option):
        build(data_bin, "--task", "language_modeling", *extra)


def test_bad_task_option_names_the_option(data_bin):
    with pytest.raises(ValueError, match="--sequence-level-train-rate"):
        build(data_bin, "--task", "language_modeling_with_generation",
              "--sequence-level-train-rate", "1.5")


def test_gamma_above_one_warns(data_bin, caplog, recwarn):
    with caplog.at_level("WARNING"):
        build(data_bin, "--task", "language_modeling", "--criterion", "scalegrad", "--gamma", "1.5")
    assert "gamma" in caplog.text or any("gamma" in str(w.message) for w in recwarn)


# --------------------------------------------------------------------------- #
# fairseq-train runs
# --------------------------------------------------------------------------- #

def fairseq_train(data_bin, *args, user_dir=PACKAGE_DIR, check=True, timeout=240):
    """Run fairseq-train; returns (returncode, output, json records by kind)."""
    command = [sys.executable, "-m", "fairseq_cli.train", data_bin, "--user-dir", str(user_dir),
               *TINY_MODEL, *TRAIN, *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env(), cwd=str(Path(data_bin).parent))
    output = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise AssertionError(f"fairseq-train failed ({proc.returncode}):\n{output[-4000:]}")
    return proc.returncode, output, parse_json_logs(output)


def parse_json_logs(output):
    records = {"train_inner": [], "train": [], "valid": []}
    for line in output.splitlines():
        for kind in records:
            marker = f"| {kind} | {{"
            if marker in line:
                records[kind].append(json.loads(line[line.index(marker) + len(marker) - 1:]))
    return records


def losses(records):
    return [float(r["loss"]) for r in records["train_inner"] if r.get("loss") not in (None, "-1")]


METRIC_KEYS = set(RANKING_METRIC_NAMES)


@pytest.mark.slow
def test_train_scalegrad(data_bin):
    _, _, logs = fairseq_train(
        data_bin, "--task", "language_modeling", "--arch", "transformer_lm",
        "--criterion", "scalegrad", "--gamma", "0.2", "--compute-metrics-interval", "3",
        "--max-update", "8",
    )
    train = logs["train_inner"]
    assert len(train) == 8
    assert {"loss", "nll_loss", "ppl"} <= set(train[0])
    computed = [r for r in train if r.get("hits_at_1") is not None]
    assert [int(r["num_updates"]) for r in computed] == [3, 6]
    assert METRIC_KEYS <= set(computed[0])
    values = losses(logs)
    assert sum(values[-2:]) < sum(values[:2])
    valid = logs["valid"][-1]
    assert {"valid_loss", "valid_nll_loss", "valid_ppl"} | {f"valid_{k}" for k in METRIC_KEYS} <= set(valid)
    assert float(valid["valid_ppl"]) == pytest.approx(2 ** float(valid["valid_nll_loss"]), rel=1e-2)


@pytest.mark.slow
def test_gamma_one_matches_cross_entropy_from_a_copy(data_bin, tmp_path):
    """ScaleGrad with gamma = 1 is maximum likelihood (up to the 1e-8
    smoothing): same seed, same first update's loss as fairseq's cross_entropy.

    The plugin runs from a copy dropped into a fairseq checkout as
    ``fairseq/custom`` (``--user-dir $FAIRSEQ_DIR/fairseq/custom``, beside
    fairseq's own package entries, which fairseq then puts on ``sys.path``): the
    relative imports make it work under its new name.
    """
    _, copy = make_fairseq_checkout(tmp_path / "fairseq_checkout", PACKAGE_DIR)
    common = ["--task", "language_modeling", "--arch", "transformer_lm", "--max-update", "2"]
    _, _, ce = fairseq_train(data_bin, *common, "--criterion", "cross_entropy")
    # no --compute-metrics-interval: outside language_modeling_with_generation the
    # token metrics come at every step, as the original's criteria computed them
    _, output, sg = fairseq_train(data_bin, *common, "--criterion", "scalegrad", "--gamma", "1",
                                  user_dir=copy)
    assert "criterion: ScaleGradCriterion" in output
    first_ce = float(ce["train_inner"][0]["loss"])
    assert float(sg["train_inner"][0]["loss"]) == pytest.approx(first_ce, abs=2e-3)
    assert float(sg["train_inner"][0]["nll_loss"]) == pytest.approx(first_ce, abs=1e-3)
    assert float(sg["valid"][-1]["valid_loss"]) == pytest.approx(
        float(ce["valid"][-1]["valid_loss"]), abs=2e-3)
    assert all(METRIC_KEYS <= set(record) for record in sg["train_inner"])


@pytest.mark.slow
def test_train_task_with_sequence_level_steps(data_bin):
    """The unlikelihood module's command line (--candidate-type prev_context,
    --rank-alpha) with sequence-level steps mixed in."""
    _, _, logs = fairseq_train(
        data_bin, "--task", "language_modeling_with_generation", "--arch", "transformer_lm_ul",
        "--decoder-input-dim", "64", "--decoder-output-dim", "64",
        "--criterion", "candidate_penalty_cross_entropy", "--candidate-type", "prev_context",
        "--rank-alpha", "1.0", "--sequence-level-train-rate", "0.5",
        "--sequence-ngram-n", "2", "--sequence-prefix-length", "8",
        "--sequence-completion-length", "16", "--compute-metrics-interval", "1",
        "--max-update", "6",
    )
    train = logs["train_inner"]
    seq = [r for r in train if r.get("seq_loss") is not None]
    main = [r for r in train if r.get("custom_loss") is not None]
    assert seq and main
    assert len(seq) + len(main) == len(train) == 6
    assert {"seq_loss", "seq_repeat_mask", "seq_pct_repeat_1grams", "seq_pct_repeat_4grams",
            "seq_ntokens", "seq_nsentences", "seq_sample_size"} <= set(seq[0])
    assert "seq_nll_loss" not in seq[0]
    # 64 // (8 + 16) = 2 continuations of 16 tokens per micro-batch
    assert all(float(r["seq_ntokens"]) == 16 * float(r["seq_nsentences"]) for r in seq)
    assert all(math.isfinite(float(r["seq_loss"])) for r in seq)
    assert METRIC_KEYS <= set(main[0]) and main[0]["hits_at_1"] is not None
    assert {"valid_loss", "valid_custom_loss", "valid_hits_at_1"} <= set(logs["valid"][-1])


@pytest.mark.slow
def test_train_sequence_penalty_criterion(data_bin):
    _, _, logs = fairseq_train(
        data_bin, "--task", "language_modeling", "--arch", "transformer_lm",
        "--criterion", "sequence_penalty", "--sequence-prefix-length", "8",
        "--sequence-completion-length", "16", "--sequence-candidate-type", "random",
        "--mask-p", "0.5", "--max-update", "3",
    )
    train = logs["train_inner"]
    assert len(train) == 3
    assert {"loss", "seq_loss", "seq_repeat_mask", "seq_pct_repeat_4grams", "seq_ntokens",
            "seq_nsentences", "seq_sample_size"} <= set(train[0])
    assert float(train[0]["seq_sample_size"]) == float(train[0]["seq_ntokens"]) == 16 * float(
        train[0]["seq_nsentences"])
    assert 0.0 < float(train[0]["seq_repeat_mask"]) < 1.0
    assert "valid_seq_loss" in logs["valid"][-1]


@pytest.mark.slow
def test_bad_option_fails_naming_it(data_bin):
    code, output, _ = fairseq_train(
        data_bin, "--task", "language_modeling", "--arch", "transformer_lm",
        "--criterion", "scalegrad", "--gamma", "0", "--max-update", "1", check=False,
    )
    assert code != 0
    assert "--gamma" in output.strip().splitlines()[-1]


@pytest.mark.slow
def test_distributed_cpu_two_workers(data_bin, tmp_path):
    """fairseq's distributed training on the CPU (gloo, two processes, two
    micro-batches per update), with sequence-level steps mixed in: the summed
    logging outputs of both workers are reduced. (fairseq's pytorch_ddp
    backend passes device_ids to DistributedDataParallel, which torch rejects
    on the CPU; legacy_ddp, the original's no_c10d, works.)"""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [
        "--task", "language_modeling_with_generation", "--arch", "transformer_lm",
        "--criterion", "cross_entropy_wcustom_metrics", "--sequence-level-train-rate", "0.5",
        "--sequence-prefix-length", "8", "--sequence-completion-length", "8",
        "--compute-metrics-interval", "2", "--max-update", "4", "--update-freq", "2",
        "--distributed-world-size", "2", "--distributed-backend", "gloo",
        "--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-no-spawn",
        "--ddp-backend", "legacy_ddp",
    ]
    procs = []
    for rank in (0, 1):
        command = [sys.executable, "-m", "fairseq_cli.train", data_bin, "--user-dir",
                   str(PACKAGE_DIR), *TINY_MODEL, *TRAIN, *args, "--distributed-rank", str(rank)]
        procs.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, env=subprocess_env()))
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    logs = parse_json_logs(outputs[0])
    train = logs["train_inner"]
    assert len(train) == 4
    # an update of sequence-level steps only logs no main loss (fairseq shows -1)
    main = [r for r in train if r.get("loss") not in (None, "-1")]
    assert main and all(float(r["wpb"]) > 512 for r in main)  # summed over the workers
    assert any(r.get("hits_at_1") is not None for r in main)
    assert any(r.get("seq_loss") is not None for r in train)
    assert {"valid_loss", "valid_ppl", "valid_hits_at_1"} <= set(logs["valid"][-1])


@pytest.mark.slow
def test_hydra_train_config(data_bin, tmp_path):
    """configs/fairseq/transformer_lm_ul_scalegrad.yaml through
    fairseq-hydra-train, shrunk to a tiny model (the plugin's model and task
    keys are unknown to hydra until the user dir is imported: hence ``++``)."""
    command = [
        sys.executable, "-m", "fairseq_cli.hydra_train",
        "--config-dir", str(REPO / "configs" / "fairseq"),
        "--config-name", "transformer_lm_ul_scalegrad",
        f"task.data={data_bin}", f"common.user_dir={PACKAGE_DIR}", "common.fp16=false",
        "common.cpu=true", "common.log_interval=1", "task.tokens_per_sample=64",
        "task.compute_metrics_interval=2", "dataset.max_tokens=512", "++dataset.num_workers=0",
        "++model.decoder_layers=2", "++model.decoder_embed_dim=64",
        "++model.decoder_ffn_embed_dim=128", "++model.decoder_attention_heads=2",
        "++model.decoder_input_dim=64", "++model.decoder_output_dim=64",
        "optimization.max_update=3", "optimization.update_freq=[1]", "optimization.lr=[0.005]",
        "lr_scheduler.warmup_updates=0", "++checkpoint.no_save=true",
        f"hydra.run.dir={tmp_path}",
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=240,
                          env=subprocess_env(), cwd=str(tmp_path))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    records = []
    for line in output.splitlines():
        if "[train_inner]" in line and " - {" in line:
            records.append(json.loads(line[line.index(" - {") + 3:]))
    assert len(records) == 3
    assert {"loss", "nll_loss", "ppl"} <= set(records[0])
    assert records[1].get("hits_at_1") is not None  # the interval comes from the task
    assert "criterion: ScaleGradCriterion" in output
