#!/usr/bin/env bash
# `make test-isa`: the numerics-heavy test files under each CPU kernel level that torch dispatches
# below this CPU's own (the plain `make test` run covers that one): `avx2` on an AVX-512 machine and
# `default` (no vector ISA) everywhere. Each level limits ATen's kernels, oneDNN and MKL alike, so a
# comparison that holds only for one CPU's rounding fails here rather than on a user's machine.
# Levels to run may be given as arguments (avx512 avx2 default).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
files=(tests/test_model.py tests/test_mha.py tests/test_generate.py tests/test_checkpoint.py
       tests/test_engine.py tests/test_engine_cache.py tests/test_engine_sampler.py tests/test_kernels.py
       tests/test_kv_quant.py tests/test_losses.py tests/test_train.py tests/test_align.py
       tests/test_eval.py tests/test_eval_ppl_niah.py)

native=$("$python" -c "import torch; print(torch.backends.cpu.get_cpu_capability().lower())")
if [ $# -gt 0 ]; then
    levels=("$@")
else
    case "$native" in
        avx512*) levels=(avx2 default) ;;
        avx2) levels=(default) ;;
        *) levels=() ;;
    esac
fi

for level in "${levels[@]}"; do
    case "$level" in
        avx512) onednn=AVX512_CORE mkl=AVX512 ;;
        avx2) onednn=AVX2 mkl=AVX2 ;;
        default) onednn=SSE41 mkl=SSE4_2 ;;
        *) echo "unknown level $level (avx512, avx2, default)" >&2; exit 2 ;;
    esac
    export ATEN_CPU_CAPABILITY=$level ONEDNN_MAX_CPU_ISA=$onednn MKL_ENABLE_INSTRUCTIONS=$mkl
    got=$("$python" -c "import torch; print(torch.backends.cpu.get_cpu_capability().lower())")
    echo "== CPU kernels: $got (asked $level; this CPU: $native)"
    "$python" -m pytest -p no:cacheprovider "${files[@]}"
done
