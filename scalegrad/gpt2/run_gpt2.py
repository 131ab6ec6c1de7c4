"""``run_gpt2.py``: finetune and evaluate a causal LM with ScaleGrad, as the paper's script.

Three ways to run the same :func:`main`:

* ``python scripts/run_gpt2.py ...`` from this repository (a thin shim);
* ``python -m scalegrad.gpt2.run_gpt2 ...`` with the package installed;
* as a file inside a copy of the package, the original release's install step
  and commands (the folder may have any name; nothing needs to be installed
  but the dependencies, and fairseq is not imported)::

      cp -r scalegrad $FAIRSEQ_DIR/fairseq/custom
      cd $FAIRSEQ_DIR
      python fairseq/custom/gpt2/run_gpt2.py --data-base ./data-bin/wikitext-103-bpe_v0 \\
          --output-dir ./checkpoint/gpt-2 --eval-split valid --mode train --gamma 0.2 ...

Run as a file, Python puts this file's folder first on ``sys.path``; its modules
(``evaluate``, ``options``, ``trainer`` ...) would shadow top-level packages of
those names, so that entry is removed. The copy's parent folder is not added
either (inside a fairseq checkout it is fairseq's own package folder, whose
``logging``, ``data`` ... would shadow others): the copy is loaded as a package
under its folder name straight from its ``__init__.py``, and :func:`main` is
imported from it.

Metrics and the paths of the result files go to standard output, as the
original printed them; progress, training reports and warnings go to the log
(standard error). See docs/gpt2-driver.md for the flags and the files.
"""

import importlib
import importlib.util
import os
import sys


def _package_of_this_copy():
    """Import the package folder that holds this file (run as a file) and
    return its ``gpt2.run_gpt2`` module."""
    here = os.path.dirname(os.path.abspath(__file__))
    package_dir = os.path.dirname(here)
    sys.path[:] = [entry for entry in sys.path
                   if os.path.abspath(entry or os.curdir) != here]
    name = os.path.basename(package_dir)
    loaded = sys.modules.get(name)
    if loaded is None or os.path.dirname(os.path.abspath(getattr(loaded, "__file__", "") or "")) \
            != package_dir:
        if loaded is not None:  # the name is taken (a module of the same name): go private
            name = "_scalegrad_copy_" + "".join(c if c.isalnum() else "_" for c in name)
        spec = importlib.util.spec_from_file_location(
            name, os.path.join(package_dir, "__init__.py"), submodule_search_locations=[package_dir])
        package = importlib.util.module_from_spec(spec)
        sys.modules[name] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{name}.gpt2.run_gpt2")


if __name__ == "__main__" and not __package__:  # python .../gpt2/run_gpt2.py
    sys.exit(_package_of_this_copy().main())

import json  # noqa: E402

from ..errors import reports_user_errors  # noqa: E402
from .driver import run  # noqa: E402
from .options import parse_args  # noqa: E402
from .plan import NO_BEST_PPL  # noqa: E402


def _json(value) -> str:
    return json.dumps(value, sort_keys=True, default=float)


def print_result(result, out=None) -> None:
    """The results on standard output, as the original printed them: the metrics
    and the paths of the files written."""
    out = sys.stdout if out is None else out
    if result.singletoken is not None:
        print("single-token metrics: " + _json(result.singletoken), file=out)
    if result.completion is not None:
        report = result.completion
        print("completion metrics: " + _json({"bpe_metrics": report["bpe_metrics"],
                                               "word_metrics": report["word_metrics"],
                                               "uniq": report["uniq"]}), file=out)
    for path in result.files:
        print(f"saved {path}", file=out)
    train = result.train
    if train is not None and train.status != "interrupted":
        if train.best_ppl == NO_BEST_PPL:
            print(f"training {train.status}: {train.total_steps} steps, no validation perplexity "
                  f"and so no best model; the last model is in {result.output_dir} (resumable "
                  f"from {os.path.join(result.output_dir, 'resume')})", file=out)
        else:
            print(f"training {train.status}: {train.total_steps} steps, best validation ppl "
                  f"{train.best_ppl:.4f} (best model in "
                  f"{os.path.join(result.output_dir, 'best')})", file=out)
    out.flush()


@reports_user_errors
def main(argv=None) -> int:
    """The ``run_gpt2.py`` command line; returns the exit status (2: a user error,
    reported in one ``error: ...`` line on standard error)."""
    result = run(parse_args(argv))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 reports
        print_result(result)
    if result.resume_hint:
        print(result.resume_hint, file=sys.stderr)
    return 0


if __name__ == "__main__":  # python -m scalegrad.gpt2.run_gpt2
    sys.exit(main())
