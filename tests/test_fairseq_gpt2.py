"""The fairseq GPT-2 route: task ``gpt2_language_modeling``, architecture
``gpt2_pretrained``, ``scripts/evaluate_fairseq.py``, ``scripts/export_fairseq_to_hf.py``
and the hydra configs ``configs/fairseq/gpt2_*.yaml``.

Everything runs on the tiny GPT-2 and data of conftest.py. The fairseq runs
(marked slow, seconds each) are: one single-process ``fairseq-train``, its resume,
and one two-process CPU run (gloo) through ``fairseq-hydra-train`` with the
shipped config, which must end with the same weights as the single process run
with ``--update-freq 2`` (the same two batches per update). The in-process tests
check ids and padding, the model against the Hugging Face model, incremental
decoding and beam search, the data-bin input, the export, the cross-check with
``run_gpt2.py`` and the report table.
"""

import csv
import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("fairseq")

from fairseq import checkpoint_utils, options, tasks  # noqa: E402
from fairseq.data import Dictionary  # noqa: E402
from fairseq.data import indexed_dataset  # noqa: E402
from fairseq.dataclass.utils import convert_namespace_to_omegaconf  # noqa: E402

from scalegrad import data, register_fairseq  # noqa: E402
from scalegrad.errors import UserError  # noqa: E402
from scalegrad.fairseq_plugin.checkpoints import export_to_hf  # noqa: E402
from scalegrad.fairseq_plugin.gpt2_results import (  # noqa: E402
    beam_completions,
    completion_prefixes,
    sampled_completions,
)
from scalegrad.fairseq_plugin.loading import load_model  # noqa: E402
from scalegrad.hf import hf_config_from_dict  # noqa: E402
from scalegrad.losses import scalegrad_loss  # noqa: E402
from scalegrad.metrics import ngram_metrics  # noqa: E402
from scalegrad.fairseq_plugin.tasks.gpt2_language_modeling import greedy_completions  # noqa: E402

register_fairseq()

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO / "scalegrad"
SMALL_EVAL_SPLIT = 3000  # valid/test tokens: 46 chunks of 64 + 1
P, C = 16, 8  # prefix and continuation lengths of the completion checks

COMMON = [
    "--task", "gpt2_language_modeling", "--arch", "gpt2_pretrained",
    "--criterion", "scalegrad", "--gamma", "0.2", "--tokens-per-sample", "64",
    "--batch-size", "4", "--cpu", "--optimizer", "adam", "--adam-betas", "(0.9, 0.999)",
    "--adam-eps", "1e-8", "--weight-decay", "0.01", "--lr-scheduler", "fixed", "--lr", "0.002",
    "--dropout", "0", "--attention-dropout", "0", "--validate-interval-updates", "2",
    "--save-interval-updates", "2", "--log-format", "json", "--log-interval", "1",
    "--no-progress-bar", "--num-workers", "0", "--seed", "1", "--eval-completion",
    "--eval-prefix-length", str(P), "--eval-continuation-length", str(C),
    "--compute-metrics-interval", "2", "--required-batch-size-multiple", "1",
    "--best-checkpoint-metric", "ppl",
]


def subprocess_env():
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_logs(output: str) -> dict:
    """json log records by kind, from fairseq-train (``| kind | {``) or hydra
    (``[kind][INFO] - {``) output."""
    records = {"train_inner": [], "train": [], "valid": []}
    for line in output.splitlines():
        for kind in records:
            for marker in (f"| {kind} | {{", f"[{kind}][INFO] - {{"):
                if marker in line:
                    records[kind].append(json.loads(line[line.index(marker) + len(marker) - 1:]))
    return records


def fairseq_train(*args, timeout=300):
    command = [sys.executable, "-m", "fairseq_cli.train", *map(str, args)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env())
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"fairseq-train failed:\n{output[-4000:]}"
    return output, parse_logs(output)


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def state_max_diff(path_a, path_b) -> float:
    a = torch.load(path_a, map_location="cpu", weights_only=True)["model"]
    b = torch.load(path_b, map_location="cpu", weights_only=True)["model"]
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# --------------------------------------------------------------------------- #
# Fixtures
# --------------------------------------------------------------------------- #

