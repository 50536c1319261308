#!/bin/bash
# cigl on a lent GPU machine that has torch but no pip access (../shared/docs/GPU.md).
#
# Here, once:  echo /.dev/ >> .git/info/exclude; mkdir -p .dev; cp ../shared/data/cifar10-jpeg.tar.xz .dev/
# and before each lease, so the results name the commit:  git rev-parse --short HEAD > .dev/commit
# Then, on the device with `.dev` carried (results go to $OUT):
#
#   MINUTES=6.3 bash benchmarks/gpu_lease.sh          the GPU suite (benchmarks/gpu_suite.py)
#   MINUTES=7 bash benchmarks/gpu_lease.sh repro      make repro-gpu's seven runs (SEED, default 0) for
#                                                     MINUTES, each run folder back as $OUT/RUN.tar.xz
#
# make repro-gpu takes about 34 minutes of H100 time, more than a lease, so it goes over several:
# `tools/study.py run --minutes` stops the runs at a checkpoint, and before the next lease their
# archives go into .dev/paper-runs/ (here: cp /work/.device/N/*.tar.xz .dev/paper-runs/), where
# this script unpacks them and the study continues them. When every run is done, the report is
# made here: python tools/study.py report --repro-gpu (unpack the archives into runs/paper-wrn22_2
# first).
set -o pipefail
shopt -s nullglob
cd "$(dirname "$0")/.."
ln -sfn ../export cigl/export
ln -sfn ../serve cigl/serve
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 CIGL_CACHE=/tmp/cigl-cache CIGL_COMMIT=$(cat .dev/commit 2>/dev/null)
mkdir -p ../shared/data data
cp .dev/cifar10-jpeg.tar.xz ../shared/data/ && tar -xJf .dev/cifar10-jpeg.tar.xz -C data/ || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, timm; print(torch.__version__, timm.__version__, torch.cuda.get_device_name(0))"

if [ "${1:-suite}" = repro ]; then
  runs=$(python3 -c 'import sys; sys.path.insert(0, "tools"); from study import REPRO_GPU; print(REPRO_GPU["runs"])') || exit 2
  mkdir -p $runs
  for f in .dev/paper-runs/*.tar.xz; do tar -xJf "$f" -C $runs || exit 2; done
  python3 tools/study.py run --repro-gpu --data-dir data/cifar10 --seeds "${SEED:-0}" \
    --minutes "${MINUTES:-7}" 2>&1 | tee "$OUT/study.log"
  for d in $runs/*/; do  # seven archives and the log: the 8 files a lease gives back
    tar -cJf "$OUT/$(basename "$d").tar.xz" -C $runs --exclude=.lock --exclude='.*.tmp' "$(basename "$d")"
  done
  ls -la "$OUT"
  exit 0
fi

# decode CIFAR-10 into the cache while the tests run, so the training runs start at once
python3 -c "from cigl.data import load_dataset; load_dataset('cifar10', 'data/cifar10', val_size=0)" &
python3 benchmarks/gpu_suite.py --data-dir data/cifar10 --minutes "${MINUTES:-7}" 2>&1 | tee "$OUT/suite.log"
for f in runs/gpu-suite/*/metrics.jsonl; do echo "== $f"; cut -c1-400 "$f"; done > "$OUT/metrics.txt" 2>&1
