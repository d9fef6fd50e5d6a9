# make install | make test | make test-fast | make demo   (see README.md)
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: install test test-fast lint clean gpu-wheels demo

$(VENV)/.installed: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel
	# torch first: an open `torch` requirement alone would download a multi-GB CUDA build.
	$(PY) -m pip install '$(TORCH_SPEC)'
	$(PY) -m pip install -e '.[dev]'
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q

# The quick tier for the edit-test loop: everything not marked `slow` (subprocess runs, gloo
# ranks, fault injection, whole-backbone training). CI runs the full `make test`.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

# Synthetic faces -> ArcFace + UNPG on the CPU -> 10-fold verification on held-out identities.
demo: $(VENV)/.installed
	$(PY) -m unpg.demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info

# Wheels of pytest and simplejpeg for bench/gpu_check.sh on a GPU host without network and without
# pytest: bring the .gpu_wheels folder along with the checkout.
gpu-wheels: $(VENV)/.installed
	rm -rf .gpu_wheels
	$(PY) -m pip download -q --only-binary=:all: -d .gpu_wheels pytest simplejpeg
