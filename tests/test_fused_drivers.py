"""``--fused-loss`` in both drivers: the ScaleGrad loss from the final hidden states
and the output embedding (``scalegrad.fused``) instead of the full logits.

GPT-2 driver: training steps with and without the flag give the same losses, the
same logged metrics and the same weights (float32 and bf16 autocast); a model
whose logits are not ``hidden @ W.T`` is refused with a UserError naming the flag;
under torchrun: ``tests/test_gpt2_distributed.py``.

fairseq: the ``scalegrad`` criterion with ``--fused-loss`` on ``gpt2_pretrained``
gives the same loss, gradients, ``nll_loss`` and token metrics as without, on a
batch with padding; any other model falls back to the logits with one warning.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scalegrad.data import load_chunks, load_split, save_split, split_path
from scalegrad.errors import UserError
from scalegrad.gpt2.driver import run
from scalegrad.gpt2.options import parse_args
from scalegrad.gpt2.runtime import Runtime
from scalegrad.fused import chunked_logit_statistics
from scalegrad.gpt2.objectives import check_fused_model, fused_token_loss, token_loss
from scalegrad.hf import check_linear_head
from scalegrad.metrics import ranking_metrics, ranking_metrics_from_ranks
from tests import helpers

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def short_data_base(tiny_data_base, tmp_path_factory):
    """18 training chunks of 32 + 1 tokens; short valid and test splits."""
    path = tmp_path_factory.mktemp("fused_data")
    for split, size in {"train": 600, "valid": 1300, "test": 1300}.items():
        save_split(load_split(split_path(tiny_data_base, split))[:size], split_path(path, split))
    return str(path)


def train_argv(data_base, output_dir, model_dir, *extra):
    return ["--mode", "train", "--data-base", str(data_base), "--output-dir", str(output_dir),
            "--model-load-dir", str(model_dir), "--model-name", "tiny", "--no-progress",
            "--eval-split", "valid", "--batch-size-singletoken", "200",
            "--train-batch-size", "32", "--learning-rate", "1e-3", "--validate-every", "1000",
            "--save-every", "1000", "--report-metrics-every", "1", "--exact-train-n-steps",
            *map(str, extra)]


def train_steps(argv):
    """Run the driver in-process: (the report after every step, the final weights)."""
    reports = []
    result = run(parse_args(argv),
                 on_step=lambda trainer: reports.append(dict(trainer.last_report)))
    assert result.train.status == "finished"
    output_dir = Path(argv[argv.index("--output-dir") + 1])
    return reports, load_file(str(output_dir / "model.safetensors"))


def assert_reports_match(plain, fused, *, loss_rel):
    assert len(plain) == len(fused) and plain
    for step, (a, b) in enumerate(zip(plain, fused)):
        assert a.keys() == b.keys(), step
        for key in a:
            if key in ("loss", "ppl"):
                assert b[key] == pytest.approx(a[key], rel=loss_rel), (step, key)
            else:  # ranks, hits, repeats, counts: from the same logits
                assert b[key] == pytest.approx(a[key], abs=1e-9), (step, key)


def max_weight_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# --------------------------------------------------------------------------- #
# GPT-2 driver
# --------------------------------------------------------------------------- #

def test_driver_fused_equals_plain(tiny_model_dir, short_data_base, tmp_path, monkeypatch):
    """3 updates of 2 chunks (gradient accumulation), dropout on, clipping, gamma 0.5;
    chunks of 7 positions (the 32 of a chunk do not divide evenly)."""
    from scalegrad.gpt2 import objectives

    calls = []
    fused_loss = objectives.fused_linear_scalegrad_loss
    monkeypatch.setattr(objectives, "fused_linear_scalegrad_loss",
                        lambda *a, **k: calls.append(k["chunk_size"]) or fused_loss(*a, **k))
    common = ["--train-n-steps", 3, "--gradient-accumulation-steps", 2, "--gamma", 0.5,
              "--enable-dropout", "--max-grad-norm", 1.0]
    plain, plain_weights = train_steps(train_argv(short_data_base, tmp_path / "plain",
                                                  tiny_model_dir, *common))
    fused, fused_weights = train_steps(train_argv(short_data_base, tmp_path / "fused",
                                                  tiny_model_dir, *common, "--fused-loss",
                                                  "--fused-chunk-size", 7))
    assert len(plain) == 3 and calls == [7] * 6
    assert_reports_match(plain, fused, loss_rel=1e-5)
    assert max_weight_diff(plain_weights, fused_weights) < 1e-5
    # The weights moved (the comparison means something).
    start = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    assert max_weight_diff(start, plain_weights) > 1e-4


def test_driver_fused_bf16_autocast(tiny_model_dir, short_data_base, tmp_path):
    common = ["--train-n-steps", 1, "--gamma", 0.5, "--bf16"]
    plain, _ = train_steps(train_argv(short_data_base, tmp_path / "plain", tiny_model_dir, *common))
    fused, _ = train_steps(train_argv(short_data_base, tmp_path / "fused", tiny_model_dir, *common,
                                      "--fused-loss", "--fused-chunk-size", 10))
    # The same first step (the weights after it: see the next test, on the gradients).
    assert_reports_match(plain, fused, loss_rel=1e-5)


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["float32", "bf16"])
def test_fused_token_loss_equals_token_loss(tiny_tokenizer, tiny_data_base, amp):
    """One chunk of 200 + 1 through the driver's loss functions: the same loss (float32),
    logging output and gradients; under bf16 autocast both paths run the head's matmuls
    in bfloat16, each rounding differently, so the gradients agree to bf16 precision."""
    model = helpers.build_tiny_model(len(tiny_tokenizer))
    chunk = load_chunks(tiny_data_base, "train", 200)[0]
    runtime = Runtime(device=torch.device("cpu"), amp_dtype=amp)
    outputs = []
    for loss_fn in (lambda: token_loss(model, chunk, 0.5, runtime),
                    lambda: fused_token_loss(model, chunk, 0.5, runtime, 64)):
        model.zero_grad(set_to_none=True)
        loss, log = loss_fn()
        loss.backward()
        assert loss.dtype == torch.float32
        outputs.append((loss.item(), log, {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, log_a, grads_a), (loss_b, log_b, grads_b) = outputs
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert log_a.keys() == log_b.keys()
    assert all(log_b[key] == pytest.approx(log_a[key], rel=1e-5) for key in log_a)
    tolerance = 1e-5 if amp is None else 3e-2
    for name in grads_a:
        scale = grads_a[name].abs().max().item()
        assert (grads_a[name] - grads_b[name]).abs().max().item() <= tolerance * scale, name


def test_logging_helpers_equal_ranking_metrics():
    """The chunk-wise statistics give ranking_metrics' dictionary, key for key."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 50, 8, generator=generator)
    weight = torch.randn(30, 8, generator=generator)
    bias = torch.randn(30, generator=generator)
    target = torch.randint(0, 30, (1, 50), generator=generator)
    logits = torch.nn.functional.linear(hidden, weight, bias)[0]
    stats = chunked_logit_statistics(hidden, weight, bias, target, 7)
    assert torch.allclose(stats["nll"], torch.nn.functional.cross_entropy(
        logits, target[0], reduction="none"), atol=1e-5)
    expected = ranking_metrics(logits, target[0], ntokens=50)
    assert ranking_metrics_from_ranks(stats["higher"], stats["predictions"], target[0],
                                      ntokens=50) == expected


