# vitok: one command to set up and run the pipeline, one to set up and run the tests.
#   make run    - create .venv, install, run the whole DAG (tiny preset, local Ray, ./runs, demo photos)
#   make demo   - create .venv, install, overfit the tiny model on real photos and print PSNR
#   make test   - create .venv, install, lint + format check + the whole test suite
#   make bench  - benchmarks (prints tables; see benchmarks/)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch first, alone: pip then takes the wheel from this machine's disk instead of resolving a fresh one.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: setup test lint run demo bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH) -c constraints.txt
	$(PIP) install -q -e '.[dev]' -c constraints.txt
	touch $@

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q --durations=25

run: setup
	$(VENV)/bin/vitok run

demo: setup
	$(PY) -m vitok_core.demo --config tiny

bench: setup
	$(PY) benchmarks/bench_model.py
	$(PY) benchmarks/bench_ingest.py
	$(PY) benchmarks/bench_train_ae.py
	$(PY) benchmarks/bench_cache_latents.py
	$(PY) benchmarks/bench_evaluate.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .prefect
