# Everything runs inside .venv, created and filled by the targets themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo lint docs bench clean reliability-model

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/dialab demo -o demo-output

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

docs: $(STAMP)
	$(BIN)/python -m sphinx -W --keep-going -q -b html docs docs/_build/html

bench: $(STAMP)
	for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# The shipped real/bogus model: simulates and runs its training and held-out datasets in reliability-work/ (~25 min
# on 2 cores; reused when present), trains, prints the held-out evaluation.
reliability-model: $(STAMP)
	$(BIN)/python -m dialab.analysis.reliability_training reliability-work src/dialab/data/reliability-v1.json

clean:
	rm -rf $(VENV) demo-output docs/_build
