# One-command set-up and runs. Each target creates its virtual environment, installs torch and the
# package (building the C++/CUDA extension) and runs. See README.md.
#   make demo      the main job on the built-in default (offline)
#   make test      the test suite (CUDA build of torch: every CUDA source is compiled)
#   make cpu-test  CPU-only torch, CPU-only extension, the core tests
#   make cmake-test  the CMake build of the same sources (libtorch C++ users), against CPU torch
#   make bench     the CPU benchmark cases (pytest-benchmark)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
VENV_CPU ?= .venv-cpu
TORCH ?= torch==2.14.1 torchvision==0.29.1
TORCH_CPU ?= torch==2.13.0
DEPS = numpy safetensors tqdm pillow pytest pytest-benchmark psutil ninja setuptools wheel
CLIP_DEPS = open_clip_torch
PIP_FLAGS ?= -q
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export MAX_JOBS ?= 2
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.* csrc/*/*.* inmap_ext/*.py)

.PHONY: install demo test cpu-test cmake-test bench check clean

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) $(TORCH) $(DEPS) $(CLIP_DEPS)
	touch $@

$(VENV)/.installed: $(VENV)/.deps $(SOURCES)
	$(VENV)/bin/pip install $(PIP_FLAGS) --no-build-isolation --no-deps .
	touch $@

install: $(VENV)/.installed

demo: install
	cd /tmp && $(CURDIR)/$(VENV)/bin/python -m inmap_ext demo

test: install
	cd tests && $(CURDIR)/$(VENV)/bin/python -m pytest -c ../pyproject.toml --rootdir .. . $(PYTEST_ARGS)

check: install
	cd /tmp && $(CURDIR)/$(VENV)/bin/python -m inmap_ext check

bench: install
	cd bench && $(CURDIR)/$(VENV)/bin/python -m pytest -c ../pyproject.toml --rootdir .. bench_cpu.py --benchmark-only --benchmark-columns=min,median,max,rounds $(PYTEST_ARGS)

$(VENV_CPU)/.deps:
	$(PYTHON) -m venv $(VENV_CPU)
	$(VENV_CPU)/bin/pip install $(PIP_FLAGS) $(TORCH_CPU) numpy safetensors tqdm pytest psutil ninja setuptools wheel
	touch $@

$(VENV_CPU)/.installed: $(VENV_CPU)/.deps $(SOURCES)
	env -u CUDA_HOME $(VENV_CPU)/bin/pip install $(PIP_FLAGS) --no-build-isolation --no-deps .
	touch $@

cpu-test: $(VENV_CPU)/.installed
	cd tests && env -u INMAP_EXPECT_CUDA_KERNELS $(CURDIR)/$(VENV_CPU)/bin/python -m pytest -c ../pyproject.toml --rootdir .. . -m "not slow" $(PYTEST_ARGS)

cmake-test: $(VENV_CPU)/.deps
	rm -rf build-cmake
	cmake -S . -B build-cmake -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(VENV_CPU)/bin/python -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build build-cmake -j $(MAX_JOBS)
	INMAP_CMAKE_LIB=$(CURDIR)/build-cmake/libinmap_ops.so $(VENV_CPU)/bin/python -m pytest -q tests/test_cmake_build.py

clean:
	rm -rf build build-cmake *.egg-info inmap_ext/_C*.so
