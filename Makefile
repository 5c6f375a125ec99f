# Two entry points that do all the set-up themselves on a fresh machine:
#   make demo   creates .venv, then runs the main job on the built-in data
#   make test   creates .venv, then runs the test suite (what .ci/run calls)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= runs/quickstart

.PHONY: demo test bench gpu-check clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -c constraints.txt -e '.[test,plot]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/tinydistill quickstart --out $(OUT)

# two single-threaded processes, a test file each at a time (module fixtures built once):
# ~7 min 40 s on 2 idle cores (299 tests, 10 min 30 s with the install);
# `pytest -m "not slow"` (unit tests only) takes under a minute
test: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile

bench: $(VENV)/.installed
	$(PY) pipelines/bench_store.py
	$(PY) pipelines/bench_views.py
	$(PY) pipelines/bench_gen_logits.py
	$(PY) pipelines/bench_train.py

# one-call GPU acceptance check (docs/bench_e2e.md); e.g. make gpu-check ARGS="--device cpu --smoke"
gpu-check: $(VENV)/.installed
	$(PY) pipelines/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) runs
