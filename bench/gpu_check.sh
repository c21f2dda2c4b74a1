#!/usr/bin/env bash
# The GPU path, checked on a CUDA machine (issue 18 point 6). Never run in CI.
#
#   bash bench/gpu_check.sh --prepare      here, with network to PyPI: fill the carried folders
#                                          (.whl/: wheels matching .venv's transformers; .gpu_carry/:
#                                          the trio's configs and tokenizers, no weights)
#   bash bench/gpu_check.sh [OUT_DIR]      on the CUDA machine (OUT_DIR defaults to $OUT, else
#                                          bench/results/gpu-run)
#
# Steps, each under its own time limit (seconds, from the environment); GPU_CHECK_STEPS names the steps
# to run (default "tests spark bench"; the CUDA check and the install always run), GPU_BENCH_METHODS,
# GPU_BENCH_BATCHES and GPU_BENCH_TOKENS narrow the bench:
#   0. CUDA: exits 3 at once, saying so, when torch sees no CUDA device (nothing else runs);
#   1. install: the carried wheels (.whl/*.whl) into a private target folder on PYTHONPATH (falls back to
#      the machine's own packages, saying so, if they do not import), else pip for transformers>=5.20;
#   2. tests: pytest -m gpu tests/ensemble/test_gpu.py                                   (GPU_CHECK_TESTS_S, 120)
#   3. spark: the job on one GPU executor through Spark's resource scheduling (discovery script
#      scripts/getGpusResources.sh, one GPU per executor and per task), when pyspark and java are both
#      present; otherwise skipped, and the reason recorded                      (GPU_CHECK_SPARK_S, 240)
#   4. bench: bench/bench_gpu.py bench over the trio with random weights, bf16, batch 8/32/64
#                                                                               (GPU_CHECK_BENCH_S, 300)
# Writes into OUT_DIR: log.txt, nvidia-smi.txt, tests.txt, gpu.jsonl, steps.json (what each step did),
# spark.jsonl when the Spark step ran. Exit status: 0 when every step that ran passed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TRIO=(smollm2-135m-instruct qwen2.5-coder-0.5b-instruct gemma3-270m)
WHEELS=(transformers==5.25.0 huggingface_hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5
        click==8.5.1 idna==3.20 kernels==0.19.1 tomlkit==0.15.3)

if [[ "${1:-}" == "--prepare" ]]; then
  # Wheels for the device's Python 3.12 (pure Python except kernels), and the members' configs and
  # tokenizers from the conversion cache (load each member once with the job first to fill it).
  set -e
  mkdir -p .whl .gpu_carry
  ${PREP_PYTHON:-.venv/bin/python} -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
  stage=$(mktemp -d)
  cache=${ENSEMBLE_CACHE_DIR:-$HOME/.cache/ensemble-fuse}/models
  for alias in "${TRIO[@]}"; do
    src=$(find "$cache" -maxdepth 1 -type d -name "${alias}-*" | head -1)
    [[ -n "$src" ]] || { echo "gpu_check --prepare: no converted $alias under $cache" >&2; exit 2; }
    mkdir -p "$stage/$alias"
    find "$src" -maxdepth 1 -type f ! -name '*.safetensors' ! -name manifest.json -exec cp {} "$stage/$alias/" \;
  done
  tar -C "$stage" -czf .gpu_carry/members.tar.gz .
  rm -rf "$stage"
  du -sh .whl .gpu_carry
  exit 0
fi

OUT_DIR=${1:-${OUT:-bench/results/gpu-run}}
mkdir -p "$OUT_DIR"
LOG=$OUT_DIR/log.txt
STEPS=$OUT_DIR/steps.json
T_TESTS=${GPU_CHECK_TESTS_S:-120}
T_SPARK=${GPU_CHECK_SPARK_S:-240}
T_BENCH=${GPU_CHECK_BENCH_S:-300}
STEPS_TO_RUN=" ${GPU_CHECK_STEPS:-tests spark bench} "  # a rerun may name fewer (install always runs)
export PYTHONUNBUFFERED=1
exec > >(tee -a "$LOG") 2>&1
say() { echo "gpu_check: $*"; }
declare -A STEP
record() { STEP[$1]=$2; say "$1: $2"; }
write_steps() {
  {
    echo "{"
    local first=1
    for k in "${!STEP[@]}"; do
      [[ $first == 1 ]] || echo ","
      first=0
      printf '  "%s": "%s"' "$k" "${STEP[$k]//\"/\'}"
    done
    echo ""
    echo "}"
  } > "$STEPS"
}

