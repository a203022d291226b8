# One-command set-up and runs. Each target creates its virtual environment, installs torch and the
# package (building the C++/CUDA extension) and runs. See README.md.
#   make demo      the main job on the built-in default (offline). The extension is built for
#                  what the machine can run: CUDA kernels only when a GPU is visible (or
#                  FORCE_CUDA=1); a GPU-less machine builds the CPU kernels in about a minute.
#   make test      the test suite; wherever nvcc is found it builds with FORCE_CUDA=1, so every
#                  CUDA source is compiled (~4 min on 2 cores) even without a GPU
#   make cpu-test  CPU-only torch, CPU-only extension, the core tests
#   make cmake-test  the CMake build of the same sources (libtorch C++ users), against CPU torch
#   make bench     the CPU benchmark cases (pytest-benchmark)
SHELL := /bin/bash
comma := ,
PYTHON ?= python3
VENV ?= .venv
VENV_CPU ?= .venv-cpu
TORCH ?= torch==2.14.1 torchvision==0.29.1
TORCH_CPU ?= torch==2.13.0
DEPS = numpy safetensors tqdm pillow pytest pytest-benchmark psutil ninja setuptools wheel \
       webdataset pyarrow
CLIP_DEPS = open_clip_torch
PIP_FLAGS ?=
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export MAX_JOBS ?= 2
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.* csrc/*/*.* inmap_ext/*.py)
# `make test` compiles every CUDA source wherever a CUDA toolkit is found (BUILD=cuda sets
# FORCE_CUDA=1); the other targets build what the machine can run (BUILD=auto: setup.py adds the
# CUDA kernels when a GPU is visible). $(VENV)/.installed holds the kind last built.
NVCC := $(firstword $(wildcard $(CUDA_HOME)/bin/nvcc) $(shell command -v nvcc 2>/dev/null))
TEST_BUILD := $(if $(NVCC),cuda,auto)
BUILD ?= auto

# a line every 30 s while a long step runs: no silent minutes
TICK = start=$$(date +%s); ( while sleep 30; do echo "   ... $(1): $$(( $$(date +%s) - start )) s so far"; done ) & tick=$$!; trap "kill $$tick 2>/dev/null" EXIT;
# pip -v | the lines that say what is built: setup.py's (once), and ninja's [k/n] per compiled source
BUILD_LOG = $(VENV)/build.log
SHOW_BUILD = awk '/^ *inmap_ext: building/ && !seen[$$0]++ { sub(/^ +/, ""); print "   " $$0; fflush() } \
  /^ *\[[0-9]+\/[0-9]+\] / { f = ""; for (i = 2; i <= NF; i++) if ($$i ~ /csrc\/.*\.(cpp|cu)$$/) f = $$i; \
    sub(/.*\/csrc\//, "csrc/", f); print "   " $$1 " compiled " f; fflush() }'

.PHONY: install demo test cpu-test cmake-test bench check clean

$(VENV)/.deps:
	@echo "== dependencies into $(VENV): $(TORCH) (torch's CUDA build, ~5.5 GB on disk; about 2 min from a local mirror, longer when downloaded), open_clip, numpy, pytest"
	$(PYTHON) -m venv $(VENV)
	@$(call TICK,installing) $(VENV)/bin/pip install $(PIP_FLAGS) $(TORCH) $(DEPS) $(CLIP_DEPS)
	touch $@

$(VENV)/.installed: $(VENV)/.deps $(SOURCES)
	@echo "== building the extension inmap_ext._C ($(if $(filter cuda,$(BUILD)),FORCE_CUDA=1: CPU + every CUDA kernel$(comma) ~4 min on 2 cores,CPU kernels: ~1 min on 2 cores$(comma) + CUDA kernels only if a GPU is visible: ~4 min)); full log: $(BUILD_LOG)"
	@set -o pipefail; : > $(BUILD_LOG); $(call TICK,building) \
	  $(if $(filter cuda,$(BUILD)),FORCE_CUDA=1) $(VENV)/bin/pip install -v --no-build-isolation --no-deps . >> $(BUILD_LOG) 2>&1 & pip=$$!; \
	  tail -n +1 -f --pid=$$pip $(BUILD_LOG) | $(SHOW_BUILD); \
	  wait $$pip || { echo "build failed; the end of $(BUILD_LOG):"; tail -40 $(BUILD_LOG); exit 1; }; \
	  echo "   built in $$(( $$(date +%s) - start )) s"
	@echo $(BUILD) > $@

install: $(VENV)/.installed

demo: install
	@echo "== the demo: python -m inmap_ext demo"
	cd /tmp && $(CURDIR)/$(VENV)/bin/python -m inmap_ext demo

test: $(VENV)/.deps
	@if [ "$$(cat $(VENV)/.installed 2>/dev/null)" != "$(TEST_BUILD)" ]; then rm -f $(VENV)/.installed; fi
	@$(MAKE) --no-print-directory $(VENV)/.installed BUILD=$(TEST_BUILD)
	cd tests && $(CURDIR)/$(VENV)/bin/python -m pytest -c ../pyproject.toml --rootdir .. . $(PYTEST_ARGS)

check: install
	cd /tmp && $(CURDIR)/$(VENV)/bin/python -m inmap_ext check

bench: install
	cd bench && $(CURDIR)/$(VENV)/bin/python -m pytest -c ../pyproject.toml --rootdir .. bench_cpu.py --benchmark-only --benchmark-columns=min,median,max,rounds $(PYTEST_ARGS)

$(VENV_CPU)/.deps:
	$(PYTHON) -m venv $(VENV_CPU)
	$(VENV_CPU)/bin/pip install $(PIP_FLAGS) $(TORCH_CPU) numpy safetensors tqdm pytest psutil ninja setuptools wheel
	@$(VENV_CPU)/bin/python -c "import sys, torch; sys.exit(None if torch.version.cuda is None else 'cpu-test needs a CPU-only torch, got ' + torch.__version__ + ' (a CUDA build): set TORCH_CPU, e.g. with --index-url https://download.pytorch.org/whl/cpu')"
	touch $@

$(VENV_CPU)/.installed: $(VENV_CPU)/.deps $(SOURCES)
	env -u CUDA_HOME -u FORCE_CUDA $(VENV_CPU)/bin/pip install $(PIP_FLAGS) --no-build-isolation --no-deps .
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
