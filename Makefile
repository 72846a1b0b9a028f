# The README's two commands: `make compress` and `make test`. Each sets everything up first.
.PHONY: setup compress test lint benchmarks-quick

setup:
	bash scripts/setup.sh

compress: setup
	.venv/bin/wf-pipeline compress recipes/default.yaml --overwrite

test: setup
	.venv/bin/python -m pytest -q

# Packages and modules clean under ruff and mypy so far (configured in pyproject.toml). Add one once it is
# clean; when all are, `make lint` joins .ci/run.
LINT_PATHS := wf_pipeline/deploy wf_pipeline/reporting wf_pipeline/pruning wf_pipeline/recipe wf_pipeline/models \
              wf_pipeline/runtime $(addprefix wf_pipeline/,cli.py cli_progress.py errors.py preflight.py stages.py \
              training/oneshot.py training/dense.py training/optimizer.py training/lr_schedule.py training/epoch.py)
LINT_FILES := tests/test_architecture.py tests/test_run_metrics.py

lint: setup
	.venv/bin/ruff check $(LINT_PATHS) $(LINT_FILES)
	.venv/bin/mypy $(LINT_PATHS)

benchmarks-quick: setup
	for b in benchmarks/*.py; do .venv/bin/python $$b --quick || exit 1; done
