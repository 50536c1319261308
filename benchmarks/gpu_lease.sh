#!/bin/bash
# The GPU suite on a lent GPU machine that has torch but no pip access (../shared/docs/GPU.md).
# Here, once:  echo /.dev/ >> .git/info/exclude; mkdir -p .dev; cp ../shared/data/cifar10-jpeg.tar.xz .dev/
# and before each lease, so the results name the commit:  git rev-parse --short HEAD > .dev/commit
# Then run `bash benchmarks/gpu_lease.sh` on the device with `.dev` carried; results go to $OUT.
set -o pipefail
cd "$(dirname "$0")/.."
ln -sfn ../export cigl/export
ln -sfn ../serve cigl/serve
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 CIGL_CACHE=/tmp/cigl-cache CIGL_COMMIT=$(cat .dev/commit 2>/dev/null)
mkdir -p ../shared/data data
cp .dev/cifar10-jpeg.tar.xz ../shared/data/ && tar -xJf .dev/cifar10-jpeg.tar.xz -C data/ || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, timm; print(torch.__version__, timm.__version__, torch.cuda.get_device_name(0))"
# decode CIFAR-10 into the cache while the tests run, so the training runs start at once
python3 -c "from cigl.data import load_dataset; load_dataset('cifar10', 'data/cifar10', val_size=0)" &
python3 benchmarks/gpu_suite.py --data-dir data/cifar10 --minutes "${MINUTES:-7}" 2>&1 | tee "$OUT/suite.log"
for f in runs/gpu-suite/*/metrics.jsonl; do echo "== $f"; cut -c1-400 "$f"; done > "$OUT/metrics.txt" 2>&1