def test_models_whose_logits_are_not_the_head_are_refused(tiny_tokenizer, tiny_data_base,
                                                          tmp_path):
    ids = load_chunks(tiny_data_base, "valid", 16)[:1, :16]
    model = helpers.build_tiny_model(len(tiny_tokenizer))
    base, head = check_linear_head(model, ids)  # GPT-2 passes
    assert base is model.transformer and head is model.lm_head
    assert model.training is False
    # A step after the head (a forward hook of the model scaling its logits).
    def scale_logits(module, inputs, output):
        output["logits"] = output["logits"] * 2
        return output

    handle = model.register_forward_hook(scale_logits)
    with pytest.raises(UserError, match="--fused-loss.*transforms them"):
        check_fused_model(model, ids, "scaled")
    handle.remove()
    # A head that is not a linear layer.
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(UserError, match="--fused-loss.*not a linear layer"):
        check_fused_model(model, ids, "wrapped")

    # A real soft-capped model (Gemma 2), through the driver: refused before any file.
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=len(tiny_tokenizer), hidden_size=16, intermediate_size=32,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                          head_dim=8, max_position_embeddings=256, final_logit_softcapping=30.0)
    gemma_dir = tmp_path / "gemma"
    Gemma2ForCausalLM(config).save_pretrained(gemma_dir)
    tiny_tokenizer.save_pretrained(gemma_dir)
    out = tmp_path / "out"
    with pytest.raises(UserError, match="--fused-loss.*Gemma2ForCausalLM.*soft-capping"):
        run(parse_args(train_argv(tiny_data_base, out, gemma_dir, "--train-n-steps", 1,
                                  "--fused-loss")))
    assert not out.exists()


def test_fused_chunk_size_is_checked(tiny_data_base, tmp_path):
    with pytest.raises(UserError, match="--fused-chunk-size"):
        parse_args(train_argv(tiny_data_base, tmp_path, tmp_path, "--fused-loss",
                              "--fused-chunk-size", 0))


# --------------------------------------------------------------------------- #
# fairseq criterion
# --------------------------------------------------------------------------- #

