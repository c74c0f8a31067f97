#!/usr/bin/env bash
# One device call: install carried wheels, GPU tests, host profile, benchmark. Logs land in $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-')
day=$(date +%F)
{
  echo "# gemmbridge GPU test suite — $day — $card"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch,cupy,jax,nvmath;print('torch',torch.__version__,'cuda',torch.version.cuda,'cupy',cupy.__version__,'jax',jax.__version__,'nvmath',nvmath.__version__)"
  python3 -m pytest -q -p no:cacheprovider -rs ${TESTS:-tests} 2>&1
} | tee "$OUT/gpu-tests.txt"
[ -n "${PROFILE:-}" ] && python3 scripts/host_profile.py 2>&1 | tee "$OUT/host-profile.txt"
[ -n "${BENCH:-}" ] && python3 benchmarks/matmul_vs_torch.py --json "$OUT/matmul.json" 2>&1 | tee "$OUT/bench.txt"
true
