# Two commands on a fresh machine: `make run` (main job on MovieLens-100K) and `make test`.
PY ?= python3
VENV ?= .venv
DATA ?= ../shared/data/movielens-100k
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1
export MLFLOW_DISABLE_TELEMETRY = true

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch first, pinned, so pip takes the local CPU wheel instead of a multi-GB CUDA build
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e ".[mlops,bench,test,ray]"
	touch $@

.PHONY: install run test bench
install: $(VENV)/.installed

run: install
	$(VENV)/bin/semalign run --data $(DATA)

# test files spread over up to 4 processes (pytest-xdist, one file's tests stay together and in order), one torch
# thread each: on 2 cores 15.5 min against 24.7 min in one process (two threads each: 24 min, 1.6x the CPU time).
# Re-measured on a fresh clone (`CI=true bash .ci/run`, install included): 23.6 min, 20.8 of them tests (242 tests; 19.9
# min with 235 before the error-contract tests); the refreshed-home tests are one xdist work unit (one refresh per run)
test: install
	OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile

bench: install
	$(VENV)/bin/python bench/bench_encoder_quantizer.py