@pytest.fixture(scope="module")
def gpt2_data(tiny_data_base, tmp_path_factory):
    """The tiny splits: all of train, the first tokens of valid and test (fast to evaluate)."""
    path = tmp_path_factory.mktemp("gpt2_data")
    for split in data.SPLITS:
        tokens = data.load_split(data.split_path(tiny_data_base, split))
        if split != "train":
            tokens = tokens[:SMALL_EVAL_SPLIT]
        data.save_split(tokens, data.split_path(path, split))
    return str(path)


def build(data_dir, model_dir, *extra):
    """(cfg, task, model, criterion) as fairseq-train builds them."""
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        data_dir, "--user-dir", str(PACKAGE_DIR), "--pretrained-model", model_dir, *COMMON, *extra])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    return cfg, task, model.eval(), criterion


@pytest.fixture(scope="module")
def built(gpt2_data, tiny_model_dir):
    return build(gpt2_data, tiny_model_dir)


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def trained(gpt2_data, tiny_model_dir, tmp_path_factory):
    """fairseq-train, one process, 4 updates of 2 batches of 4 chunks (``--update-freq 2``)."""
    save_dir = tmp_path_factory.mktemp("fairseq_gpt2") / "ckpt"
    output, logs = fairseq_train(gpt2_data, "--user-dir", PACKAGE_DIR, "--pretrained-model",
                                 tiny_model_dir, *COMMON, "--update-freq", "2", "--max-update", "4",
                                 "--save-dir", save_dir)
    return {"save_dir": save_dir, "output": output, "logs": logs}


@pytest.fixture(scope="module")
def loaded(trained, gpt2_data):
    return load_model(trained["save_dir"] / "checkpoint_last.pt", gpt2_data)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported") / "hf"
    export_to_hf(trained["save_dir"] / "checkpoint_last.pt", out)
    return out


# --------------------------------------------------------------------------- #
# Ids, padding, the model
# --------------------------------------------------------------------------- #

def test_dictionary_ids_unchanged_and_padding_outside(built, tiny_model_dir, gpt2_data):
    cfg, task, model, _ = built
    dictionary = task.target_dictionary
    vocab = model.hf_model.config.vocab_size
    assert len(dictionary) == vocab + 1 and dictionary.pad() == vocab == dictionary.unk()
    assert dictionary.eos() == model.hf_model.config.eos_token_id
    assert [dictionary[i] for i in (0, 7, vocab - 1)] == ["0", "7", str(vocab - 1)]
    # The chunks are the GPT-2 driver's: chunks of n + 1 ids, unchanged.
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    expected = data.load_chunks(gpt2_data, "valid", 64)
    assert len(dataset) == expected.size(0)
    sample = dataset.collater([dataset[i] for i in (3, 0)])
    assert torch.equal(sample["net_input"]["src_tokens"], expected[[3, 0], :-1])
    assert torch.equal(sample["target"], expected[[3, 0], 1:])
    assert sample["ntokens"] == 128 and sample["nsentences"] == 2
    # The hf config (with --dropout 0 --attention-dropout 0 applied) is recorded in the
    # model's config, which fairseq saves with checkpoints; it gives back the same config.
    config = model.hf_model.config
    assert config.resid_pdrop == config.embd_pdrop == config.attn_pdrop == 0.0
    assert hf_config_from_dict(json.loads(cfg.model.hf_config)).to_dict() == config.to_dict()


def test_logits_are_the_hf_models(built, hf_model):
    _, task, model, _ = built
    tokens = data.load_chunks(task.args.data, "valid", 64)[:3, :-1]
    with torch.no_grad():
        logits, extra = model(tokens)
        expected = hf_model(input_ids=tokens).logits
        features, _ = model(tokens, features_only=True)
    assert torch.equal(logits, expected)
    assert torch.allclose(model.decoder.output_layer(features), expected, atol=1e-5)
    lprobs = model.get_normalized_probs((logits, extra), log_probs=True)
    vocab = logits.size(-1)
    assert lprobs.size(-1) == vocab + 1 and torch.isinf(lprobs[..., vocab]).all()
    assert torch.allclose(lprobs[..., :vocab], F.log_softmax(expected, dim=-1))
    probs = model.get_normalized_probs((logits, extra), log_probs=False)
    assert torch.allclose(probs.sum(-1), torch.ones(3, 64)) and (probs[..., vocab] == 0).all()


