#!/usr/bin/env bash
# The checks that need a CUDA machine, as one short script: the byte-identity tests of --device cuda, then the
# GPU benchmark at a reduced size (about 6 minutes on one GPU). Written for this project's lent GPU machines,
# whose image has torch (CUDA), transformers, peft, safetensors and click but not bitsandbytes, and no network:
#
#   here, once:  echo /.whl/ >> .git/info/exclude
#                python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#                    --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2        # a 43 MB wheel
#   there:       bash bench/device_check.sh        (carrying .whl; logs land in $OUT when it is set)
#
# Elsewhere (bitsandbytes installed, a GPU present) it runs as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
logs="${OUT:-/tmp}"
python3 -c "import torch, bitsandbytes; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), bitsandbytes.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/test_device.py 2>&1 | tee "$logs/device-tests.log"
python3 bench/bench_device.py --layers 4 --storages nf4 int8 2>&1 | tee "$logs/device-bench.log"
