#!/usr/bin/env bash
# One device call: install the carried wheels, then run the steps named in $STEPS (default: tests),
# each writing its log under $OUT. Steps: tests (PYTEST_ARGS, TESTS), profile, probe, ab, training, lora, finetune,
# e2e, hostcost, distributed, bench, benchcli, skinny, dropout, kernels, pdl, stress, rsscontrol, soak, sanitize,
# freshvenv, tune.
# STEP_TIMEOUT (s) bounds each step.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
header() {
  echo "# $1 — $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch,cupy,jax,nvmath,cuda.bindings as cb;from gemmbridge.backends.cuda import bindings as b;print('torch',torch.__version__,'cuda',torch.version.cuda,'cupy',cupy.__version__,'jax',jax.__version__,'nvmath',nvmath.__version__,'cuda-bindings',cb.__version__,'cuBLASLt',b.version())"
}
# run_script NAME LIMIT SCRIPT [ARGS...]: a header, then python3 SCRIPT ARGS --json $OUT/NAME.json bounded by
# STEP_TIMEOUT (LIMIT s when unset), its exit status; all of it printed and kept in $OUT/NAME.txt
run_script() {
  local name=$1 limit=$2 script=$3
  shift 3
  { header "$script $*"
    timeout "${STEP_TIMEOUT:-$limit}" python3 "$script" "$@" --json "$OUT/$name.json"
    echo "exit status $?"; } 2>&1 | tee "$OUT/$name.txt"
}
for step in ${STEPS:-tests}; do
  case $step in
    tests) { header "gemmbridge GPU test suite: pytest ${TESTS:-tests}"
             timeout ${STEP_TIMEOUT:-480} python3 -m pytest -q -p no:cacheprovider -rsfE --tb=short ${PYTEST_ARGS:-} ${TESTS:-tests} 2>&1
             echo "exit status $?"; } | tee "$OUT/gpu-tests.txt" ;;
    ab)
      # host cost of a small call: this tree against the one carried in .ab/old-src, alternating processes
      { header "scripts/host_overhead_ab.py: .ab/old-src against src"
        timeout ${STEP_TIMEOUT:-240} python3 scripts/host_overhead_ab.py --label old=.ab/old-src --label new=src \
          --rounds ${AB_ROUNDS:-3} --json "$OUT/host-ab.json"; echo "exit status $?"; } 2>&1 | tee "$OUT/host-ab.txt" ;;
    training) run_script training-layers 420 benchmarks/training_layers.py ${TRAINING_ARGS:-} ;;
    e2e)
      # LoRA fine-tune step end to end (benchmarks/lora_e2e.py): one process per token count in E2E_TOKENS, each
      # bounded by STEP_TIMEOUT, with E2E_ARGS; several token counts are then merged into lora-e2e.json
      { header "benchmarks/lora_e2e.py, tokens ${E2E_TOKENS:-4096}, ${E2E_ARGS:-default options}"
        for t in ${E2E_TOKENS:-4096}; do
          timeout ${STEP_TIMEOUT:-540} python3 benchmarks/lora_e2e.py --tokens $t ${E2E_ARGS:-} --json "$OUT/lora-e2e-$t.json"
          echo "exit status $?"
        done
        set -- "$OUT"/lora-e2e-*.json
        if [ $# -gt 1 ]; then python3 benchmarks/lora_e2e.py --merge "$@" --json "$OUT/lora-e2e.json"; fi
      } 2>&1 | tee "$OUT/lora-e2e.txt" ;;
    hostcost)
      # host µs per call of gemmbridge's training paths against torch's, one process, interleaved (HOSTCOST_ARGS)
      run_script host-cost 300 scripts/host_cost.py ${HOSTCOST_ARGS:-} ;;
    distributed)
      # DDP and FSDP2 on every GPU against one GPU (tests/test_distributed.py's GPU half: 20 steps, the LoRA runs with
      # float32 and bf16 adapters, dropout 0 and 0.05; -rA prints each run's gaps), then benchmarks/distributed_training.py:
      # gemmbridge and plain torch layers, PEFT, the bridge and apply_lora, on one GPU and on all, into one JSON
      { header "DDP / FSDP2 on $(nvidia-smi -L | wc -l) GPUs"
        export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
        timeout ${STEP_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider -rA -k cuda tests/test_distributed.py
        echo "exit status $?"
        timeout ${STEP_TIMEOUT:-280} python3 benchmarks/distributed_training.py --steps ${DIST_STEPS:-20} \
          --json "$OUT/distributed-training.json"
        echo "exit status $?"
      } 2>&1 | tee "$OUT/distributed.txt" ;;
    lora)
      # LoRA: the op alone against PEFT, the composite and the frozen layer (LORA_ARGS=--quick: one shape)
      run_script lora-linear 480 benchmarks/lora_linear.py ${LORA_ARGS:-} ;;
    finetune)
      # LoRA end to end: the small Llama through PEFT and through the bridge, beside the frozen floor
      run_script finetune-lora 420 examples/finetune_lora.py ${FINETUNE_ARGS:-} --plot "$OUT/finetune-lora.png" ;;
    profile) python3 scripts/host_profile.py 2>&1 | tee "$OUT/host-profile.txt" ;;
    probe)
      # host µs of the ways a training op can reach a GEMM: aten, gb.matmul, resolved plans, custom-op registrations
      run_script lane-probe 300 scripts/lane_probe.py ;;
    tune)
      # the tuning tests, then gemmbridge tune on large shapes (first pick vs tuned), into a cache kept under $OUT
      { header "tuning: tests, gemmbridge tune ${TUNE_SHAPES:-4096x4096x4096,8192x8192x8192,16384x4096x4096}"
        timeout ${STEP_TIMEOUT:-480} python3 -m pytest -q -p no:cacheprovider -rsfE --tb=short tests/test_tuning_gpu.py \
          tests/test_tuning_emulated.py tests/test_tuning.py tests/test_tuner.py; echo "exit status $?"
        GEMMBRIDGE_CACHE_DIR="$OUT/tuning-cache" timeout ${STEP_TIMEOUT:-480} python3 -m gemmbridge.cli tune --no-progress \
          --shapes ${TUNE_SHAPES:-4096x4096x4096,8192x8192x8192,16384x4096x4096} --dtype ${TUNE_DTYPES:-bf16,fp16} \
          --json "$OUT/tune.json"; echo "exit status $?"; } 2>&1 | tee "$OUT/tune.txt" ;;
    skinny)
      # bandwidth-bound GEMMs: torch, gemmbridge on cuBLASLt, with its rule, with its kernel everywhere (SKINNY_ARGS)
      run_script skinny 480 benchmarks/skinny_gemms.py ${SKINNY_ARGS:-} ;;
    dropout)
      # the LoRA kernels (dropout inside the skinny kernel, dy read once): their GPU tests and the skinny kernel's,
      # memcheck on small shapes (the caching allocator off, so that an access outside a tensor is seen), then each
      # timed (about 3 minutes)
      { header "LoRA kernels: GPU tests, memcheck, benchmarks/lora_kernels.py"
        timeout ${STEP_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider -rsfE --tb=short tests/test_dropout_cuda.py \
          tests/test_dy_once_cuda.py tests/test_kernels_cuda.py; echo "exit status $?"
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout ${SANITIZE_TIMEOUT:-200} compute-sanitizer --tool memcheck \
          --error-exitcode 9 --print-limit 20 --report-api-errors no python3 -m pytest -v -p no:cacheprovider \
          tests/test_dropout_cuda.py tests/test_dy_once_cuda.py -k "edges or (bit_for_bit and 37) or small_odd" \
          > /tmp/lora-kernels-memcheck.log 2>&1
        echo "memcheck exit status $?"
        grep -E "=========.*(ERROR|SUMMARY|Invalid|Program hit)|passed|failed" /tmp/lora-kernels-memcheck.log | head -20
        head -c 4000000 /tmp/lora-kernels-memcheck.log > "$OUT/lora-kernels-memcheck.log"
        timeout ${STEP_TIMEOUT:-240} python3 benchmarks/lora_kernels.py --json "$OUT/lora-kernels.json"
        echo "exit status $?"; } 2>&1 | tee "$OUT/lora-kernels.txt" ;;
    kernels)
      # the LoRA kernels timed alone (benchmarks/lora_kernels.py KERNELS_ARGS), without the dropout step's tests
      run_script lora-kernels 240 benchmarks/lora_kernels.py ${KERNELS_ARGS:-} ;;
    pdl)
      # programmatic dependent launch (docs/kernels.md): the GPU tests (a LoRA layer's skinny GEMMs with PDL equal to
      # the serial launches bit for bit and to float64, eager, in graph replays, through the layer), racecheck and
      # synccheck on the small sequence, then the sequence timed with PDL, without, and torch's (about 4 minutes)
      { header "PDL: GPU tests, racecheck, synccheck, benchmarks/lora_sequence.py"
        timeout ${STEP_TIMEOUT:-90} python3 -m pytest -q -p no:cacheprovider -rsfE --tb=short tests/test_pdl_cuda.py
        echo "exit status $?"
        for tool in racecheck synccheck; do
          timeout ${SANITIZE_TIMEOUT:-45} compute-sanitizer --tool $tool --error-exitcode 9 --print-limit 20 \
            --report-api-errors no python3 -m pytest -v -p no:cacheprovider tests/test_pdl_cuda.py -k small_odd \
            > /tmp/pdl-$tool.log 2>&1
          echo "$tool exit status $?"
          grep -E "=========.*(ERROR|SUMMARY|Race|Hazard|Barrier)|passed|failed" /tmp/pdl-$tool.log | head -20
          head -c 2000000 /tmp/pdl-$tool.log > "$OUT/pdl-$tool.log"
        done
        timeout ${STEP_TIMEOUT:-75} python3 benchmarks/lora_sequence.py --json "$OUT/lora-sequence.json"
        echo "exit status $?"; } 2>&1 | tee "$OUT/pdl.txt" ;;
    bench)
      # gemmbridge (first pick, autotuned, tuned by gemmbridge.tune) against torch, warmed to the power cap, rounds
      # interleaved and rotated; GPU time (graph replay) beside wall time, the SM clock per row (BENCH_ARGS: its
      # options; the default tuning budget keeps the whole step near 5 minutes on an H200)
      { header "benchmarks/matmul_vs_torch.py ${BENCH_ARGS:---budget 2}"
        nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv
        timeout ${STEP_TIMEOUT:-480} python3 benchmarks/matmul_vs_torch.py ${BENCH_ARGS:---budget 2} \
          --json "$OUT/matmul-vs-torch.json"
        echo "exit status $?"
        nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv
      } 2>&1 | tee "$OUT/matmul-vs-torch.txt" ;;
    benchcli)
      for d in ${BENCH_DTYPES:-bf16}; do
        { header "gemmbridge bench --dtype $d"; s=$SECONDS
          python3 -m gemmbridge.cli bench --dtype $d --no-progress --json "$OUT/bench-$d.json" --plot "$OUT/bench-$d.png"
          echo "bench --dtype $d took $((SECONDS-s)) s"; } 2>&1 | tee -a "$OUT/bench-log.txt"
      done ;;
    stress)
      # STRESS_PROBLEMS=N: the size of the problem set (gemmbridge stress --problems; 0: a new problem each call)
      { header "gemmbridge stress --iterations ${STRESS_ITERATIONS:-100000} ${STRESS_PROBLEMS:+--problems $STRESS_PROBLEMS}"
        python3 -m gemmbridge.cli stress --device cuda --iterations ${STRESS_ITERATIONS:-100000} --rss-tolerance-mb 1 \
          ${STRESS_PROBLEMS:+--problems $STRESS_PROBLEMS} --no-progress --json "$OUT/stress.json"; echo "exit status $?"
      } 2>&1 | tee "$OUT/stress-log.txt" ;;
    rsscontrol)
      # host RSS of gemmbridge against the framework's own matmul on the same calls (scripts/soak_rss_control.py)
      { header "scripts/soak_rss_control.py"
        for fw in ${CONTROL_FRAMEWORKS:-torch cupy}; do for runner in gemmbridge $fw; do
          python3 scripts/soak_rss_control.py --runner $runner --framework $fw --calls ${CONTROL_CALLS:-30000} \
            ${CONTROL_PROBLEMS:+--problems $CONTROL_PROBLEMS} --json /tmp/rss-$fw-$runner.json
        done; done
        python3 -c "import glob,json,sys; json.dump([json.load(open(f)) for f in sorted(glob.glob('/tmp/rss-*.json'))], open(sys.argv[1], 'w'), indent=1)" "$OUT/rss-control.json"
      } 2>&1 | tee "$OUT/rss-control.txt" ;;
    soak)
      # LoRA training soak: apply_lora and the PEFT bridge, SOAK_STEPS steps each, shapes changing every 5 steps;
      # memory, plans and graphs must stay flat after the warm-up (scripts/soak_training.py; exit 1 if not)
      { header "scripts/soak_training.py --steps ${SOAK_STEPS:-10000} ${SOAK_ARGS:-}"
        timeout ${STEP_TIMEOUT:-300} python3 scripts/soak_training.py --steps ${SOAK_STEPS:-10000} ${SOAK_ARGS:-} \
          --json "$OUT/soak-training.json"; echo "exit status $?"; } 2>&1 | tee "$OUT/soak-training.txt" ;;
    freshvenv)
      # the README's main job from a fresh venv. No package registry here: the machine's torch, cupy and jax stay
      # visible (--system-site-packages; python3 here may itself be a venv, whose packages that flag would not
      # show, so a .pth file names its site-packages too), nvmath-python comes from the carried wheels, and
      # gemmbridge is built with the machine's setuptools (>= 77: pyproject.toml). The machine's pip installs into
      # the venv (--python), so no ensurepip is needed; PYTHONPATH is unset so that what runs is the install.
      { header "fresh venv: pip install -e . && gemmbridge bench --preset small"
        rm -rf /tmp/fresh && python3 -m venv --system-site-packages --without-pip /tmp/fresh
        python3 -c "import site; print(*site.getsitepackages(), sep='\n')" \
          > "$(/tmp/fresh/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/machine.pth"
        env -u PYTHONPATH /tmp/fresh/bin/python -c "import setuptools, torch; print('setuptools', setuptools.__version__, 'torch', torch.__version__)"
        env -u PYTHONPATH python3 -m pip --python /tmp/fresh/bin/python install -q --no-index --no-deps \
          --no-build-isolation -e . .whl/*.whl
        env -u PYTHONPATH /tmp/fresh/bin/gemmbridge bench --preset small --no-progress --json "$OUT/fresh-bench.json"
        echo "exit status $?"
        if grep -q '"device": "cuda"' "$OUT/fresh-bench.json"; then echo "fresh venv: bench ran on cuda"
        else echo "FAILED: the fresh venv's bench did not run on cuda"; fi
      } 2>&1 | tee "$OUT/fresh-venv.txt" ;;
    sanitize)
      # memcheck without torch's caching allocator (each tensor its own allocation, so an out-of-bounds access
      # is seen; graph capture needs the caching allocator, so those tests run under racecheck/synccheck)
      { header "compute-sanitizer"
        n=0
        run_tool() {  # tool, test files, -k expression, environment, extra options
          n=$((n + 1))
          echo "## compute-sanitizer --tool $1, pytest $2 -k '$3' ($4)"
          env $4 timeout ${SANITIZE_TIMEOUT:-200} compute-sanitizer --tool $1 --error-exitcode 9 --print-limit 20 $5 \
            python3 -m pytest -v -p no:cacheprovider $2 -k "$3" > /tmp/sanitizer-$n.log 2>&1
          echo "exit status $?"
          grep -E "=========.*(ERROR|SUMMARY|Invalid|Program hit|Race|Hazard)|passed|failed" /tmp/sanitizer-$n.log | head -20
          head -c 4000000 /tmp/sanitizer-$n.log > "$OUT/sanitizer-$n-$1.log"
        }
        # API-call errors are not memory errors: cuda-bindings probes driver symbols with cuGetProcAddress
        # (CUDA_ERROR_INVALID_VALUE for absent ones), and the out-of-memory test fails a cudaMalloc on purpose
        nocache="PYTORCH_NO_CUDA_MEMORY_CACHING=1"
        # SANITIZE_SET=tuning: only the memcheck runs of autotune and CuPy out= below
        if [[ " ${SANITIZE_TOOLS:-memcheck racecheck synccheck} " == *" memcheck "* && ${SANITIZE_SET:-all} == all ]]; then
          run_tool memcheck "tests/test_cuda.py tests/test_reliability.py" \
            "not graph and not capture and not captured and not jax and not threads" $nocache "--report-api-errors no"
          run_tool memcheck tests/test_epilogues.py "torch-cuda and float32 and not plan" $nocache "--report-api-errors no"
          run_tool memcheck tests/test_torch_training.py "cuda and mlp and not compile and not gradcheck" $nocache \
            "--report-api-errors no"
          run_tool memcheck tests/test_lora.py "gpu_outputs or (cuda and values_and_gradients)" $nocache \
            "--report-api-errors no"
        fi
        if [[ " ${SANITIZE_TOOLS:-memcheck racecheck synccheck} " == *" memcheck "* ]]; then
          # autotune: its candidates write scratch laid out like the call's outputs (torch and CuPy out= views,
          # reversed rows included), and gemmbridge.tune's explored choices restored in a fresh process
          run_tool memcheck tests/test_cuda.py "autotune" $nocache "--report-api-errors no"
          run_tool memcheck tests/test_tuning_gpu.py "fresh_process and bfloat16 and False" $nocache \
            "--report-api-errors no"
          # CuPy out= views of every layout, each array its own allocation (scripts/cupy_unpooled.py)
          run_tool memcheck "-p cupy_unpooled tests/test_contract.py" "cupy-cuda and (test_out or out_is_c)" \
            "PYTHONPATH=$PYTHONPATH:scripts" "--report-api-errors no"
        fi
        for tool in ${SANITIZE_TOOLS:-memcheck racecheck synccheck}; do
          [ $tool = memcheck ] && continue
          run_tool $tool tests/test_cuda.py "(stream or graph or capture) and not 64_streams" X=1
          run_tool $tool tests/test_torch_training.py "captured_in_a_cuda_graph" X=1
        done
      } 2>&1 | tee "$OUT/sanitizer.txt" ;;
  esac
done
true
