# The README's two commands: `make compress` and `make test`. Each sets everything up first.
.PHONY: setup compress test lint benchmarks-quick

setup:
	bash scripts/setup.sh

compress: setup
	.venv/bin/wf-pipeline compress recipes/default.yaml --overwrite

test: setup
	.venv/bin/python -m pytest -q

# ruff (lint + import order) and mypy over the package, its tests, the benchmarks and the scripts, all held
# to the same standard; configured in pyproject.toml. .ci/run runs it before the tests.
LINT_PATHS := wf_pipeline tests benchmarks scripts

lint: setup
	.venv/bin/python -m ruff check $(LINT_PATHS)
	.venv/bin/python -m mypy $(LINT_PATHS)

benchmarks-quick: setup
	for b in benchmarks/[!_]*.py; do .venv/bin/python $$b --quick || exit 1; done
