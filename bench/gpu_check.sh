#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, the CUDA toolkit and torch (nothing else
# needed), build the extension, run the GPU tests, `inmap check`, compute-sanitizer on a small
# case and the benchmark, writing logs and tables into the folder given.
#   bash bench/gpu_check.sh OUTDIR [bench/run.py arguments...]
# PHASES (default "build tests check sanitizer bench") runs a subset, e.g. to split the work
# over two 10-minute device calls: PHASES="build tests check sanitizer", then
# PHASES="build bench" (the build is incremental when build/ travels with the call).
set -uo pipefail
OUT=${1:?usage: bench/gpu_check.sh OUTDIR [bench args]}
shift
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
PHASES=${PHASES:-"build tests check sanitizer bench"}
has() { [[ " $PHASES " == *" $1 "* ]]; }
status=0
if has build; then
echo "== build" | tee "$OUT/build.log"
$PY -m pip install --no-build-isolation --no-deps -v . >> "$OUT/build.log" 2>&1 || { echo "BUILD FAILED"; tail -30 "$OUT/build.log"; exit 1; }
fi
if has tests; then
echo "== tests (GPU + core)"
(cd tests && $PY -m pytest -q --maxfail=25 -p no:cacheprovider test_cuda.py test_triton.py test_ops.py test_faithful.py \
   test_dead_class.py test_validation.py test_result.py test_install.py) > "$OUT/tests.log" 2>&1 || status=1
tail -3 "$OUT/tests.log"
fi
if has check; then
echo "== inmap check"
(cd /tmp && $PY -m inmap_ext check --json "$OUT/check.json") > "$OUT/check.log" 2>&1 || status=1
tail -3 "$OUT/check.log"
fi
if has sanitizer; then
echo "== compute-sanitizer (memcheck) on a small case"
SMALL='import torch, inmap_ext
from inmap_ext.synthetic import make_problem
p = make_problem(3000, 96, 37, device="cuda")
for design in ("chunked", "fused"):
    with inmap_ext.cuda_design(design):
        for prec in ("fp32", "tf32", "fp16", "bf16"):
            r = inmap_ext.fit_vision_proxy(p.image_features, p.text_proxies, iters=3, sinkhorn_iters=2, precision=prec, chunk_size=700)
            assert torch.isfinite(r.proxy).all()
print("sanitizer case ran")'
if command -v compute-sanitizer >/dev/null; then
  (cd /tmp && compute-sanitizer --tool memcheck --error-exitcode 9 $PY -c "$SMALL") > "$OUT/sanitizer.log" 2>&1 || status=1
  tail -3 "$OUT/sanitizer.log"
else
  echo "compute-sanitizer not found" | tee "$OUT/sanitizer.log"
fi
fi
if has bench; then
echo "== benchmark"
# default: the preset sized for one 10-minute call; pass bench/run.py arguments to change it
$PY bench/run.py --device cuda --out "$OUT" --tag gpu ${@:---preset gpu-check} > "$OUT/bench.log" 2>&1 || status=1
tail -40 "$OUT/bench.log"
fi
exit $status