def test_right_padding_never_reaches_the_embedding(built, hf_model):
    """A padded batch (as another collater could make it): real positions get the
    unpadded logits, and the criterion's loss is ScaleGrad over each row's real tokens."""
    _, task, model, criterion = built
    pad = task.target_dictionary.pad()
    chunks = data.load_chunks(task.args.data, "valid", 64)[:2]
    source, target = chunks[:, :-1].clone(), chunks[:, 1:].clone()
    source[1, 40:] = pad
    target[1, 40:] = pad
    sample = {"net_input": {"src_tokens": source}, "target": target,
              "ntokens": int((target != pad).sum())}
    with torch.no_grad():
        logits = model(source)[0]
        full = hf_model(input_ids=chunks[:, :-1]).logits
        short = hf_model(input_ids=chunks[1:, :40]).logits
        loss, sample_size, log = criterion(model, sample)
    assert torch.equal(logits[0], full[0])
    assert torch.allclose(logits[1, :40], short[0], atol=1e-5)
    expected = (scalegrad_loss(full[:1], chunks[:1, 1:], 0.2)
                + scalegrad_loss(short, chunks[1:, 1:41], 0.2))
    assert sample_size == 64 + 40
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_incremental_decoding_matches_hf_generation(built):
    _, task, model, _ = built
    prefixes = data.make_prefixes(data.load_chunks(task.args.data, "valid", 64)[:3], P)
    from scalegrad.fairseq_plugin.criterions.sequence_penalty import greedy_continuation
    from scalegrad.generation import generate_continuations

    expected = generate_continuations(model.hf_model, prefixes, C)
    with torch.no_grad():
        incremental = greedy_continuation(model, prefixes, C)  # fairseq's incremental_state
    assert torch.equal(incremental, expected[:, P:])
    assert greedy_completions(model, prefixes, C) == expected.tolist()


def test_bad_input_is_one_clear_error(built, tmp_path, tiny_model_dir):
    with pytest.raises(UserError, match="neither"):
        build(str(tmp_path), tiny_model_dir)
    with pytest.raises(UserError, match="does not exist"):
        build(str(tmp_path / "missing"), tiny_model_dir)
    with pytest.raises(ValueError, match="sample-break-mode none"):
        build(built[1].args.data, tiny_model_dir, "--sample-break-mode", "eos")
    with pytest.raises(ValueError, match="eval-prefix-length"):
        build(built[1].args.data, tiny_model_dir, "--eval-prefix-length", "65")


# --------------------------------------------------------------------------- #
# data-bin input
# --------------------------------------------------------------------------- #

def write_frequency_ordered_data_bin(splits, dest, vocab_size):
    """A data-bin whose dict.txt lists the ids by frequency (fairseq's GPT-2 BPE
    data-bins, the unlikelihood release), with </s> after every line of 100 ids."""
    counts = torch.bincount(splits["train"], minlength=vocab_size)
    dictionary = Dictionary()
    for token_id in sorted(range(vocab_size), key=lambda i: (-int(counts[i]), i)):
        dictionary.add_symbol(str(token_id), n=max(int(counts[token_id]), 1))
    dictionary.pad_to_multiple_(8)  # fairseq's madeupword fillers
    dest.mkdir(parents=True)
    dictionary.save(str(dest / "dict.txt"))
    for split, tokens in splits.items():
        builder = indexed_dataset.make_builder(str(dest / f"{split}.bin"), impl="mmap",
                                               vocab_size=len(dictionary))
        for start in range(0, tokens.numel(), 100):
            line = [dictionary.index(str(i)) for i in tokens[start:start + 100].tolist()]
            builder.add_item(torch.tensor(line + [dictionary.eos()], dtype=torch.int32))
        builder.finalize(str(dest / f"{split}.idx"))


