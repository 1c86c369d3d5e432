#!/usr/bin/env bash
# What only a GPU shows, in one go: bf16/fp16 AMP and torch.compile end to end, the tests that skip
# without CUDA (the fp16 grad scaler's checkpoint round trip), training-step throughput of every
# model, and the loader with many workers. Run from the repository root on a CUDA machine with the
# package importable (pip install -e '.[test]', or PYTHONPATH=.); results land in $OUT (default
# /tmp/celeba-gpu-check). Parts: train | tests | bench | loader | cache | decode | headline (default: all
# but the last three: tools/bench_gpu.py, the decoded-cache benchmark, whose table (cache), fill through
# nvJPEG against the CPU workers (decode) and 30-epoch headline run (headline) each take minutes; give
# each its own command where a command's time is short).
#
# An offline GPU machine whose Python lacks this package's pure-data dependencies: put their cp312 wheels
# in .whl/ here (the README's GPU section has the `pip download` line); they are installed into /tmp/site
# first. Two device calls then fill in issue 11's rows, each leaving at most 8 files in $OUT (a call cut
# at its time limit keeps the rows measured so far: bench_gpu.py rewrites its JSON after every run):
# `bash tools/gpu_check.sh cache decode`, then `bash tools/gpu_check.sh headline`.
set -uo pipefail
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: could not install the wheels of .whl/" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
OUT=${OUT:-/tmp/celeba-gpu-check}
WORK=${WORK:-/tmp/celeba-gpu-work}
PARTS=${*:-train tests bench loader}
mkdir -p "$OUT" "$WORK"
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, torchvision, accelerate; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'accelerate', accelerate.__version__)" | tee -a "$OUT/gpu.txt"

if [ ! -f "$WORK/shards/manifest.json" ]; then
  $PY -m celeba_dist synth "$WORK/celeba" --num-images 6000 --workers 8 >/dev/null
  $PY -m celeba_dist pack "$WORK/celeba" "$WORK/shards" --workers 8 >/dev/null
fi

for part in $PARTS; do
  case $part in
  train)
    for run in "bf16" "fp16" "no" "bf16 compile"; do
      set -- $run
      name="run-$1${2:+-compile}"
      start=$(date +%s)
      $PY -m celeba_dist train --config smiling_simple_cnn --data "$WORK/shards" --run-dir "$WORK/$name" \
        --set train.epochs=3 train.precision=$1 ${2:+train.compile=true} data.attributes=drawn data.batch_size=128 \
        data.num_workers=6 log.progress_bar=false optim.lr=0.003 model.dropout=0.0 >"$OUT/$name.log" 2>&1
      code=$?
      echo "$name: exit $code in $(( $(date +%s) - start )) s; test mean accuracy" \
        "$($PY -c "import json;print(round(json.load(open('$WORK/$name/metrics.json'))['test']['mean']['accuracy'],4))" 2>/dev/null)" \
        | tee -a "$OUT/train.txt"
    done ;;
  tests)
    # -rs lists skips with their reason: on a GPU nothing here may be skipped
    $PY -m pytest -q -rs tests/test_resume.py -k fp16 2>&1 | tee "$OUT/tests.txt" ;;
  bench)
    for p in bf16 no; do
      $PY tools/bench_train.py --models simple_cnn celeb_cnn resnext50_32x4d resnet18_lstm_attn \
        --precision $p --batch-size 128 --steps 40 --repeats 2 2>&1 | grep -v Warning | tee -a "$OUT/bench_train.txt"
    done ;;
  cache)
    $PY tools/bench_gpu.py --work-dir "$WORK/cache" --out "$OUT/bench_gpu.json" 2>"$OUT/bench_gpu.log" \
      | grep -v INFO | tee "$OUT/bench_gpu.txt" ;;
  decode)
    $PY tools/bench_gpu.py --work-dir "$WORK/cache" --caches device device-decode --steps 30 \
      --out "$OUT/bench_decode.json" 2>"$OUT/bench_decode.log" | grep -v INFO | tee "$OUT/bench_decode.txt" ;;
  headline)
    $PY tools/bench_gpu.py --work-dir "$WORK/cache" --models --headline --out "$OUT/bench_headline.json" \
      2>"$OUT/bench_headline.log" | grep -v INFO | tee "$OUT/bench_headline.txt" ;;
  loader)
    $PY tools/bench_loader.py --num-images 6000 --workers 8 --repeats 2 --work-dir "$WORK/loader" 2>&1 \
      | grep -v "INFO\|Warning" | tee "$OUT/bench_loader.txt" ;;
  esac
done
