#!/usr/bin/env bash
# Install diffq-bench with its test extras from this checkout, then run the whole test suite.
# This is the README's test command and what CI runs (.ci/run). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e '.[dev]'
# museval (BSS-Eval v4 SDR of the separation tasks, the `eval` extra) needs an ffmpeg binary at
# import. Install both when this machine allows it, so tests/test_separation.py runs museval for
# real; where it cannot (no apt, no root, offline), that one test is skipped with the reason.
if ! command -v ffmpeg >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  { apt-get install -y -q --no-install-recommends ffmpeg || { apt-get update -q && apt-get install -y -q --no-install-recommends ffmpeg; }; } >/dev/null 2>&1 \
    || echo "scripts/test.sh: could not install ffmpeg; the museval test will be skipped" >&2
fi
python3 -m pip install -q -e '.[eval]' || echo "scripts/test.sh: could not install the eval extra (museval); the museval test will be skipped" >&2
# Lint and import order (config in pyproject.toml); the layering itself is a test (tests/contracts).
python3 -m ruff check .
# A fresh environment must resolve a torch/torchvision/torchaudio/timm set that imports together.
python3 -c "import torch, torchvision, torchaudio, timm; print('torch', torch.__version__, '| torchvision', torchvision.__version__, '| torchaudio', torchaudio.__version__, '| timm', timm.__version__)"
# DiffQ's parallel noise fill is compiled once per machine (~20 s, diffq_bench/quant/native.py): build
# it here rather than inside whichever test first trains DiffQ on two threads. Where it cannot be
# built the runs fall back to Python threads (same noise); tests/quant/test_native.py says why.
python3 -c "from diffq_bench.quant import native; ok = native.load(); print('DiffQ compiled noise fill:', 'ready' if ok else native.status()['error'])"
# Two workers (the CI machine has 2 cores; tests run single-threaded); a file's tests stay on one
# worker, so module/session fixtures (the SLURM test cluster, shared torchrun sessions) start once.
set +e
python3 -m pytest -n 2 --dist loadfile "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit "$rc"