def test_data_bin_gives_the_same_ids(gpt2_data, tiny_model_dir, tmp_path):
    splits = {s: data.load_split(data.split_path(gpt2_data, s))[:2000] for s in data.SPLITS}
    prepared = tmp_path / "prepared"
    data.write_fairseq_data_bin(splits, prepared, vocab_size=400, ids_per_line=128)
    frequency = tmp_path / "frequency"
    write_frequency_ordered_data_bin(splits, frequency, 400)
    assert (frequency / "dict.txt").read_text().split()[0] != "0"  # really reordered
    for data_bin in (prepared, frequency):
        _, task, _, _ = build(str(data_bin), tiny_model_dir)
        for split in data.SPLITS:
            assert torch.equal(task.load_tokens(split), splits[split]), (data_bin, split)
        task.load_dataset("valid")
        assert torch.equal(task.dataset("valid").chunks.long(), data.chunk_tokens(splits["valid"], 64))
    # --data-bin-eos-id puts an id where fairseq put </s>.
    _, task, _, _ = build(str(frequency), tiny_model_dir, "--data-bin-eos-id", "5")
    tokens = task.load_tokens("valid")
    assert tokens.numel() == 2000 + 20 and tokens[100].item() == 5
    assert torch.equal(tokens[:100], splits["valid"][:100])
    # A data-bin of other symbols is refused with one line.
    words = tmp_path / "words"
    words.mkdir()
    (words / "dict.txt").write_text("hello 3\nworld 2\n")
    _, task, _, _ = build(str(prepared), tiny_model_dir)
    task.args.data = str(words)
    with pytest.raises(UserError, match="no GPT-2 ids"):
        task.load_tokens("valid")


# --------------------------------------------------------------------------- #
# fairseq-train
# --------------------------------------------------------------------------- #

@pytest.mark.slow
def test_train_loss_goes_down_and_validation_logs(trained):
    logs = trained["logs"]
    train = logs["train_inner"]
    assert [int(r["num_updates"]) for r in train] == [1, 2, 3, 4]
    assert float(train[-1]["loss"]) < float(train[0]["loss"])
    assert float(train[-1]["nll_loss"]) < float(train[0]["nll_loss"])
    assert any(r.get("hits_at_1") is not None for r in train)  # --compute-metrics-interval
    valid = logs["valid"]
    assert len(valid) == 2 and float(valid[1]["valid_loss"]) < float(valid[0]["valid_loss"])
    for key in ("valid_ppl", "valid_hits_at_1", "valid_repeat_at_1/128", "valid_seq_rep_1",
                "valid_seq_rep_4", "valid_uniq_seq"):
        assert key in valid[-1], key
    assert "criterion: ScaleGradCriterion" in trained["output"]
    assert {p.name for p in trained["save_dir"].iterdir()} >= {
        "checkpoint_last.pt", "checkpoint_best.pt", "checkpoint_1_2.pt", "checkpoint_1_4.pt"}


@pytest.mark.slow
def test_training_resumes_from_its_checkpoint(trained, gpt2_data, tiny_model_dir, tmp_path):
    save_dir = tmp_path / "ckpt"
    shutil.copytree(trained["save_dir"], save_dir)
    output, logs = fairseq_train(gpt2_data, "--user-dir", PACKAGE_DIR, "--pretrained-model",
                                 tiny_model_dir, *COMMON, "--update-freq", "2", "--max-update", "5",
                                 "--save-dir", save_dir, "--disable-validation")
    assert "(epoch 1 @ 4 updates)" in output  # "Loaded checkpoint ... (epoch 1 @ 4 updates)"
    assert [int(r["num_updates"]) for r in logs["train_inner"]] == [5]


