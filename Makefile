# Two entry points, each installing what it needs into .venv first:
#   make demo   prune the built-in default (resnet56 on digits32) to a 2x measured speedup
#   make test   lint and run the test suite: two workers (a file each), then the timing tests alone
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed-stamp
DEMO_OUT ?= runs/r56-$(shell date +%Y%m%d-%H%M%S)

.PHONY: install demo test bench

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/compressor prune --model resnet56 --data digits32 --profile ort-cpu \
		--target-speedup 2 --out $(DEMO_OUT)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile -m "not timing" --durations=12
	$(VENV)/bin/python -m pytest -q -m timing

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/speedup_vs_flops.py
