# The README's two commands: `make compress` and `make test`. Each sets everything up first.
.PHONY: setup compress test benchmarks-quick

setup:
	bash scripts/setup.sh

compress: setup
	.venv/bin/wf-pipeline compress recipes/default.yaml --overwrite

test: setup
	.venv/bin/python -m pytest -q

benchmarks-quick: setup
	for b in benchmarks/*.py; do .venv/bin/python $$b --quick || exit 1; done
