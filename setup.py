"""scalegrad: ScaleGrad (ICML 2021) for Hugging Face models and fairseq.

``pip install .`` is the light core (the losses, the fused loss, the metrics, the
Trainer hook, the GPT-2 driver, data preparation and the report): pure Python on
top of torch and transformers, no compiler. Extras:

- ``fairseq``: fairseq (built from source against the installed torch, a few
  minutes on a small machine) and tensorboardX, for ``--user-dir scalegrad``.
- ``triton``: Triton, for the optional Triton kernel.
- ``tracking``: TensorBoard and Weights & Biases, for the GPT-2 driver's
  ``--tensorboard-logdir`` and ``--wandb-project``.
- ``eval``: mauve-text, faiss-cpu and scikit-learn, for MAUVE (``scalegrad-score
  --featurizer``; ``docs/metrics-2022.md``).
- ``dev``: the test tools, the eval extra's packages, plus accelerate, TRL and PEFT for
  the Trainer tests, and MkDocs (Material, mkdocstrings) for the documentation site
  (``make docs``).

``bash scripts/setup_env.sh`` (``make setup``) installs everything into .venv: it
installs torch first and on its own, keeps a torch that is already there (a CUDA
build, say), and works around fairseq's torchaudio requirement.
"""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = {}
for line in (here / "scalegrad" / "__init__.py").read_text().splitlines():
    if line.startswith("__version__"):
        exec(line, version)

setup(
    name="scalegrad",
    version=version["__version__"],
    description="ScaleGrad (Lin, Han and Joty, ICML 2021): novel-token gradient rescaling "
    "for neural text generation, for Hugging Face causal LMs and fairseq",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["scalegrad", "scalegrad.*"]),
    install_requires=[
        "torch>=2.1",
        "transformers>=4.40",
        "tokenizers>=0.15",
        "safetensors",
        "nltk",
        "numpy",
        "pyyaml",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        # fairseq-fixed is fairseq's main branch with the Python 3.11+ dataclass
        # fixes, on every Python: the last official release (0.12.2) does not import
        # on 3.11+, and on 3.10 it needs omegaconf<2.1, whose metadata pip >= 24.1
        # refuses. It builds C++ extensions against the installed torch (install
        # with --no-build-isolation). tensorboardX: fairseq's --tensorboard-logdir
        # (and no "Please install tensorboardX" line at fairseq's import).
        "fairseq": ["fairseq-fixed==0.12.3.1", "tensorboardX"],
        # A CUDA torch brings the Triton it was built with; this extra is for the rest.
        "triton": ["triton"],
        # The GPT-2 driver's --tensorboard-logdir (tensorboard: the writer and the
        # viewer; tensorboardX also works) and --wandb-project.
        "tracking": ["tensorboard", "wandb"],
        # accelerate: what transformers.Trainer needs; trl, peft: the SFTTrainer and
        # LoRA tests of the Trainer hook; tensorboard, wandb: the tracking tests;
        # ct-loss: the published contrastive-token loss, the oracle of its tests.
        # MAUVE of scalegrad-score and the drivers' text metrics (docs/metrics-2022.md);
        # the log-prob and SimCSE coherence need only the core.
        "eval": ["mauve-text>=0.4", "faiss-cpu", "scikit-learn"],
        # The eval extra's packages are also the MAUVE tests' oracle; simctg==0.7 (the
        # rep-n oracle) is installed with --no-deps by scripts/setup_env.sh. mkdocs and
        # its theme and API plugin: the documentation site, which tests/test_docs.py
        # builds with --strict (ruff: mkdocstrings wraps long signatures with it).
        "dev": ["pytest>=7", "hypothesis>=6", "accelerate>=1.1", "trl", "peft",
                "tensorboard", "wandb", "mauve-text>=0.4", "faiss-cpu", "scikit-learn",
                "ct-loss==0.0.3", "mkdocs>=1.6", "mkdocs-material>=9.5",
                "mkdocstrings>=0.26", "mkdocstrings-python>=1.10", "ruff"],
    },
    # Commands on the PATH; the scripts/ files run the same functions.
    entry_points={
        "console_scripts": [
            "scalegrad-run-gpt2 = scalegrad.gpt2.run_gpt2:main",
            "scalegrad-prepare-data = scalegrad.cli:prepare_data_main",
            "scalegrad-report = scalegrad.cli:report_main",
            "scalegrad-score = scalegrad.score_cli:main",
            "scalegrad-evaluate-fairseq = scalegrad.fairseq_plugin.eval_cli:main",
            "scalegrad-export-hf = scalegrad.fairseq_plugin.export_cli:main",
            "scalegrad-compare = scalegrad.gpt2.compare:main",
        ],
    },
)