# ---- 0. CUDA ---------------------------------------------------------------------------------------
if ! cuda=$($PY -c "import torch, sys
ok = torch.cuda.is_available()
print(f'torch {torch.__version__}, cuda {torch.version.cuda}, ' + (torch.cuda.get_device_name(0) if ok else 'no CUDA device'))
sys.exit(0 if ok else 3)" 2>&1); then
  say "no CUDA: torch under '$PY' sees no CUDA device (${cuda##*$'\n'}); this script needs a CUDA GPU and ran nothing" >&2
  record cuda "absent: ${cuda##*$'\n'}"
  write_steps
  exit 3
fi
record cuda "$cuda"
nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true

# ---- 1. install --------------------------------------------------------------------------------------
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
check_import='import transformers, tokenizers, huggingface_hub, ensemble.fusers, ensemble.models
print("transformers", transformers.__version__, "tokenizers", tokenizers.__version__, "hub", huggingface_hub.__version__)'
if compgen -G ".whl/*.whl" > /dev/null; then
  site=$(mktemp -d /tmp/gpu_site.XXXX)
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl; then
    if got=$(PYTHONPATH="$site:$PYTHONPATH" $PY -c "$check_import" 2>&1); then
      export PYTHONPATH="$site:$PYTHONPATH"
      record install "carried wheels: ${got##*$'\n'}"
    else
      got=$($PY -c "$check_import" 2>&1)
      record install "carried wheels did not import, using the machine's packages: ${got##*$'\n'}"
    fi
  else
    record install "pip could not install the carried wheels; using the machine's packages"
  fi
else
  if ! $PY -c "import transformers, sys; v = tuple(int(x) for x in transformers.__version__.split('.')[:2]); sys.exit(v < (5, 20))" 2>/dev/null; then
    $PY -m pip install -q "transformers>=5.20,<6" || say "pip could not install transformers>=5.20; using what is there"
  fi
  record install "no carried wheels: $($PY -c "$check_import" 2>&1 | tail -1)"
fi
$PY -m pip list 2>/dev/null | grep -iE '^(torch|transformers|tokenizers|huggingface.hub|safetensors|pyarrow|pyspark|pytest) ' || true

# ---- 2. tests ----------------------------------------------------------------------------------------
failed=0
if [[ $STEPS_TO_RUN == *" tests "* ]]; then
  say "tests (limit ${T_TESTS}s)"
  timeout -k 10 "$T_TESTS" $PY -m pytest -q -p no:cacheprovider -m gpu tests/ensemble/test_gpu.py -rs > "$OUT_DIR/tests.txt" 2>&1
  rc=$?
  cat "$OUT_DIR/tests.txt"
  record tests "rc=$rc ($(tail -1 "$OUT_DIR/tests.txt"))"
  (( rc == 0 )) || failed=1
fi

# ---- 3. the job on one GPU executor (Spark resource scheduling) ---------------------------------------
has_spark=no; has_java=no
$PY -c "import pyspark" 2>/dev/null && has_spark=yes
command -v java > /dev/null 2>&1 && has_java=yes
if [[ $STEPS_TO_RUN != *" spark "* ]]; then
  :
elif [[ $has_spark == yes && $has_java == yes ]]; then
  say "spark (limit ${T_SPARK}s)"
  timeout -k 10 "$T_SPARK" $PY bench/bench_gpu.py spark --out /tmp/gpu_spark --device auto --timeout $((T_SPARK - 30))
  rc=$?
  cp /tmp/gpu_spark/spark.jsonl "$OUT_DIR/" 2>/dev/null
  record spark "rc=$rc"
  (( rc == 0 )) || failed=1
else
  record spark "SKIPPED: pyspark importable: $has_spark, java on PATH: $has_java (the job needs both; nothing can be installed on this machine)"
fi

# ---- 4. bench ----------------------------------------------------------------------------------------
members=${GPU_MEMBERS_DIR:-}
if [[ -z "$members" && -f .gpu_carry/members.tar.gz ]]; then
  members=$(mktemp -d /tmp/gpu_members.XXXX)
  tar -C "$members" -xzf .gpu_carry/members.tar.gz
fi
if [[ $STEPS_TO_RUN != *" bench "* ]]; then
  :
elif [[ -z "$members" ]]; then
  record bench "SKIPPED: no member configs (.gpu_carry/members.tar.gz from --prepare, or GPU_MEMBERS_DIR)"
  failed=1
else
  say "bench (limit ${T_BENCH}s)"
  timeout -k 10 "$T_BENCH" $PY bench/bench_gpu.py bench --members-dir "$members" --out "$OUT_DIR/gpu.jsonl" \
    --device cuda --dtype bfloat16 --methods ${GPU_BENCH_METHODS:-deepen specfuse} --batches ${GPU_BENCH_BATCHES:-8 32 64} --new-tokens ${GPU_BENCH_TOKENS:-32} \
    --deadline-s $((T_BENCH - ${GPU_BENCH_MARGIN_S:-60}))
  rc=$?
  record bench "rc=$rc$( ((rc == 124)) && echo ' (time limit: the lines written so far are kept)')"
  (( rc == 0 )) || failed=1
fi
write_steps
say "done (failed=$failed)"
exit $failed
