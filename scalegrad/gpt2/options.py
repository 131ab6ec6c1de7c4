"""The command line of ``scripts/run_gpt2.py``: every flag of the original, the new ones,
a ``--config FILE.yaml`` whose keys are the flags, and the checks of their values.

Flag names and defaults are the original's (``docs/reference.md``, section 5), with
three deliberate changes, each documented in the help text:

- ``--model-name`` accepts any Hugging Face hub name or local path (the original
  only allowed ``gpt2``, ``gpt2-medium``, ``gpt2-large``);
- ``--max-grad-norm`` and ``--gradient-accumulation-steps`` default to "not given"
  (``None``): the original parsed them (defaults 1 and 1) and never used them, so
  leaving them out reproduces it; given explicitly, they take effect;
- ``--sequence-tune-rate`` defaults to 0.0 (the unlikelihood parent script had 0.5;
  the ScaleGrad script had no sequence-level training at all).
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any, Sequence

from ..errors import UserError, first_line

MODES = ("train", "eval-singletoken", "eval-completion", "eval-both")
#: ``--objective``: the token-level training objective (docs/objectives.md); the names
#: of the fairseq criteria.
OBJECTIVE_CHOICES = ("scalegrad", "candidate_penalty_cross_entropy", "contrastive_token", "simctg")
SPLIT_CHOICES = ("train", "valid", "test")

#: The original's parser defaults, for docs/gpt2-driver.md and the tests.
ORIGINAL_DEFAULTS = {
    "mode": "eval-singletoken", "eval_split": None, "model_name": "gpt2-medium",
    "model_load_dir": None, "seed": 42, "data_base": None, "num_train_epochs": 1,
    "batch_size_singletoken": 1024, "batch_size_completion": 300, "output_dir": None,
    "prefix_length": 50, "continuation_length": 100, "top_k": 1, "top_p": 0.0,
    "train_batch_size": 300, "report_metrics_every": 10, "save_every": 1000,
    "train_n_steps": 10000, "validate_every": 10000, "gamma": 1.0, "adam_epsilon": 1e-8,
    "max_grad_norm": 1, "max_steps": -1, "gradient_accumulation_steps": 1,
    "learning_rate": 6.25e-5, "warmup_steps": 0, "lr_schedule": "warmup_linear",
    "weight_decay": 0.01, "lm_coef": 0.9,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_gpt2.py",
        description="Finetune and evaluate a causal LM (GPT-2 in the paper) with ScaleGrad "
                    "(Lin, Han and Joty, ICML 2021), as the original run_gpt2.py.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument

    # ---- the original's flags (names and defaults kept) ----
    add("--mode", choices=MODES, default="eval-singletoken")
    add("--eval-split", choices=SPLIT_CHOICES, default=None,
        help="split to evaluate (and to validate on while training)")
    add("--model-name", default="gpt2-medium",
        help="Hugging Face hub name or local folder of the model to start from; also names "
             "the result files (the original allowed gpt2, gpt2-medium, gpt2-large only)")
    add("--model-load-dir", default=None,
        help="a folder written by save_pretrained (a checkpoint of this driver, say); "
             "loaded instead of --model-name, which still names the result files")
    add("--seed", type=int, default=42)
    add("--data-base", default=None,
        help="folder holding {train,valid,test}_tokens_bpe_gpt2.pt")
    add("--num-train-epochs", type=int, default=1)
    add("--batch-size-singletoken", type=int, default=1024,
        help="tokens per chunk in single-token evaluation (chunks of N + 1)")
    add("--batch-size-completion", type=int, default=300,
        help="tokens per chunk in completion evaluation (chunks of N + 1, cut into prefixes)")
    add("--output-dir", default=None,
        help="where checkpoints and result files go (required)")
    add("--prefix-length", type=int, default=50)
    add("--continuation-length", type=int, default=100)
    add("--top-k", type=int, default=1)
    add("--top-p", type=float, default=0.0)
    add("--train-batch-size", type=int, default=300,
        help="tokens per training chunk (one chunk of N + 1 per step)")
    add("--report-metrics-every", type=int, default=10)
    add("--save-every", type=int, default=1000)
    add("--train-n-steps", type=int, default=10000,
        help="stop after step index N of each epoch (N + 1 updates; see --exact-train-n-steps)")
    add("--validate-every", type=int, default=10000)
    add("--gamma", type=float, default=1.0,
        help="ScaleGrad's gamma, > 0 (the paper: 0.2, 0.5, 0.8; 1.0 is maximum likelihood)")
    add("--adam-epsilon", type=float, default=1e-8)
    add("--max-grad-norm", type=float, default=None,
        help="clip the gradient norm to this value; not given: no clipping (the original "
             "parsed a default of 1 and never applied it)")
    add("--max-steps", type=int, default=-1,
        help="if > 0: the schedule's total steps (it decays to 0 there) and the number of "
             "epochs; as in the original it does not stop the loop")
    add("--gradient-accumulation-steps", type=int, default=None,
        help="chunks per optimizer update; not given: 1 (the original parsed a default of 1 "
             "and never used it)")
    add("--learning-rate", type=float, default=6.25e-5)
    add("--warmup-steps", type=int, default=0)
    add("--lr-schedule", default="warmup_linear",
        help="accepted and ignored, as in the original (the schedule is always linear warm-up "
             "and decay)")
    add("--weight-decay", type=float, default=0.01)
    add("--lm-coef", type=float, default=0.9, help="accepted and ignored, as in the original")

    # ---- the unlikelihood parent script's flags (docs/reference.md, section 7) ----
    add("--sequence-tune-rate", type=float, default=0.0,
        help="chance that a training step uses sequence-level unlikelihood on greedy "
             "continuations of the chunk's prefixes (the parent script's default was 0.5)")
    add("--sequence-ngram-n", type=int, default=4,
        help="N of the repeated N-grams that sequence-level unlikelihood penalises")
    # ---- the objectives ScaleGrad is compared with (docs/objectives.md) ----
    add("--objective", choices=OBJECTIVE_CHOICES, default="scalegrad",
        help="the token-level training loss: scalegrad (with --gamma; 1.0 is maximum "
             "likelihood), candidate_penalty_cross_entropy (token-level unlikelihood, with "
             "--rank-alpha), contrastive_token (cross-entropy + the contrastive-token loss of "
             "Jiang et al. 2022, with --ct-length and --ct-preced-m-negatives) or simctg "
             "(cross-entropy + SimCTG's margin loss on the last hidden states, Su et al. "
             "2022, with --simctg-margin); --sequence-tune-rate steps mix in with any of them")
    add("--rank-alpha", type=float, default=1.0,
        help="--objective candidate_penalty_cross_entropy (token-level unlikelihood, Welleck "
             "et al. 2019): the loss is NLL + RANK_ALPHA * the candidate penalty over the "
             "chunk's previous targets, as the fairseq criterion of that name")
    add("--ct-length", type=float, default=0.25,
        help="--objective contrastive_token: the leading positions of each chunk the CT term "
             "scores, a fraction of the chunk (<= 1) or a count (> 1), as ct-loss's ct_length")
    add("--ct-preced-m-negatives", type=float, default=0.5,
        help="--objective contrastive_token: how many preceding tokens are each position's "
             "negatives, a fraction of the CT length (<= 1) or a count (> 1), as ct-loss's "
             "preced_m_negatives")
    add("--simctg-margin", type=float, default=0.5,
        help="--objective simctg: the margin rho of SimCTG's contrastive loss, >= 0 (the "
             "paper: 0.5)")

    # ---- new ----
    add("--config", default=None,
        help="YAML file whose keys are these flags (dashes or underscores); flags given on "
             "the command line win")
    add("--tokenizer", default=None,
        help="tokenizer name or folder; default: the model folder when it holds a tokenizer, "
             "else --model-name")
    add("--device", default=None,
        help="cuda, cuda:N or cpu; default: cuda when available, else cpu (under torchrun, "
             "each process takes cuda:LOCAL_RANK)")
    add("--fp16", action="store_true", help="float16 autocast (CUDA only); the loss stays float32")
    add("--bf16", action="store_true", help="bfloat16 autocast; the loss stays float32")
    add("--penalty-alpha", type=float, default=None, metavar="A",
        help="completion evaluation by contrastive search (Su et al., 2022): at each step the "
             "--top-k K most probable tokens v are scored (1 - A) * p(v) - A * (max cosine "
             "between v's final hidden state and those of the prefix and the tokens generated "
             "so far), the best taken; A in [0, 1] (0: greedy), needs --top-k K > 1 and "
             "--top-p 0. Batched, with the key/value cache (docs/contrastive-search.md)")
    add("--num-samples", type=int, default=None, metavar="N",
        help="sampling decodings (--top-k K > 1, or --top-k 0 with --top-p): N continuations per "
             "prefix, sample i drawn with seed --seed + i; the result file holds each "
             "sample's metrics and every metric's mean and std over the samples (its name "
             "ends in __samples_N when N > 1). Not given: one sample, as the original")
    add("--completion-batch-size", type=int, default=None,
        help="prefixes continued together in completion evaluation; default: the prefixes of "
             "one chunk, as the original (greedy results do not depend on it)")
    add("--resume", action="store_true",
        help="continue training from the checkpoint in OUTPUT_DIR/resume (model, optimizer, "
             "schedule, random states, step); starts afresh when there is none")
    add("--max-nonfinite-steps", type=int, default=10,
        help="stop training after this many steps in a row with a NaN or infinite loss "
             "(each one is skipped)")
    add("--no-progress", action="store_true", help="no progress bars")
    add("--fused-loss", action="store_true",
        help="compute the token-level training loss from the final hidden states and the "
             "output embedding, --fused-chunk-size positions at a time, so the (time x vocab) "
             "logits of a chunk never exist at once (scalegrad.fused; the same loss and "
             "gradients). Needs a model whose logits are its last hidden state times the "
             "output embedding (GPT-2-like: no logit scaling or soft-capping); the training "
             "metrics come from logits remade chunk by chunk without gradients. Sequence-level "
             "steps (--sequence-tune-rate) and evaluation use the full logits as before")
    add("--fused-chunk-size", type=int, default=256,
        help="positions whose logits --fused-loss makes at a time")
    add("--tensorboard-logdir", default=None, metavar="DIR",
        help="--mode train: write every training report (train/...) and validation "
             "(valid/...) as TensorBoard scalars against the update number into DIR "
             "(needs tensorboard or tensorboardX: pip install \"scalegrad[tracking]\")")
    add("--wandb-project", default=None, metavar="NAME",
        help="--mode train: log the same scalars to a Weights & Biases run in project NAME "
             "(needs wandb: pip install \"scalegrad[tracking]\"; WANDB_MODE=offline works "
             "without a network)")

    # ---- the 2022 papers' metrics of the completions (docs/metrics-2022.md) ----
    from ..text_metrics import add_text_metric_arguments

    add_text_metric_arguments(parser)

    # ---- options that change a quirk of the original (off: the original's behaviour) ----
    add("--enable-dropout", action="store_true",
        help="train with the model in training mode (dropout on); the original leaves it in "
             "evaluation mode")
    add("--exact-train-n-steps", action="store_true",
        help="stop after exactly --train-n-steps updates in total; the original stops after "
             "step index N of every epoch (N + 1 updates per epoch) and skips the save and "
             "validation of that last step")
    add("--adamw", choices=("original", "torch"), default="original",
        help="original: AdamW of pytorch-transformers (eps added to the uncorrected "
             "sqrt(v), weight decay after the update); torch: torch.optim.AdamW")
    return parser


def _dest_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest != "help"}


def _option_name(action: argparse.Action) -> str:
    return action.option_strings[-1] if action.option_strings else action.dest


def load_config(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Read a YAML config into ``{dest: value}``, checking keys and types."""
    import yaml

    config_path = Path(path)
    if not config_path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"config file {path} is not valid YAML: {first_line(exc)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} must hold a mapping of flag names to values, "
                        f"not a {type(raw).__name__}")
    actions = _dest_actions(parser)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        dest = str(key).lstrip("-").replace("-", "_")
        action = actions.get(dest)
        if action is None or dest == "config":
            known = ", ".join(sorted(d.replace("_", "-") for d in actions if d != "config"))
            raise UserError(f"config file {path}: unknown key {key!r} (known keys: {known})")
        name = _option_name(action)
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise UserError(f"config file {path}: {key} must be true or false, got {value!r}")
        elif value is not None:
            if isinstance(value, (dict, list)):
                raise UserError(f"config file {path}: {key} must be a single value, got {value!r}")
            if action.type is not None:
                if action.type is int and isinstance(value, float) and not value.is_integer():
                    raise UserError(f"config file {path}: {name} must be an integer, got {value!r}")
                if isinstance(value, bool) and action.type in (int, float):
                    raise UserError(f"config file {path}: {name} must be a number, got {value!r}")
                try:
                    value = action.type(value)
                except (TypeError, ValueError):
                    raise UserError(f"config file {path}: {name} must be of type "
                                    f"{action.type.__name__}, got {value!r}") from None
            else:
                value = str(value)
            if action.choices is not None and value not in action.choices:
                raise UserError(f"config file {path}: {name} must be one of "
                                f"{', '.join(map(str, action.choices))}, got {value!r}")
        values[dest] = value
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (and the ``--config`` file), then check the values.

    Mistakes in a flag value end as :class:`UserError` (argparse's own errors, an
    unknown flag say, exit with status 2 as usual).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        parser.set_defaults(**load_config(args.config, parser))
        args = parser.parse_args(argv)
    check_args(args)
    return args


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def check_args(args: argparse.Namespace) -> None:
    """Check every value that does not need the model or the data."""
    from ..losses import check_gamma

    _require(bool(args.output_dir), "--output-dir is required (where results and checkpoints go)")
    _require(bool(args.data_base), "--data-base is required: the folder holding "
             "{train,valid,test}_tokens_bpe_gpt2.pt")
    _require(os.path.isdir(args.data_base), f"--data-base {args.data_base} is not a folder")
    if args.mode != "train":
        _require(args.eval_split is not None,
                 f"--mode {args.mode} needs --eval-split (train, valid or test)")
    try:
        check_gamma(args.gamma, name="--gamma")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    check_objective(args)
    for name in ("batch_size_singletoken", "batch_size_completion", "train_batch_size",
                 "report_metrics_every", "save_every", "validate_every", "num_train_epochs",
                 "sequence_ngram_n", "max_nonfinite_steps"):
        value = getattr(args, name)
        _require(value >= 1, f"--{name.replace('_', '-')} must be at least 1, got {value}")
    _require(args.train_n_steps >= 0, f"--train-n-steps must be >= 0, got {args.train_n_steps}")
    _require(args.prefix_length >= 1, f"--prefix-length must be at least 1, got {args.prefix_length}")
    _require(args.prefix_length <= args.batch_size_completion,
             f"--prefix-length {args.prefix_length} must be shorter than the completion chunk of "
             f"--batch-size-completion {args.batch_size_completion} + 1 tokens; use a smaller "
             f"prefix length or a larger --batch-size-completion")
    _require(args.continuation_length >= 1,
             f"--continuation-length must be at least 1, got {args.continuation_length}")
    _require(args.top_k >= 0, f"--top-k must be >= 0 (1 with --top-p 0 is greedy), got {args.top_k}")
    _require(0.0 <= args.top_p <= 1.0, f"--top-p must be between 0 and 1, got {args.top_p}")
    _check_decoding(args)
    _require(0.0 <= args.sequence_tune_rate <= 1.0,
             f"--sequence-tune-rate must be between 0 and 1, got {args.sequence_tune_rate}")
    if args.sequence_tune_rate > 0:
        _require(args.prefix_length <= args.train_batch_size,
                 f"--prefix-length {args.prefix_length} must be shorter than the training chunk "
                 f"of --train-batch-size {args.train_batch_size} + 1 tokens for "
                 f"--sequence-tune-rate > 0")
    _require(math.isfinite(args.learning_rate) and args.learning_rate >= 0,
             f"--learning-rate must be a number >= 0, got {args.learning_rate}")
    _require(math.isfinite(args.adam_epsilon) and args.adam_epsilon >= 0,
             f"--adam-epsilon must be >= 0, got {args.adam_epsilon}")
    _require(math.isfinite(args.weight_decay) and args.weight_decay >= 0,
             f"--weight-decay must be >= 0, got {args.weight_decay}")
    _require(args.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if args.max_grad_norm is not None:
        _require(math.isfinite(args.max_grad_norm) and args.max_grad_norm > 0,
                 f"--max-grad-norm must be > 0, got {args.max_grad_norm}")
    if args.gradient_accumulation_steps is not None:
        _require(args.gradient_accumulation_steps >= 1,
                 f"--gradient-accumulation-steps must be at least 1, got "
                 f"{args.gradient_accumulation_steps}")
    if args.completion_batch_size is not None:
        _require(args.completion_batch_size >= 1,
                 f"--completion-batch-size must be at least 1, got {args.completion_batch_size}")
    _require(not (args.fp16 and args.bf16), "--fp16 and --bf16 exclude each other; pick one")
    _require(args.fused_chunk_size >= 1,
             f"--fused-chunk-size must be at least 1, got {args.fused_chunk_size}")
    if args.resume:
        _require(args.mode == "train", "--resume only applies to --mode train")
    from .tracking import check_tracking

    check_tracking(args)


def check_objective(args: argparse.Namespace) -> None:
    """``--objective`` and its flags: values in range, and no flag of another objective."""
    from ..contrastive import check_ct_argument, check_margin

    try:
        check_ct_argument(args.ct_length, "--ct-length")
        check_ct_argument(args.ct_preced_m_negatives, "--ct-preced-m-negatives")
        check_margin(args.simctg_margin, name="--simctg-margin")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    _require(math.isfinite(args.rank_alpha) and args.rank_alpha >= 0,
             f"--rank-alpha must be a number >= 0, got {args.rank_alpha}")
    if args.objective != "scalegrad":
        _require(args.gamma == 1.0,
                 f"--gamma {args.gamma} is ScaleGrad's and cannot be combined with --objective "
                 f"{args.objective} (which trains with cross-entropy plus its own term); drop "
                 f"--gamma or use --objective scalegrad")
        _require(not (args.fused_loss and args.objective in ("simctg", "candidate_penalty_cross_entropy")),
                 f"--fused-loss computes ScaleGrad or the contrastive-token objective; it cannot be "
                 f"combined with --objective {args.objective}: drop --fused-loss")


def _check_decoding(args: argparse.Namespace) -> None:
    """``--penalty-alpha`` and ``--num-samples`` (docs/contrastive-search.md)."""
    from ..generation import check_contrastive

    from ..text_metrics import text_metric_options

    text_metric_options(args)  # their flags' values (and the eval extra for --featurizer)
    if args.penalty_alpha is not None:
        check_contrastive(args.penalty_alpha, args.top_k, args.top_p)
    if args.num_samples is not None:
        _require(args.num_samples >= 1, f"--num-samples must be at least 1, got {args.num_samples}")
        _require(args.penalty_alpha is None,
                 "--num-samples draws several samples; contrastive search (--penalty-alpha) is "
                 "deterministic: leave one of them out")
        _require(args.top_k != 1,
                 "--num-samples draws several samples; greedy decoding (--top-k 1, whatever "
                 "--top-p: it keeps the most likely token only) gives one continuation: sample "
                 "with --top-k K > 1, or --top-k 0 --top-p P")
        if args.mode == "train":
            raise UserError("--num-samples applies to completion evaluation (--mode "
                            "eval-completion or eval-both), not --mode train")


def accumulation_steps(args: argparse.Namespace) -> int:
    """``--gradient-accumulation-steps`` as used: 1 when not given (the original)."""
    return args.gradient_accumulation_steps or 1


def result_model_name(model_name: str) -> str:
    """``--model-name`` as it appears in result file names.

    The original's names (``gpt2-medium``) are kept as they are. A local path
    gives its last component; a hub name with an organisation (``org/model``)
    gives ``org--model``, so the name stays one file name.
    """
    name = model_name.rstrip("/\\") or model_name
    if os.path.sep in name or "/" in name:
        if os.path.exists(name):
            return Path(name).name
        return name.replace("/", "--").replace(os.path.sep, "--")
    return name
