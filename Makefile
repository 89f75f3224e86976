# vitok: one command to set up and run the pipeline, one to set up and run the tests.
#   make run    - create .venv, install, run the whole DAG (tiny preset, local Ray, ./runs, demo photos)
#   make demo   - create .venv, install, overfit the tiny model on real photos and print PSNR
#   make study  - create .venv, install, the ~90-minute CPU training study -> docs/results.md (not in CI)
#   make test   - create .venv, install, lint + format check + the whole test suite
#   make bench  - benchmarks (prints tables; see benchmarks/)
#   make gpu-wheels - .whl/: the wheels benchmarks/gpu_check.py needs on the lent GPU machine (docs/gpu-check.md)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch first, alone: pip then takes the wheel from this machine's disk instead of resolving a fresh one.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: setup test lint run demo study bench gpu-wheels clean

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

study: setup
	$(VENV)/bin/vitok study

demo: setup
	$(PY) -m vitok_core.demo --config tiny

bench: setup
	$(PY) benchmarks/bench_model.py
	$(PY) benchmarks/bench_ingest.py
	$(PY) benchmarks/bench_train_ae.py
	$(PY) benchmarks/bench_cache_latents.py
	$(PY) benchmarks/bench_evaluate.py

# The lent GPU machine (docs/gpu-check.md) has torch but no package registry and no deepspeed, omegaconf or
# deepspeed's pydantic / hjson: they travel as wheels in .whl/ (git-ignored, carried). Versions come from
# constraints.txt. DeepSpeed publishes only an sdist: built here without its compiled ops (DS_BUILD_OPS=0),
# which gives a pure-Python wheel; the check below fails if it is not py3-none-any or holds a shared object.
WHEELS := .whl
GPU_PLATFORM := --only-binary=:all: --python-version 3.12 --implementation cp \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
# typing-extensions too: pydantic needs >= 4.16, and the machine's version is not known.
GPU_WHEELS := omegaconf antlr4-python3-runtime hjson pydantic pydantic-core annotated-types typing-inspection \
	typing-extensions

gpu-wheels: setup
	rm -rf $(WHEELS) && mkdir -p $(WHEELS)
	DS_BUILD_OPS=0 $(PIP) wheel -q --no-deps --no-build-isolation -c constraints.txt -w $(WHEELS) deepspeed
	$(PIP) download -q --no-deps $(GPU_PLATFORM) -c constraints.txt -d $(WHEELS) $(GPU_WHEELS)
	$(PY) -c "import sys, zipfile; so = [n for n in zipfile.ZipFile(sys.argv[1]).namelist() if n.endswith(('.so', '.pyd'))]; \
		sys.exit(f'compiled files in the deepspeed wheel: {so}' if so else 0)" $(WHEELS)/deepspeed-*-py3-none-any.whl
	du -ch $(WHEELS)/*.whl

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .prefect
