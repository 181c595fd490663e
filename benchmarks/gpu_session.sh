#!/usr/bin/env bash
# One GPU session: build the extension, run the GPU tests, then the benchmarks, each step bounded in time; logs and
# results go to $RES (default benchmarks/results), and, on the device tool's machines, also into $OUT/results.tgz
# after every step (its $OUT returns few files, so one archive). Peer wheels (liger-kernel, cut-cross-entropy) are installed from
# .whl/ when present (see the device tool's README for how they travel). Steps: STEPS="build tests fused linear
# options step host logits memcheck" (default: all), e.g. STEPS="build tests" benchmarks/gpu_session.sh. "fused": the fused
# lm_head's Triton kernels alone (benchmarks/NOTES.md rows 22-23: probe_linear.py's parts "fused" and "fused-grad").
set -uo pipefail
cd "$(dirname "$0")/.."
RES="${RES:-benchmarks/results}"
mkdir -p "$RES"
pack() { [ -n "${OUT:-}" ] && tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null; return 0; }
STEPS="${STEPS:-build tests fused linear options step host logits memcheck}"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
has() { [[ " $STEPS " == *" $1 "* ]]; }
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  git log -1 --format='commit %h %s' 2>/dev/null
} > "$RES/gpu-session-device.txt" 2>&1
pack
if has build; then
  python3 -m pip install --no-build-isolation --no-deps -e . > "$RES/gpu-session-build.log" 2>&1 || { tail -30 "$RES/gpu-session-build.log"; exit 1; }
fi
pack
if has tests; then
  timeout "${TEST_TIMEOUT:-330}" python3 -m pytest -q -x -p no:cacheprovider ${TESTS:-tests} -m "${MARK:-gpu}" \
    > "$RES/gpu-session-pytest.log" 2>&1
  tail -5 "$RES/gpu-session-pytest.log"
fi
pack
if has fused; then
  timeout 200 python3 benchmarks/probe_linear.py --skip phases,e2e,tune,profile,precision > "$RES/gpu-session-fused.log" 2>&1
  grep -v -i warn "$RES/gpu-session-fused.log" | tail -40
fi
pack
if has linear; then
  timeout 240 python3 benchmarks/bench_linear_cross_entropy.py --quick --out "$RES" > "$RES/gpu-session-linear.log" 2>&1
  tail -25 "$RES/gpu-session-linear.log"
fi
pack
if has options; then
  timeout 150 python3 benchmarks/bench_options.py --reps 10 --out "$RES" > "$RES/gpu-session-options.log" 2>&1
  tail -30 "$RES/gpu-session-options.log"
fi
pack
if has step; then
  timeout 200 python3 benchmarks/bench_training_step.py --steps 6 --warmup 2 --out "$RES" > "$RES/gpu-session-step.log" 2>&1
  tail -8 "$RES/gpu-session-step.log"
fi
pack
if has host; then
  timeout 60 python3 benchmarks/profile_host.py --calls 200 --top 0 > "$RES/gpu-session-host.log" 2>&1
  grep "==" "$RES/gpu-session-host.log"
fi
pack
if has logits; then
  timeout 200 python3 benchmarks/bench_cross_entropy.py --quick --out "$RES" > "$RES/gpu-session-logits.log" 2>&1
  tail -12 "$RES/gpu-session-logits.log"
fi
pack
if has memcheck; then  # every CUDA kernel, then the fused lm_head's Triton kernels, under compute-sanitizer
  for case in gpu_memcheck_case gpu_memcheck_linear_case; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 200 compute-sanitizer --tool memcheck python3 "tests/$case.py" \
      > "$RES/gpu-session-$case.log" 2>&1
    tail -2 "$RES/gpu-session-$case.log"
  done
fi
pack
