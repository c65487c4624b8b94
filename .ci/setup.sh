#!/usr/bin/env bash
# Set up a fresh Debian 12 / Ubuntu 24.04 machine for the tests and the book build. Needs only
# `python3` and apt (as root, or with sudo):
#   - Debian packages: python3-venv when `python3 -m venv` cannot work (Debian ships venv's
#     ensurepip separately), Fashion-MNIST (offline data), Chromium (the page check), Graphviz
#     (`dot`, the book's diagrams);
#   - a virtual environment, .venv at the repository root (ICONV_VENV overrides; an existing one is
#     reused), with the pinned CPU environment of requirements.txt and this package (editable).
# The system Python is never installed into (it is externally managed, PEP 668). Every other CI
# script runs inside that environment (.ci/env.sh). Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source .ci/env.sh
start=$(date +%s)

apt_updated=0
apt_install() {  # apt_install PACKAGE...: as root, or through sudo
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "apt-get install $*"
  if [ "${apt_updated}" = 0 ]; then $sudo apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@"
}

need_apt=()
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
[ -d /usr/share/datasets/fashion-mnist ] || need_apt+=(dataset-fashion-mnist)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v dot >/dev/null 2>&1 || need_apt+=(graphviz)
[ ${#need_apt[@]} -eq 0 ] || apt_install "${need_apt[@]}"

# Debian and Ubuntu ship venv's pip bootstrap (ensurepip) in python3-venv: without it
# `python3 -m venv` stops with "ensurepip is not available". Install it then, and try again.
existed=0
[ -e "${ICONV_VENV}" ] && existed=1
if ! make_venv "${ICONV_VENV}"; then
  [ "${existed}" = 1 ] || rm -rf "${ICONV_VENV}"  # remove only a half-made new environment
  apt_install python3-venv
  make_venv "${ICONV_VENV}"
fi
py="${ICONV_VENV}/bin/python"
"${py}" -m pip install "${PIP_FLAGS[@]}" -r requirements.txt
install_editable "${py}"
"${py}" -c "import sys, torch, iconv; print('venv', sys.prefix, '| python', sys.version.split()[0], '| torch', torch.__version__, '| iconv', iconv.__version__)"
echo "setup took $(( $(date +%s) - start )) s"
