"""The test suite. A package so that tests and benchmarks import shared code the same way:
``from tests import helpers``, ``from tests.references import ...``."""
