# The README's Quickstart. Each target sets up .venv/ first (idempotent).
PY := .venv/bin/python

.PHONY: setup demo demo-fairseq compare test bench docs docs-serve
setup:
	bash scripts/setup_env.sh

# Offline MLE-versus-ScaleGrad demo with a report and plots (configs/demo.yaml).
demo: setup
	$(PY) scripts/demo.py

# The fairseq route: fairseq-train --criterion scalegrad on the same corpus.
demo-fairseq: setup
	bash scripts/demo_fairseq.sh

# Every objective against repetition on the same data, one table (configs/compare.yaml,
# docs/compare.md).
compare: setup
	$(PY) scripts/compare.py

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/run.py

# The documentation site (mkdocs.yml, docs/): built into site/ (open site/index.html), or
# served with live reload on http://127.0.0.1:8000.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

docs-serve: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve
