#!/usr/bin/env bash
# One lease of the GPU machine (docs/DEVELOPMENT.md, "The GPU machine"), in two parts.
#
# Here, once a session, from the checkout:   PATH=.venv/bin:$PATH bash bench/gpu_session.sh wheels
#   puts into .gpu/ (git-ignored through .git/info/exclude): wheels/ (grpcio 1.85.1 and its companions,
#   protobuf, faiss-cpu, py-spy, hypothesis: ~32 MB, cp312) and wheel/ (the project's wheel, made again
#   at every call of this step: build it after each change you want measured).
# There, one call carrying [".gpu"]:         bash bench/gpu_session.sh STEP [STEP ...]
#   installs the wheels into /tmp/site (again only when the project's wheel changed), copies bench/,
#   tests/ and pyproject.toml into /tmp/hb (the checkout's own monim/ folder would shadow the wheel),
#   and runs the steps there, each one's output teed to $OUT/STEP.log. Chain every step the session
#   needs into one or two calls: a start that fails costs minutes of device time, a warm machine is
#   kept ~30 s after a call. A wheel in .gpu/wheelA/ is installed into /tmp/siteA for the "A" steps
#   (the code before a change, for an A/B in one lease). GTESTS="FILE ..." runs only those files in the gtests step.
set -u
if [ "${1:-}" = wheels ]; then
  root=$(git rev-parse --show-toplevel) && cd "$root" || exit 1
  grep -qxF "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
  mkdir -p .gpu/wheels && rm -rf .gpu/wheel && mkdir -p .gpu/wheel
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux1_x86_64 -d .gpu/wheels protobuf==7.36.2 grpcio==1.85.1 grpcio-health-checking==1.85.1 \
    grpcio-reflection==1.85.1 prometheus-client==0.26.0 rich==15.0.0 google-crc32c==1.9.0 markdown-it-py mdurl \
    pygments py-spy faiss-cpu==1.15.1 hypothesis==6.170.17 sortedcontainers attrs
  python3 -m pip wheel -q --no-deps --no-build-isolation -w .gpu/wheel . && rm -rf build
  du -sh .gpu
  exit 0
fi
export PYTHONPATH=/tmp/site:/tmp/hb PATH=/tmp/site/bin:$PATH
if [ ! -f /tmp/site/.done ] || [ "$(cat /tmp/site/.done)" != "$(md5sum .gpu/wheel/*.whl)" ]; then
  rm -rf /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*.whl .gpu/wheel/*.whl
  md5sum .gpu/wheel/*.whl > /tmp/site/.done
fi
if [ -d .gpu/wheelA ] && [ ! -d /tmp/siteA ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/siteA .gpu/wheelA/*.whl
fi
rm -rf /tmp/hb && mkdir -p /tmp/hb && cp -r bench tests pyproject.toml /tmp/hb/ && cd /tmp/hb || exit 1
OUT=${OUT:-/tmp/out} && mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
dp_cells="--rows 1000000 --budget-s 0.5 --repeats 30 --decode-steps 300 --decode-block 50 --batches 1,64,4096 --ks 32,1024 --apply-rows 1024 --big-apply-rows 2048 --keys-only-rows 1000"
for step in "$@"; do
  echo "=== $step $(date +%T)"
  case $step in
    gtests) timeout 500 python3 -m pytest -p no:cacheprovider -q ${GTESTS:-tests/unit/test_gpu.py tests/unit/test_gpu_search_graphs.py \
              tests/unit/test_gpu_tensor_path.py} -k "not faiss" 2>&1 | tail -15 ;;
    dp) python3 -m bench.data_plane_bench --service one-process --device cuda $dp_cells --lm-size none ;;
    dpA) PYTHONPATH=/tmp/siteA:$PYTHONPATH python3 -m bench.data_plane_bench --service one-process --device cuda $dp_cells --lm-size none ;;
    gpt2) python3 -m bench.data_plane_bench --service one-process --device cuda --rows 1000000 --budget-s 0.3 --repeats 2 \
            --decode-steps 200 --decode-block 50 --lm-size gpt2 --lm-tokens 32 --batches 1 --ks 32 --apply-rows 1024 \
            --big-apply-rows 2048 --keys-only-rows 1000 ;;
    split) python3 -m bench.call_split_bench --device cuda --rows 1000000 --read-chunks \
             --py-spy /tmp/site/bin/py-spy --py-spy-cells "${SPLIT_CELLS:-1x32,64x1024}" ;;
    stages) python3 -m bench.call_split_bench --device cuda --rows 1000000 --stages --calls 200 ;;
    stagesA) PYTHONPATH=/tmp/siteA:$PYTHONPATH python3 -m bench.call_split_bench --device cuda --rows 1000000 --stages --calls 200 ;;
    splitA) PYTHONPATH=/tmp/siteA:$PYTHONPATH python3 -m bench.call_split_bench --device cuda --rows 1000000 --read-chunks ;;
    apply) python3 -m bench.apply_gradients_bench --device cuda ;;
    applyA) PYTHONPATH=/tmp/siteA:$PYTHONPATH python3 -m bench.apply_gradients_bench --device cuda ;;
    rtt) python3 -m bench.socket_round_trip_bench --calls 2000 && python3 -m bench.socket_round_trip_bench --calls 1000 --work-us 600 ;;
    train) python3 -m bench.tensor_path_bench --rows 1000000 --cells train ;;
    profile) python3 -m bench.tensor_path_bench --rows 1000000 --cells train --profile "$OUT/trace" --profile-stack ;;
    profileA) PYTHONPATH=/tmp/siteA:$PYTHONPATH python3 -m bench.tensor_path_bench --rows 1000000 --cells train \
                --profile "$OUT/traceA" ;;
    search) python3 -m bench.gpu_search_bench --rows 1000000 --dtypes float16 --repeats 3 ;;
    *) echo "unknown step $step (gtests dp dpA gpt2 split splitA stages stagesA apply applyA rtt search train profile profileA)" ;;
  esac 2>&1 | tee "$OUT/$step.log"
done
