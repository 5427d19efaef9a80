# edgepipe: the two commands of the README's quick start are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.edgepipe-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo lint test test-fast bench clean arm64-check

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, exactly pinned: a looser spec pulls a multi-GB CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	# the exact tested set (constraints.txt) within pyproject's ranges; '.[test]' = every extra + pytest, ruff, mypy
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

setup: $(STAMP)

demo: setup
	$(VENV)/bin/edgepipe run --workdir runs/demo

# style and types: ruff (lint + format, config in pyproject.toml) and mypy on the product packages
lint: setup
	$(VENV)/bin/ruff check pipeline exporters runtimes targets tests benchmarks
	$(VENV)/bin/ruff format --check pipeline exporters runtimes targets tests benchmarks
	$(VENV)/bin/mypy pipeline exporters runtimes targets

test: lint
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# opt-in, needs root + `apt-get install qemu-user-static debootstrap binfmt-support`: builds a Debian arm64 root
# filesystem once in .arm64-rootfs/ and runs every aarch64 target's bundle of RUN under QEMU (README "Static shapes
# and the aarch64 check")
RUN ?= runs/demo
arm64-check: setup
	nice -n 10 $(PY) -m runtimes.arm64 --run $(RUN)

clean:
	rm -rf runs .pytest_cache
