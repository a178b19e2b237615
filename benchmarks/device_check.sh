#!/usr/bin/env bash
# The one prepared check for a machine with an accelerator (a GPU), within about 8 minutes:
#   1. Python packages: the machine's own; any missing one installed from wheels carried in
#      .whl/ (pip --no-index), e.g. ml-collections (see benchmarks/README.md, "Device check");
#   2. the devices JAX sees;
#   3. throughput (benchmarks/throughput.py --quick): both pairs, float32 and bfloat16, CE of
#      each network, KD and FFKD steps, peak device memory; the input pipeline and the PyTorch
#      step where TensorFlow and PyTorch import;
#   4. a short CIFAR-10 FFKD run (configs/quickstart.py, the whole chain) and its images/s and
#      accuracy, where TensorFlow imports (the data pipeline needs it) and the data is there.
# Everything goes to $OUT (default ./device_out): *.json, *.md, logs, summary.md.
#
#   bash benchmarks/device_check.sh          # on the accelerator machine
#   bash benchmarks/device_check.sh --tiny   # a smoke test of this script on the CPU (tests)
#
# Data for step 4: $DATA, else .device/cifar10-jpeg.tar.gz (copy ../shared/data's archive
# there before the call: it is ignored by git and carried), else
# ../shared/data/cifar10-jpeg.tar.gz. Time limits: THROUGHPUT_TIMEOUT (140 s each dtype) and
# RUN_TIMEOUT (150 s), 430 s in all, within an 8-minute call with start-up.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device_out}
mkdir -p "$OUT"
TINY=0
[[ "${1:-}" == "--tiny" ]] && TINY=1
export TF_CPP_MIN_LOG_LEVEL=3 PYTHONUNBUFFERED=1
# Several worker processes share the GPU (throughput.py): none may take 75% of it up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PYTHON:-python3}
started=$(date +%s)
say() { echo "[device_check $(($(date +%s) - started)) s] $*" | tee -a "$OUT/summary.md"; }
: > "$OUT/summary.md"

# --- 1. Packages ------------------------------------------------------------------------------
if ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/ffkd-site .whl/*.whl && export PYTHONPATH=/tmp/ffkd-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! $PY -c "import jax, flax, optax, orbax.checkpoint, ml_collections" 2> "$OUT/import_error.txt"; then
  say "FAILED: a required package does not import: $(tail -1 "$OUT/import_error.txt")"
  exit 1
fi
has() { $PY -c "import $1" > /dev/null 2>&1; }

# --- 2. Devices -------------------------------------------------------------------------------
$PY - << 'EOF' | tee "$OUT/devices.txt" | tee -a "$OUT/summary.md"
import jax
d = jax.devices()[0]
print(f'jax {jax.__version__}: {jax.device_count()} x {d.device_kind} ({d.platform})')
EOF
if [[ $TINY == 0 ]] && grep -q "(cpu)" "$OUT/devices.txt"; then
  say "FAILED: JAX sees no accelerator (its CUDA plugin did not load?): not measuring the CPU."
  exit 1
fi

# The CIFAR-10 archive for the input pipeline and the FFKD run.
data=${DATA:-}
for candidate in .device/cifar10-jpeg.tar.gz ../shared/data/cifar10-jpeg.tar.gz; do
  [[ -z $data && -f $candidate ]] && data=$candidate
done
[[ $TINY == 1 ]] && data=${TINY_DATA:?--tiny needs TINY_DATA, an image folder}

# --- 3. Throughput ----------------------------------------------------------------------------
configs=teacher_ce,student_ce,kd,ffkd
folder=
if has tensorflow && [[ -n $data ]]; then
  folder=$data
  if [[ -f $data ]]; then  # an archive: unpacked once for the input pipeline's worker
    mkdir -p /tmp/ffkd-device-data && tar -xzf "$data" -C /tmp/ffkd-device-data
    train=$(find /tmp/ffkd-device-data -maxdepth 3 -type d -name train | head -1)
    folder=${train:+$(dirname "$train")}
  fi
  [[ -n $folder ]] && configs=$configs,input
fi
has torch && configs=$configs,torch_ffkd
mode=--quick
[[ $TINY == 1 ]] && mode=--tiny
for dtype in float32 bfloat16; do
  say "throughput $dtype ($configs)"
  timeout "${THROUGHPUT_TIMEOUT:-140}" $PY benchmarks/throughput.py $mode --configs "$configs" \
      ${folder:+--data "$folder"} --dtype "$dtype" --out "$OUT/throughput_$dtype.json" \
      > "$OUT/throughput_$dtype.log" 2>&1 \
    && cat "$OUT/throughput_$dtype.md" >> "$OUT/summary.md" \
    || say "throughput $dtype FAILED (rc $?): see throughput_$dtype.log"
done

# --- 4. A short CIFAR-10 FFKD run -------------------------------------------------------------
if ! has tensorflow; then
  say "FFKD run skipped: TensorFlow (the data pipeline's tf.data) does not import here."
elif [[ -z $data && $TINY == 0 ]]; then
  say "FFKD run skipped: no CIFAR-10 archive (set DATA or copy it to .device/)."
else
  overrides=(--config.dataset.name=image_folder "--config.dataset.path=$data")
  if [[ $TINY == 1 ]]; then
    overrides=(--config.dataset.name=image_folder "--config.dataset.path=$data"
      --config.model=resnet8 --config.teacher.model=resnet8 --config.batch_size=8
      --config.eval_batch_size=8 --config.teacher.pretrain_steps=2 --config.num_train_steps=2
      --config.log_every_steps=1 --config.eval_every_steps=2 --config.diagnostics_examples=8)
  fi
  say "FFKD run: configs/quickstart.py on $data"
  timeout "${RUN_TIMEOUT:-150}" $PY -m ffkd_jax.main --config configs/quickstart.py \
      --workdir "$OUT/ffkd_run" "${overrides[@]}" > "$OUT/ffkd_run.log" 2>&1 \
    || say "FFKD run FAILED or stopped (rc $?): see ffkd_run.log"
  $PY - "$OUT/ffkd_run" << 'EOF' | tee -a "$OUT/summary.md"
import json, os, sys
def summary(workdir, label):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return f'{label}: no metrics'
  records = [json.loads(l) for l in open(path) if l.strip().endswith('}')]
  speeds = [r['perf/images_per_s'] for r in records if 'perf/images_per_s' in r]
  evals = [r for r in records if 'eval/top1' in r]
  last = evals[-1] if evals else {}
  top1 = {k: round(v, 2) for k, v in last.items() if k.endswith('top1') and 'train' not in k}
  speed = f'{max(speeds):.0f}' if speeds else '-'
  return f'{label}: steps {last.get("step", "-")}, images/s (best logged) {speed}, {top1}'
run = sys.argv[1]
print(summary(os.path.join(run, 'teacher'), 'teacher (CE)'))
print(summary(run, 'FFKD'))
EOF
fi
say "done in $(($(date +%s) - started)) s; files in $OUT"
