#!/usr/bin/env bash
# Compile, link and load the CUDA kernel on a machine without a GPU (it cannot run here).
# mlpot's on-first-use build skips the CUDA part when torch sees no GPU or nvcc's CUDA major version
# differs from torch's; this script compiles neighbor_list_cuda.cu anyway (for sm_90, against
# torch's headers, with the static CUDA runtime of whatever nvcc is on PATH), links it with the CPU
# part and checks that the op loads with both a CPU and a CUDA kernel registered.
# Usage: bash cpp/check_cuda_build.sh [OUT_DIR]     (needs nvcc and g++; ~40 s)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
command -v nvcc >/dev/null || { echo "nvcc not found: install the CUDA toolkit or put nvcc on PATH" >&2; exit 2; }
python -c "import torch" 2>/dev/null || { echo "torch not importable: pip install -e . first" >&2; exit 2; }
OUT=${1:-$(mktemp -d)}
mkdir -p "$OUT"
read -r TL PYI CUDA_LIB < <(python - <<'PY'
import glob, os, shutil, sysconfig, torch
nvcc = os.path.realpath(shutil.which("nvcc") or "nvcc")
roots = [os.environ.get("CUDA_HOME", ""), os.path.dirname(os.path.dirname(nvcc)), "/usr/local/cuda",
         *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
lib = next((os.path.join(r, "lib64") for r in roots
            if r and os.path.exists(os.path.join(r, "lib64", "libcudart_static.a"))), "")
print(os.path.join(os.path.dirname(torch.__file__), "lib"), sysconfig.get_paths()["include"], lib)
PY
)
TI=$(python -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))" 2>/dev/null)
nvcc -std=c++17 -c "$HERE/neighbor_list_cuda.cu" -o "$OUT/nl_cuda.o" $TI -I"$PYI" \
    -D_GLIBCXX_USE_CXX11_ABI=1 --expt-relaxed-constexpr -gencode arch=compute_90,code=sm_90 \
    -Xcompiler -fPIC
g++ -O1 -std=c++17 -fPIC -shared -D_GLIBCXX_USE_CXX11_ABI=1 $TI -I"$PYI" "$HERE/neighbor_list.cpp" \
    "$OUT/nl_cuda.o" -o "$OUT/mlpot_nl_cuda_check.so" -L"$TL" -lc10 -lc10_cuda -ltorch -ltorch_cpu \
    -ltorch_cuda -L"$CUDA_LIB" -lcudart_static -lrt -ldl -lpthread -fopenmp
python - "$OUT/mlpot_nl_cuda_check.so" <<'PY'
import sys, torch
torch.ops.load_library(sys.argv[1])
dump = torch._C._dispatch_dump("mlpot::neighbor_list")
keys = [ln.split(":")[0] for ln in dump.splitlines() if "registered at" in ln and "::" in ln]
assert "CPU" in keys and "CUDA" in keys, dump
print("OK: the CUDA kernel compiles, links and registers (", ", ".join(keys), ");",
      "running it needs a GPU")
PY
