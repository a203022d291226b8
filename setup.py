"""Build of inmap_ext and its compiled ops ``inmap_ext._C``.

One build, two front ends over the same sources: this file (pip) and CMakeLists.txt (libtorch
C++ users). Both take every ``csrc/*.cpp`` and ``csrc/cpu/*.cpp`` and, when CUDA is built,
every ``csrc/cuda/*.cu``; only ``csrc/python_module.cpp`` (the empty Python module init) is
pip-only.

Switches (environment variables):
  FORCE_CUDA=1        build the CUDA kernels even if torch sees no GPU (`make test` and CI do,
                      so that every CUDA source is compiled). Without it the CUDA kernels are
                      built only when torch is a CUDA build, a CUDA toolkit is found AND a GPU
                      is visible: a GPU-less machine gets the CPU kernels in about a minute
                      instead of ~15 minutes of nvcc for kernels it cannot run.
  FORCE_ONLY_CPU=1    build only the CPU kernels (wins over FORCE_CUDA)
  INMAP_NO_EXTENSION=1  install the pure-Python package only (pure-torch backend)
  TORCH_CUDA_ARCH_LIST  GPU architectures (default "8.0;9.0")
  MAX_JOBS            parallel compile jobs
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _cublas_paths(cuda_home):
    """Include and library flags for cuBLAS. A full toolkit has them under CUDA_HOME; a minimal
    one (nvcc + cudart) does not, and then the headers and libraries of the NVIDIA pip wheels
    that torch itself depends on (site-packages/nvidia/*) are used."""
    roots = [cuda_home]
    try:
        import nvidia

        roots += [d for base in nvidia.__path__ for d in sorted(glob.glob(os.path.join(base, "*")))]
    except ImportError:
        pass
    inc = next((os.path.join(r, "include") for r in roots
                if os.path.exists(os.path.join(r, "include", "cublas_v2.h"))), None)
    libs = [p for r in roots for sub in ("lib64", "lib")
            for p in sorted(glob.glob(os.path.join(r, sub, "libcublas.so*")))]
    if inc is None or not libs:
        raise RuntimeError(f"cuBLAS headers/libraries not found under {roots}; install the CUDA "
                           "toolkit's cuBLAS or set FORCE_ONLY_CPU=1")
    lib = libs[0] if os.path.basename(libs[0]) == "libcublas.so" else libs[-1]
    include_dirs = [] if inc == os.path.join(cuda_home, "include") else [inc]
    return include_dirs, ["-L" + os.path.dirname(lib), "-l:" + os.path.basename(lib)]


def _extensions():
    if _flag("INMAP_NO_EXTENSION"):
        return [], {}
    import torch
    from torch.utils import cpp_extension as ce

    cuda_sources = _sources("csrc/cuda/*.cu")
    can_cuda = torch.version.cuda is not None and ce.CUDA_HOME is not None
    if _flag("FORCE_CUDA") and not can_cuda:
        raise RuntimeError(
            "FORCE_CUDA=1 but torch is not a CUDA build or no CUDA toolkit was found "
            f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={ce.CUDA_HOME}); "
            "set CUDA_HOME to the toolkit, e.g. CUDA_HOME=/usr/local/cuda")
    # CUDA kernels: a CUDA build of torch plus a toolkit, and either a visible GPU or
    # FORCE_CUDA=1 (a GPU-less machine need not wait for kernels it cannot run).
    gpu = can_cuda and torch.cuda.is_available()
    want_cuda = can_cuda and (gpu or _flag("FORCE_CUDA")) and not _flag("FORCE_ONLY_CPU")
    if _flag("FORCE_ONLY_CPU"):
        why = "FORCE_ONLY_CPU=1"
    elif want_cuda:
        why = "a GPU is visible" if gpu else "FORCE_CUDA=1"
    elif not can_cuda:
        why = ("torch is a CPU-only build" if torch.version.cuda is None
               else "no CUDA toolkit found (set CUDA_HOME)")
    else:
        why = "no GPU visible; FORCE_CUDA=1 builds the CUDA kernels too (~15 min on 2 cores)"
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    # the C++ standard is the one torch asks for (C++17 or C++20). -g0: no debug info (Python's
    # -g more than doubles the compile time of the torch headers: ~1 min instead of ~2.5 on 2 cores)
    cxx = ["-O3", "-g0"]
    link = []
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    define_macros = []
    if want_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        define_macros.append(("INMAP_WITH_CUDA", None))
        include_dirs, cublas_link = _cublas_paths(ce.CUDA_HOME)
        ext = ce.CUDAExtension(
            "inmap_ext._C",
            sources + cuda_sources,
            define_macros=define_macros,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link + cublas_link,
        )
    else:
        ext = ce.CppExtension(
            "inmap_ext._C", sources, define_macros=define_macros,
            extra_compile_args={"cxx": cxx}, extra_link_args=link,
        )
    n = len(sources) + (len(cuda_sources) if want_cuda else 0)
    print(f"inmap_ext: building the {'CUDA + CPU' if want_cuda else 'CPU-only'} extension, "
          f"{n} sources ({why}; torch {torch.__version__}, CUDA_HOME={ce.CUDA_HOME})",
          file=sys.stderr, flush=True)
    return [ext], {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
