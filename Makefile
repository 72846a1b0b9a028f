# The README's two commands: `make compress` and `make test`. Each sets everything up first.
.PHONY: setup compress test lint benchmarks-quick

setup:
	bash scripts/setup.sh

compress: setup
	.venv/bin/wf-pipeline compress recipes/default.yaml --overwrite

test: setup
	.venv/bin/python -m pytest -q

# Packages clean under ruff and mypy so far (configured in pyproject.toml). Add a package once it is
# clean; when all are, `make lint` joins .ci/run.
LINT_PACKAGES := wf_pipeline/deploy wf_pipeline/reporting wf_pipeline/pruning wf_pipeline/sparseml wf_pipeline/recipe \
                 wf_pipeline/models
# Top-level modules of wf_pipeline/ (without .py) clean so far.
LINT_MODULES := atomic_io cli cli_progress device distributed errors launch oneshot param_catalog preflight progress \
                rundir stages train_dense
LINT_FILES := tests/test_architecture.py tests/test_run_metrics.py

lint: setup
	.venv/bin/ruff check $(LINT_PACKAGES) $(patsubst %,wf_pipeline/%.py,$(LINT_MODULES)) $(LINT_FILES)
	.venv/bin/mypy $(addprefix -p ,$(subst /,.,$(LINT_PACKAGES))) $(addprefix -p wf_pipeline.,$(LINT_MODULES))

benchmarks-quick: setup
	for b in benchmarks/*.py; do .venv/bin/python $$b --quick || exit 1; done
