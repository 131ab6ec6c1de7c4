"""scalegrad: ScaleGrad (ICML 2021) for Hugging Face causal LMs and fairseq.

Install with ``bash scripts/setup_env.sh`` (or ``make setup``): it installs torch
first and on its own, keeps a torch that is already there (a CUDA build, say),
and works around fairseq's torchaudio requirement. A plain
``pip install --no-build-isolation -e .[dev]`` into an environment that already
has torch works too; then ``pip uninstall torchaudio`` (see README).
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
    python_requires=">=3.9",
    packages=find_packages(include=["scalegrad", "scalegrad.*"]),
    install_requires=[
        "torch>=2.1",
        # fairseq's last official release does not import on Python >= 3.11
        # (dataclass mutable defaults); the fairseq-fixed fork of fairseq's main
        # branch does, and builds its extensions against the installed torch.
        "fairseq==0.12.2; python_version < '3.11'",
        "fairseq-fixed==0.12.3.1; python_version >= '3.11'",
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
        # accelerate: what transformers.Trainer needs (the Trainer route and its test)
        "dev": ["pytest>=7", "hypothesis>=6", "accelerate>=1.1"],
    },
    entry_points={
        "console_scripts": [],
    },
)
