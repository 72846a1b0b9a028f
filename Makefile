# The README's two commands: `make compress` and `make test`. Each sets everything up first.
.PHONY: setup compress test lint benchmarks-quick

setup:
	bash scripts/setup.sh

compress: setup
	.venv/bin/wf-pipeline compress recipes/default.yaml --overwrite

test: setup
	.venv/bin/python -m pytest -q

# ruff (lint + import order) and mypy over the whole package and the test files held to the same standard;
# configured in pyproject.toml. .ci/run runs it before the tests.
LINT_FILES := tests/test_architecture.py tests/test_run_metrics.py

lint: setup
	.venv/bin/python -m ruff check wf_pipeline $(LINT_FILES)
	.venv/bin/python -m mypy wf_pipeline $(LINT_FILES)

benchmarks-quick: setup
	for b in benchmarks/*.py; do .venv/bin/python $$b --quick || exit 1; done
