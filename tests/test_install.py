"""The light install: a fast, quiet import, the public API at the root, a core that
runs without fairseq (or any other extra), and a wheel whose only fairseq is an extra."""

from __future__ import annotations

import email
import os
import pkgutil
import shutil
import statistics
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

import scalegrad

ROOT = Path(__file__).resolve().parents[1]

# What `pip install .` leaves out: the extras (fairseq and what it pulls, triton) and
# the dev tools (accelerate, trl, peft), the eval extra (mauve-text, faiss, scikit-learn).
# A finder that makes them unimportable.
BLOCK_EXTRAS = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = {"fairseq", "fairseq_cli", "hydra", "omegaconf", "tensorboardX", "triton",
               "accelerate", "trl", "peft", "mauve", "faiss", "sklearn"}
    class BlockExtras(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
    sys.meta_path.insert(0, BlockExtras())
""")


def _python(code: str, *, env=None, timeout=300) -> subprocess.CompletedProcess:
    environment = {**os.environ, **(env or {})}
    environment.pop("SCALEGRAD_SKIP_FAIRSEQ", None)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environment, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow  # three interpreters importing torch: about 6 s idle, 30 s on a loaded machine
def test_import_is_quiet_light_and_fast():
    code = textwrap.dedent("""
        import sys, time
        start = time.perf_counter()
        import torch
        torch_s = time.perf_counter() - start
        start = time.perf_counter()
        import scalegrad
        from scalegrad import (scalegrad_loss, fused_linear_scalegrad_loss, ScaleGradLoss,
                               ranking_metrics, ngram_metrics, CompletionMetrics)
        extra_s = time.perf_counter() - start
        heavy = sorted(m for m in ("fairseq", "transformers", "tokenizers", "nltk", "matplotlib", "triton")
                       if m in sys.modules)
        sys.stderr.write(f"{torch_s} {extra_s} {','.join(heavy)}\\n")
    """)
    extras = []
    for _ in range(3):
        result = _python(code)
        assert result.returncode == 0, result.stderr
        assert result.stdout == ""
        *noise, last = result.stderr.strip().splitlines()
        assert noise == [], noise  # nothing printed (fairseq's tensorboardX nag included)
        torch_s, extra_s, heavy = (last.split(" ") + [""])[:3]
        assert heavy == "", f"import scalegrad imported {heavy}"
        extras.append(float(extra_s))
    # The bound: at most 0.5 s more than `import torch` (measured: about 0.05 s).
    assert statistics.median(extras) < 0.5, extras


def test_public_api_is_importable_from_the_root():
    from scalegrad import contrastive, fused, hf_trainer, losses, metrics, unlikelihood

    homes = {"scalegrad_loss": losses, "check_gamma": losses, "fused_linear_scalegrad_loss": fused,
             "ScaleGradLoss": hf_trainer, "scalegrad_trainer": hf_trainer, "ranking_metrics": metrics,
             "aggregate_ranking_metrics": metrics, "repeat_at_1": metrics, "ngram_metrics": metrics,
             "NgramMetrics": metrics, "CompletionMetrics": metrics,
             "candidate_penalty_loss": unlikelihood, "sequence_penalty_loss": unlikelihood,
             "contrastive_token_loss": contrastive, "simctg_loss": contrastive,
             "ContrastiveTokenLoss": hf_trainer, "SimCTGLoss": hf_trainer,
             "simctg_trainer": hf_trainer}
    for name, module in homes.items():
        assert getattr(scalegrad, name) is getattr(module, name), name
        assert name in scalegrad.__all__ and name in dir(scalegrad)
    assert set(scalegrad.__all__) == set(homes) | {"__version__", "register_fairseq", "fairseq_registered"}
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        scalegrad.no_such_name  # noqa: B018


def _core_modules():
    names = []
    for info in pkgutil.walk_packages(scalegrad.__path__, "scalegrad."):
        if info.name.startswith("scalegrad.fairseq_plugin.") or info.name == "scalegrad.triton_scalegrad":
            continue  # the fairseq extra's own modules; the triton extra's kernel
        names.append(info.name)
    return names


@pytest.mark.slow  # imports the whole core and three scripts in a fresh interpreter
def test_the_core_and_its_scripts_run_without_the_extras():
    modules = _core_modules()
    assert {"scalegrad.gpt2.driver", "scalegrad.data", "scalegrad.report", "scalegrad.hf_trainer",
            "scalegrad.fused", "scalegrad.metrics"} <= set(modules)
    code = BLOCK_EXTRAS + textwrap.dedent(f"""
        import importlib, torch
        for name in {modules!r}:
            importlib.import_module(name)
        import scalegrad
        logits = torch.randn(2, 5, 7, requires_grad=True)
        scalegrad.scalegrad_loss(logits, torch.randint(0, 7, (2, 5)), 0.2).backward()
        assert not scalegrad.fairseq_registered()
        try:
            scalegrad.register_fairseq()
        except ModuleNotFoundError as error:
            print(error)
        import contextlib, io, runpy
        for script in ("run_gpt2.py", "prepare_data.py", "report_metrics.py",
                       "score_generations.py"):
            sys.argv, out = [script, "--help"], io.StringIO()
            with contextlib.redirect_stdout(out):
                try:
                    runpy.run_path("scripts/" + script, run_name="__main__")
                except SystemExit as exit:
                    assert exit.code in (0, None), (script, exit.code)
            assert out.getvalue().startswith("usage:"), (script, out.getvalue()[:200])
            print(script, "ok")
    """)
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        'fairseq is not installed: pip install "scalegrad[fairseq]" (or bash scripts/setup_env.sh)',
        "run_gpt2.py ok", "prepare_data.py ok", "report_metrics.py ok", "score_generations.py ok"]


@pytest.mark.slow
def test_the_wheel_holds_the_core_and_names_fairseq_only_as_an_extra(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(ROOT / "setup.py", source)
    shutil.copy(ROOT / "README.md", source)
    shutil.copytree(ROOT / "scalegrad", source / "scalegrad", ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                             "--disable-pip-version-check", "-q", "-w", str(tmp_path / "dist"), "."],
                            cwd=source, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("scalegrad-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl")  # pure Python: nothing compiled
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = email.message_from_string(archive.read(metadata_name).decode())
    for module in ("scalegrad/__init__.py", "scalegrad/losses.py", "scalegrad/fused.py", "scalegrad/hf_trainer.py",
                   "scalegrad/gpt2/driver.py", "scalegrad/data.py", "scalegrad/report.py",
                   "scalegrad/fairseq_plugin/__init__.py"):
        assert module in names, module
    assert not [n for n in names if n.startswith("tests/") or n.endswith(".pyc")]

    requires = metadata.get_all("Requires-Dist")
    unconditional = [r for r in requires if "extra ==" not in r]
    assert not [r for r in unconditional if "fairseq" in r or "triton" in r], unconditional
    assert {r.split(";")[0].split("=")[0].split(">")[0].strip() for r in unconditional} >= {"torch", "transformers"}
    assert set(metadata.get_all("Provides-Extra")) >= {"fairseq", "triton", "dev"}

    def extra(name):
        return [r.split(";")[0].strip() for r in requires if f'extra == "{name}"' in r]

    assert extra("fairseq") == ["fairseq-fixed==0.12.3.1", "tensorboardX"]
    assert extra("triton") == ["triton"]
    assert {"trl", "peft", "accelerate>=1.1"} <= set(extra("dev"))
    assert extra("eval") == ["mauve-text>=0.4", "faiss-cpu", "scikit-learn"]
    assert set(extra("eval")) <= set(extra("dev"))  # the MAUVE tests' oracle
    assert metadata["Requires-Python"] == ">=3.10"
