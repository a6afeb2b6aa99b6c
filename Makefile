# clip_har: `make run` (the main job) and `make test` (every check) do all set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Tests and docs never touch the network.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline DO_NOT_TRACK=1
DEMO_SOURCE := $(shell [ -f ../shared/data/har-mini/labels.csv ] && echo ../shared/data/har-mini || echo nbs/fixtures/har-tiny)

.PHONY: install run demo test check nbtest pytest docs export bench-data clean

$(STAMP): settings.ini setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $(STAMP)

install: $(STAMP)

## The main job (today: validate and prepare data.source from params.yaml).
run: install
	$(BIN)/clip-har prepare

## The same job offline on har-mini (or the committed fixtures), labelled as a smoke run.
demo: install
	$(OFFLINE) $(BIN)/clip-har prepare --set data.source=$(DEMO_SOURCE) --out outputs/demo/prepared

test: install check nbtest docs pytest

check: install
	$(BIN)/python tools/check_sync.py

nbtest: install
	$(OFFLINE) $(BIN)/nbdev_test --n_workers 2

docs: install
	$(OFFLINE) $(BIN)/python tools/docs.py

pytest: install
	$(OFFLINE) $(BIN)/python -m pytest tests -q -p no:cacheprovider

## After editing notebooks: export the package, clean the notebooks, render the README.
export: install
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean && $(BIN)/python tools/readme.py

bench-data: install
	$(OFFLINE) $(BIN)/python -c "from clip_har.data import benchmark_loaders; benchmark_loaders('$(DEMO_SOURCE)')"

clean:
	rm -rf _proc _docs .pytest_cache
