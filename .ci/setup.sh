#!/usr/bin/env bash
# Set up a fresh Debian machine (root) for the tests and the book build.
#   - Debian packages: Fashion-MNIST (offline data) and Chromium (browser test of the built book)
#   - Python packages: the pinned CPU environment in requirements.txt, then this package (editable)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

need_apt=()
[ -d /usr/share/datasets/fashion-mnist ] || need_apt+=(dataset-fashion-mnist)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

python -m pip install -q --disable-pip-version-check --root-user-action=ignore -r requirements.txt
python -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps --no-build-isolation -e .
python -c "import torch, iconv; print('torch', torch.__version__, '| iconv', iconv.__version__)"