@pytest.mark.slow
def test_two_cpu_processes_with_the_hydra_config_match_one(trained, gpt2_data, tiny_model_dir,
                                                           tmp_path):
    """configs/fairseq/gpt2_scalegrad.yaml, two processes, gloo: the multi-GPU path.

    fairseq cannot start CPU workers itself (torchrun's environment makes it divide
    by the CUDA device count; ``--distributed-world-size`` alone asserts that many
    GPUs; PyTorch DDP refuses ``device_ids`` for CPU modules), so each process is
    started by hand with its rank and ``legacy_ddp``. Ranks 0 and 1 take batches 0
    and 1 of each update, as one process with ``--update-freq 2`` does.
    """
    port = free_port()
    save_dir = tmp_path / "ckpt"
    overrides = [
        f"task.data={gpt2_data}", f"common.user_dir={PACKAGE_DIR}",
        f"model.pretrained_model={tiny_model_dir}", "task.tokens_per_sample=64",
        f"task.eval_prefix_length={P}", f"task.eval_continuation_length={C}",
        "task.compute_metrics_interval=2", "dataset.batch_size=4", "optimization.max_update=4",
        "optimization.lr=[0.002]", "common.cpu=true", "common.seed=1", "common.log_interval=1",
        "dataset.num_workers=0", "dataset.validate_interval_updates=2",
        f"checkpoint.save_dir={save_dir}", "checkpoint.save_interval_updates=2",
        "distributed_training.distributed_world_size=2",
        f"distributed_training.distributed_init_method=tcp://127.0.0.1:{port}",
        "distributed_training.distributed_no_spawn=true",
        "distributed_training.distributed_backend=gloo",
        "distributed_training.ddp_backend=legacy_ddp", "distributed_training.device_id=0",
        "hydra.output_subdir=null",
    ]
    procs = []
    for rank in (0, 1):
        command = [sys.executable, "-m", "fairseq_cli.hydra_train",
                   "--config-dir", str(REPO / "configs" / "fairseq"), "--config-name", "gpt2_scalegrad",
                   *overrides, f"distributed_training.distributed_rank={rank}",
                   f"hydra.run.dir={tmp_path / f'hydra{rank}'}"]
        procs.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, env=subprocess_env(), cwd=str(tmp_path)))
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    logs = parse_logs(outputs[0])
    assert [int(r["num_updates"]) for r in logs["train_inner"]] == [1, 2, 3, 4]
    assert all(float(r["wpb"]) == 512 for r in logs["train_inner"])  # both workers' tokens
    single = [float(r["loss"]) for r in trained["logs"]["train_inner"]]
    assert [float(r["loss"]) for r in logs["train_inner"]] == pytest.approx(single, abs=2e-3)
    assert "valid_seq_rep_4" in logs["valid"][-1]
    assert state_max_diff(save_dir / "checkpoint_last.pt",
                          trained["save_dir"] / "checkpoint_last.pt") < 1e-5


# --------------------------------------------------------------------------- #
# Checkpoints: fairseq's loader, ours, the export
# --------------------------------------------------------------------------- #

@pytest.mark.slow
def test_checkpoint_loads_and_exports_with_the_same_logits(trained, loaded, exported):
    from transformers import AutoModelForCausalLM

    path = trained["save_dir"] / "checkpoint_last.pt"
    tokens = data.load_chunks(loaded.task.args.data, "test", 64)[:2, :-1]
    with torch.no_grad():
        ours = loaded.model(tokens)[0]
        models, _cfg, _task = checkpoint_utils.load_model_ensemble_and_task([str(path)])
        fairseqs = models[0].eval()(tokens)[0]
        hf = AutoModelForCausalLM.from_pretrained(exported).eval()
        exported_logits = hf(input_ids=tokens).logits
    assert loaded.num_updates == 4
    assert torch.equal(ours, fairseqs)
    assert torch.equal(ours, exported_logits)
    assert (exported / "tokenizer.json").is_file()
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    hf_state = hf.state_dict()
    assert all(torch.equal(state["decoder.model." + k], v) for k, v in hf_state.items())


