# Two entry points for a fresh machine: `make demo` and `make test` (both create .venv and install first).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# llama.cpp (the judge of our GGUF files) is built portably: a -march=native build uses AMX instructions on
# CPUs that advertise them even where the VM does not enable them (Illegal instruction on Q8_0 models).
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CPP_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
WHEELS := $(HOME)/.cache/mxtools/wheels
LLAMA_WHEEL = $(firstword $(wildcard $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl))

.PHONY: install demo test bench gpu-check lint clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile $(wildcard mxtools/native/*.c mxtools/native/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" $(PY) -m pip wheel -q --no-cache-dir --no-deps \
	  llama-cpp-python==$(LLAMA_CPP_VERSION) -w $(WHEELS)
	$(PY) -m pip install -q $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
	$(PY) -m pip install -q -e '.[test]'
	# GPTQModel, the independent reader of our GPTQ checkpoints; --no-deps keeps torch 2.13.0 (it pins numpy)
	$(PY) -m pip install -q --no-deps gptqmodel==7.6.0 accelerate==1.15.0 torchao==0.18.0 defuser==0.0.28 \
	  device-smi==0.5.7 logbar==0.4.15 pypcre==0.6.4 tokenicer==0.0.14 dill==0.4.1 psutil==7.2.2 threadpoolctl==3.8.0
	PYTHON=$(PY) bash tools/llama_cpp_tools.sh  # llama-quantize and llama-imatrix, the judges of mixes/imatrix
	touch $(STAMP)

demo: install
	$(PY) examples/demo.py out/demo

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) -m pytest -q -m slow
	$(PY) bench/run.py

gpu-check:  # uses the machine's CUDA PyTorch, not the CPU venv
	bash bench/gpu_check.sh

lint: install
	$(PY) -m ruff check mxtools tests bench examples

clean:
	rm -rf out
