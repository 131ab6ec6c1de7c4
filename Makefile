# The README's Quickstart. Each target sets up .venv/ first (idempotent).
PY := .venv/bin/python

.PHONY: setup demo test bench
setup:
	bash scripts/setup_env.sh

demo: setup
	bash scripts/demo.sh

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/run.py
