#!/usr/bin/env bash
# Install diffq-bench with its test extras from this checkout, then run the whole test suite.
# This is the README's test command and what CI runs (.ci/run). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e '.[dev]'
# A fresh environment must resolve a torch/torchvision/torchaudio/timm set that imports together.
python3 -c "import torch, torchvision, torchaudio, timm; print('torch', torch.__version__, '| torchvision', torchvision.__version__, '| torchaudio', torchaudio.__version__, '| timm', timm.__version__)"
set +e
python3 -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit "$rc"