def test_export_and_evaluate_errors(tmp_path, capsys):
    evaluate = load_script("evaluate_fairseq")
    export = load_script("export_fairseq_to_hf")
    missing = str(tmp_path / "nope.pt")
    assert evaluate.main(["--checkpoint", missing, "--output-dir", str(tmp_path / "o"),
                          "--data-dir", str(tmp_path)]) == 2
    assert export.main(["--checkpoint", missing, "--output-dir", str(tmp_path / "o")]) == 2
    bogus = tmp_path / "bogus.pt"
    torch.save({"model": {}, "cfg": {"model": {"_name": "transformer_lm"}}}, bogus)
    assert export.main(["--checkpoint", str(bogus), "--output-dir", str(tmp_path / "o")]) == 2
    assert evaluate.main(["--checkpoint", str(bogus), "--output-dir", str(tmp_path / "o"),
                          "--data-dir", str(tmp_path), "--beam-ngram-block", "2"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4 and all(line.startswith("error: ") for line in errors)
    assert "does not exist" in errors[0] and "transformer_lm model" in errors[2]
    assert "--beam-size" in errors[3]
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- #
# Evaluation: beam search, the cross-check with run_gpt2.py, the report
# --------------------------------------------------------------------------- #

def continuation_log_prob(hf_model, completion):
    ids = torch.tensor([completion])
    with torch.no_grad():
        lprobs = F.log_softmax(hf_model(input_ids=ids[:, :-1]).logits[0], dim=-1)
    return lprobs[P - 1:].gather(1, ids[0, P:, None]).sum().item()


def repeated_ngrams_in_continuation(completion, n):
    seen, repeats = set(), 0
    for i in range(len(completion) - n + 1):
        gram = tuple(completion[i:i + n])
        if i + n - 1 >= P and gram in seen:
            repeats += 1
        seen.add(gram)
    return repeats


@pytest.mark.slow
def test_beam_search_through_fairseqs_generator(loaded):
    prefixes, per_chunk, _ = completion_prefixes(loaded, "valid", 64, P)
    prefixes = prefixes[:24]
    kwargs = dict(continuation_length=C, batch_size=per_chunk, progress=False)
    greedy = sampled_completions(loaded, prefixes, top_k=1, top_p=0.0, seed=0, **kwargs)
    assert beam_completions(loaded, prefixes, beam_size=1, **kwargs) == greedy
    beam = beam_completions(loaded, prefixes, beam_size=3, **kwargs)
    blocked = beam_completions(loaded, prefixes, beam_size=3, ngram_block=2, **kwargs)
    for rows in (beam, blocked):
        assert [row[:P] for row in rows] == prefixes.tolist()
        assert all(len(row) == P + C for row in rows)
    hf = loaded.hf_model
    assert all(continuation_log_prob(hf, b) >= continuation_log_prob(hf, g) - 1e-4
               for b, g in zip(beam, greedy))
    assert sum(repeated_ngrams_in_continuation(row, 2) for row in beam) > 0
    assert sum(repeated_ngrams_in_continuation(row, 2) for row in blocked) == 0


def eval_argv(checkpoint, output_dir, *extra):
    """evaluate_fairseq.py with run_gpt2.py-style results (--result-format gpt2)."""
    return ["--checkpoint", str(checkpoint), "--output-dir", str(output_dir), "--model-name", "tiny",
            "--data-dir", loaded_data_dir(checkpoint), "--result-format", "gpt2",
            "--eval-split", "valid", "--batch-size-singletoken", "64", "--batch-size-completion",
            "64", "--prefix-length", str(P), "--continuation-length", str(C), "--no-progress",
            *map(str, extra)]


@pytest.fixture(scope="module")
def cross_check(trained, exported, tmp_path_factory):
    """evaluate_fairseq.py on the checkpoint and run_gpt2.py on its export, same settings."""
    from scalegrad.gpt2.driver import run
    from scalegrad.gpt2.options import parse_args

    fairseq_dir = tmp_path_factory.mktemp("results") / "fairseq"
    gpt2_dir = fairseq_dir.parent / "gpt2"
    checkpoint = trained["save_dir"] / "checkpoint_last.pt"
    evaluate = load_script("evaluate_fairseq")
    assert evaluate.main(eval_argv(checkpoint, fairseq_dir)) == 0
    assert evaluate.main(eval_argv(checkpoint, fairseq_dir, "--mode", "completion", "--top-k", "5",
                                   "--seed", "7")) == 0
    assert evaluate.main(eval_argv(checkpoint, fairseq_dir, "--mode", "completion",
                                   "--beam-size", "3", "--beam-ngram-block", "2")) == 0
    common = ["--data-base", loaded_data_dir(checkpoint), "--output-dir", str(gpt2_dir),
              "--model-load-dir", str(exported), "--model-name", "tiny", "--eval-split", "valid",
              "--batch-size-singletoken", "64", "--batch-size-completion", "64",
              "--prefix-length", str(P), "--continuation-length", str(C), "--no-progress"]
    run(parse_args(["--mode", "eval-both", *common]))
    run(parse_args(["--mode", "eval-completion", "--top-k", "5", "--seed", "7", *common]))
    return fairseq_dir, gpt2_dir


def loaded_data_dir(checkpoint) -> str:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return state["cfg"]["task"]["data"]


def read(path):
    return json.loads(Path(path).read_text())


GREEDY = f"completion__tiny__spl_valid__topk_1__topp_0.0__pfl_{P}__cnl_{C}.json"
TOPK = f"completion__tiny__spl_valid__topk_5__topp_0.0__pfl_{P}__cnl_{C}.json"
BEAM = f"completion__tiny__spl_valid__topk_1__topp_0.0__pfl_{P}__cnl_{C}__beam_3__ngb_2.json"
SINGLE = "singletoken__tiny__spl_valid__bsz_64.json"


@pytest.mark.slow
def test_cross_check_with_run_gpt2(cross_check, trained):
    fairseq_dir, gpt2_dir = cross_check
    ours, theirs = read(fairseq_dir / SINGLE), read(gpt2_dir / SINGLE)
    assert ours["metrics"].keys() == theirs["metrics"].keys()
    for key, value in theirs["metrics"].items():
        assert ours["metrics"][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    for name in (GREEDY, TOPK):  # greedy and sampled completions are the driver's
        ours, theirs = read(fairseq_dir / name), read(gpt2_dir / name)
        assert ours["completions"] == theirs["completions"], name
        for key in ("bpe_metrics", "word_metrics", "uniq"):
            assert ours[key] == theirs[key], (name, key)
    # The training run's last validation saw the same chunks and prefixes.
    valid = trained["logs"]["valid"][-1]
    greedy = read(fairseq_dir / GREEDY)
    assert int(valid["valid_uniq_seq"]) == greedy["uniq"]
    assert float(valid["valid_seq_rep_4"]) == pytest.approx(
        greedy["bpe_metrics"]["bpe_valid/pct_repeat_4grams"], abs=1.5e-4)
    assert float(valid["valid_ppl"]) == pytest.approx(read(fairseq_dir / SINGLE)["metrics"]["ppl"],
                                                      abs=0.01)


@pytest.mark.slow
def test_original_format_single_token_equals_run_gpt2(cross_check, trained, tmp_path):
    """The original evaluation's single-token pass (any fairseq LM; here the
    gpt2_pretrained checkpoint, blocks of its own task) gives run_gpt2.py's numbers."""
    from scalegrad.metrics import RANKING_METRIC_NAMES

    _, gpt2_dir = cross_check
    checkpoint = trained["save_dir"] / "checkpoint_last.pt"
    evaluate = load_script("evaluate_fairseq")
    assert evaluate.main(["--data-dir", loaded_data_dir(checkpoint), "--checkpoint", str(checkpoint),
                          "--save-path", str(tmp_path), "--eval-mode", "singletoken",
                          "--batch-size-single-prediction", "64", "--no-progress"]) == 0
    [metrics_file] = tmp_path.glob("metrics__ckpt__st_4__spl_valid__*__bs_sprd_64__*.json")
    ours = read(metrics_file)
    theirs = read(gpt2_dir / SINGLE)["metrics"]
    assert ours["checkpoint_step"] == 4
    for name in RANKING_METRIC_NAMES + ["ppl"]:
        assert ours[f"valid/{name}"] == pytest.approx(theirs[name], rel=1e-9, abs=1e-12), name
    predictions = (tmp_path / metrics_file.name.replace("metrics_", "single_token_predictions_")
                   .replace(".json", ".txt")).read_text().split()
    assert len(set(predictions)) == theirs["uniq"]


@pytest.mark.slow
def test_evaluate_fairseq_extra_outputs(cross_check, trained):
    fairseq_dir, _ = cross_check
    metrics = read(fairseq_dir / SINGLE)["metrics"]
    predictions = read(fairseq_dir / "predictions__tiny__spl_valid__bsz_64.json")["predictions"]
    targets = read(fairseq_dir / "targets__tiny__spl_valid__bsz_64.json")["targets"]
    chunks = data.load_chunks(loaded_data_dir(trained["save_dir"] / "checkpoint_last.pt"), "valid", 64)
    assert targets == chunks[:, 1:].tolist()
    assert len(predictions) == len(targets) and all(len(p) == 64 for p in predictions)
    hits = sum(p == t for ps, ts in zip(predictions, targets) for p, t in zip(ps, ts))
    assert hits / (64 * len(targets)) == pytest.approx(metrics["hits_at_1"])
    assert metrics["uniq"] == len({p for ps in predictions for p in ps})
    original = read(fairseq_dir / "metrics__tiny__spl_valid__bsz_64.json")
    assert original["checkpoint_step"] == 4 and original["valid/ppl"] == metrics["ppl"]
    beam = read(fairseq_dir / BEAM)
    assert beam["decoding"]["beam_size"] == 3 and len(beam["completion_ids"]) == 46 * (65 // P)
    continuations = [c[P:] for c in beam["completion_ids"]]
    mean = sum(ngram_metrics(c, pad=-1)["pct_repeat_4grams"] for c in continuations) / len(continuations)
    assert beam["bpe_metrics"]["bpe_valid/pct_repeat_4grams"] == round(mean, 4)


@pytest.mark.slow
def test_report_reads_both_drivers(cross_check, capsys):
    fairseq_dir, gpt2_dir = cross_check
    report = load_script("report_metrics")
    assert report.main([str(fairseq_dir), str(gpt2_dir), "--names", "fairseq", "gpt2",
                        "--format", "csv"]) == 0
    lines = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert lines[0] == ["run", "model", "split", "decoding", "seq-rep-1", "seq-rep-4", "uniq-seq",
                        "ppl", "acc", "rep", "wrep", "uniq"]
    rows = {tuple(line[:4]): line[4:] for line in lines[1:]}
    assert set(rows) == {
        ("fairseq", "tiny", "valid", "greedy"), ("fairseq", "tiny", "valid", "top-k 5"),
        ("fairseq", "tiny", "valid", "beam 3, 2-gram block"), ("gpt2", "tiny", "valid", "greedy"),
        ("gpt2", "tiny", "valid", "top-k 5"), ("human", "-", "valid", "-")}
    assert rows[("fairseq", "tiny", "valid", "greedy")] == rows[("gpt2", "tiny", "valid", "greedy")]
    single = read(fairseq_dir / SINGLE)["metrics"]
    greedy = read(fairseq_dir / GREEDY)
    beam = read(fairseq_dir / BEAM)

    def fmt(value):
        return str(int(value)) if float(value).is_integer() else f"{value:.3f}"

    expected = [fmt(greedy["bpe_metrics"]["bpe_valid/pct_repeat_1grams"]),
                fmt(greedy["bpe_metrics"]["bpe_valid/pct_repeat_4grams"]), fmt(greedy["uniq"]),
                fmt(single["ppl"]), fmt(single["hits_at_1"]), fmt(single["repeat_at_1/128"]),
                fmt(single["wrong_repeat_at_1/128"]), fmt(single["uniq"])]
    assert rows[("fairseq", "tiny", "valid", "greedy")] == expected
    assert rows[("fairseq", "tiny", "valid", "beam 3, 2-gram block")][:3] == [
        fmt(beam["bpe_metrics"]["bpe_valid/pct_repeat_1grams"]),
        fmt(beam["bpe_metrics"]["bpe_valid/pct_repeat_4grams"]), fmt(beam["uniq"])]
