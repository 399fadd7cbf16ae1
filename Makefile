# Two entry points for a fresh machine: `make demo` (installs the package alone) and `make test` (installs the
# package and every judge the tests compare against). Both create .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PACKAGE := $(VENV)/.installed-package
JUDGES := $(VENV)/.installed-judges

.PHONY: install demo test bench gpu-check lint clean

install: $(JUDGES)

# the package and its own dependencies only: all `make demo` needs
$(PACKAGE): pyproject.toml setup.py Makefile $(wildcard mxtools/native/*.c mxtools/native/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	touch $@

# the judges: llama.cpp (Python bindings and llama-quantize / llama-imatrix from one build, tools/llama_cpp.sh),
# transformers, GPTQModel
$(JUDGES): $(PACKAGE) tools/llama_cpp.sh
	$(PY) -m pip install -q "$$(PYTHON=$(PY) bash tools/llama_cpp.sh)"
	$(PY) -m pip install -q -e '.[test]'
	# GPTQModel, the independent reader of our GPTQ checkpoints; --no-deps keeps torch 2.13.0 (it pins numpy)
	$(PY) -m pip install -q --no-deps gptqmodel==7.6.0 accelerate==1.15.0 torchao==0.18.0 defuser==0.0.28 \
	  device-smi==0.5.7 logbar==0.4.15 pypcre==0.6.4 tokenicer==0.0.14 dill==0.4.1 psutil==7.2.2 threadpoolctl==3.8.0
	touch $@

demo: $(PACKAGE)
	$(PY) examples/demo.py out/demo

test: $(JUDGES)
	$(PY) -m pytest -q

bench: $(JUDGES)
	$(PY) -m pip install -q atheris==3.0.0  # the coverage-guided half of bench/fuzz.py
	$(PY) -m pytest -q -m slow
	$(PY) bench/run.py

gpu-check:  # uses the machine's CUDA PyTorch, not the CPU venv
	bash bench/gpu_check.sh

lint: $(JUDGES)
	$(PY) -m pytest -q -p no:cacheprovider tests/test_architecture.py  # the layer contract (also part of `make test`)
	$(PY) -m pip install -q ruff
	$(PY) -m ruff check mxtools tests bench examples

clean:
	rm -rf out