FAIRSEQ_ARGS = [
    "--task", "gpt2_language_modeling", "--arch", "gpt2_pretrained", "--criterion", "scalegrad",
    "--gamma", "0.2", "--tokens-per-sample", "64", "--batch-size", "4", "--cpu",
    "--optimizer", "adam", "--lr", "0.002", "--dropout", "0", "--attention-dropout", "0",
    "--num-workers", "0", "--seed", "1", "--compute-metrics-interval", "1",
]


@pytest.fixture(scope="module")
def fairseq_built(tiny_data_base, tiny_model_dir):
    pytest.importorskip("fairseq")
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    import scalegrad

    # scalegrad was imported before fairseq here, so --user-dir finds it in sys.modules
    # and registers nothing: register it as a --user-dir import would.
    scalegrad.register_fairseq()
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        tiny_data_base, "--user-dir", str(REPO / "scalegrad"), "--pretrained-model",
        tiny_model_dir, *FAIRSEQ_ARGS, "--fused-loss", "--fused-chunk-size", "37"])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    fused = task.build_criterion(cfg.criterion)
    assert fused.fused_loss and fused.fused_chunk_size == 37
    cfg.criterion.fused_loss = False
    plain = task.build_criterion(cfg.criterion)
    assert not plain.fused_loss
    return task, model, plain, fused


def padded_sample(task):
    """Three chunks of 64; the last row's final 9 positions are padding."""
    pad = task.target_dictionary.pad()
    chunks = load_chunks(task.args.data, "valid", 64)[:3]
    source, target = chunks[:, :-1].clone(), chunks[:, 1:].clone()
    source[-1, -9:] = pad
    target[-1, -9:] = pad
    return {"net_input": {"src_tokens": source, "src_lengths": torch.full((3,), 64)},
            "target": target, "ntokens": int((target != pad).sum()), "id": torch.arange(3)}


def loss_and_grads(criterion, model, sample):
    model.zero_grad(set_to_none=True)
    loss, sample_size, log = criterion(model, sample)
    loss.backward()
    grads = {name.replace("module.", ""): p.grad.clone()  # wrappers add module. prefixes
             for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), sample_size, log, grads


def assert_same_outputs(plain_out, fused_out):
    loss_a, size_a, log_a, grads_a = plain_out
    loss_b, size_b, log_b, grads_b = fused_out
    assert size_a == size_b
    assert loss_b.item() == pytest.approx(loss_a.item(), rel=1e-5)
    assert list(log_a) == list(log_b)  # fairseq sums logging outputs key by key
    for key in log_a:
        assert float(log_b[key]) == pytest.approx(float(log_a[key]), rel=1e-5, abs=1e-9), key
    assert log_a["normalizer"] > 0  # the metrics were computed
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        scale = max(grads_a[name].abs().max().item(), 1e-3)
        assert (grads_a[name] - grads_b[name]).abs().max().item() <= 1e-5 * scale, name


def test_fairseq_criterion_fused_equals_plain(fairseq_built, caplog):
    task, model, plain, fused = fairseq_built
    sample = padded_sample(task)
    model.train()
    with caplog.at_level(logging.WARNING):
        expected = loss_and_grads(plain, model, sample)
        got = loss_and_grads(fused, model, sample)
    assert fused._fused_allowed and "ignored" not in caplog.text
    assert_same_outputs(expected, got)
    # Validation (evaluation mode, no gradients): the same logging outputs.
    model.eval()
    with torch.no_grad():
        _, _, log_a = plain(model, sample)
        _, _, log_b = fused(model, sample)
    model.train()
    assert list(log_a) == list(log_b) and log_a["normalizer"] > 0
    for key in log_a:
        assert float(log_b[key]) == pytest.approx(float(log_a[key]), rel=1e-5, abs=1e-9), key
    # Through distributed wrappers (as fairseq wraps the model): the fused path still applies.
    from fairseq.distributed import ModuleProxyWrapper

    class Wrapper(torch.nn.Module):  # stands in for DistributedDataParallel
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    wrapped = ModuleProxyWrapper(Wrapper(model))
    assert_same_outputs(expected, loss_and_grads(fused, wrapped, sample))
    assert fused._fused_allowed and fused._fused_model is model


def test_fairseq_criterion_falls_back_with_one_warning(fairseq_built, caplog):
    task, model, plain, fused = fairseq_built
    from fairseq.models import FairseqLanguageModel

    class OtherModel(FairseqLanguageModel):  # any model that is not gpt2_pretrained
        pass

    other = OtherModel(model.decoder)
    sample = padded_sample(task)
    other.train()
    expected = loss_and_grads(plain, other, sample)
    with caplog.at_level(logging.WARNING):
        first = loss_and_grads(fused, other, sample)
        loss_and_grads(fused, other, sample)
    assert caplog.text.count("--fused-loss (criterion.fused_loss) ignored") == 1
    assert "OtherModel, neither --arch gpt2_pretrained nor a transformer language model" in caplog.text
    assert_same_outputs(expected, first)
