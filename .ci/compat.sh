#!/usr/bin/env bash
# The compatibility job: the package under the newest torch a reader may have (Colab moves ahead of
# the torch==2.13.0 that requirements.txt pins), in its own virtual environment beside the main one.
#
#   bash .ci/compat.sh                 # after .ci/setup.sh (apt packages, python3-venv)
#
# 1. .venv-compat (ICONV_COMPAT_VENV overrides; reused when present): torch and torchvision as
#    Colab pairs them (ICONV_COMPAT_TORCH, default "torch==2.14.1 torchvision==0.29.1"), the rest
#    of requirements.txt as pinned except the book-build tools (jupyter-book, sphinx-mathjax-offline:
#    the chapters run without them, as in Colab), and this package (editable).
# 2. The unit tests (tests/, torchvision present, so tests/test_torchvision.py runs the data path
#    that uses it), then chapters with nbval (ICONV_COMPAT_CHAPTERS, default the SneakyReLU
#    chapter and the flow chapter) at ICONV_SIZE=ci.
# Prints the time of each part; exits non-zero if the installation, a test or a chapter fails
# (both parts run even when the first fails).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source .ci/env.sh
start=$(date +%s)
read -r -a torch_spec <<< "${ICONV_COMPAT_TORCH:-torch==2.14.1 torchvision==0.29.1}"
read -r -a chapters <<< "${ICONV_COMPAT_CHAPTERS:-book/04_sneaky_relu.ipynb book/07_flow.ipynb}"
export ICONV_SIZE="${ICONV_SIZE:-ci}"

make_venv "${ICONV_COMPAT_VENV}"
py="${ICONV_COMPAT_VENV}/bin/python"
pins="$(mktemp)"
trap 'rm -f "${pins}"' EXIT
grep -vE '^[[:space:]]*(torch|torchvision|jupyter-book|sphinx-mathjax-offline)[[:space:]]*([=<>!~].*)?$' requirements.txt > "${pins}"
# --no-compile: no .pyc for torch's thousands of modules at install time (what is imported compiles
# on first use); it saves a good part of the installation.
"${py}" -m pip install "${PIP_FLAGS[@]}" --no-compile "${torch_spec[@]}" -r "${pins}"
install_editable "${py}"
enter_venv "${ICONV_COMPAT_VENV}"
python - "${torch_spec[@]}" <<'PY'
import sys

import torch
import torchvision

import iconv
from iconv.book import TESTED_TORCH

print(f"compat venv {sys.prefix} | python {sys.version.split()[0]} | torch {torch.__version__} | "
      f"torchvision {torchvision.__version__} | iconv {iconv.__version__}")
for spec in sys.argv[1:]:  # the environment holds what was asked for
    name, _, version = spec.partition("==")
    got = {"torch": torch.__version__, "torchvision": torchvision.__version__}.get(name, "")
    if version and got.split("+")[0] != version:
        sys.exit(f"asked for {spec}, the environment has {name} {got}")
release = ".".join(torch.__version__.split("+")[0].split(".")[:2])
if release not in TESTED_TORCH:
    print(f"note: torch {release} is not in iconv.book.TESTED_TORCH {TESTED_TORCH}: add it once this job passes")
PY
installed=$(date +%s)
echo "== compat: environment ready in $(( installed - start )) s"

rc=0
python -m pytest -q -p no:cacheprovider tests/ || rc=1
unit=$(date +%s)
echo "== compat: unit tests took $(( unit - installed )) s"
python -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env "${chapters[@]}" || rc=1
echo "== compat: chapters ${chapters[*]} took $(( $(date +%s) - unit )) s"
echo "== compat: finished in $(( $(date +%s) - start )) s (torch ${torch_spec[*]}), exit ${rc}"
exit "${rc}"
