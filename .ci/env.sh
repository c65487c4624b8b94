# Sourced by every CI script (.ci/setup.sh, test.sh, build_book.sh, compat.sh, run): where the
# virtual environment lives and how to enter it. Nothing here installs anything.
#
#   ICONV_VENV         the main environment (default: .venv at the repository root), made by setup.sh
#   ICONV_COMPAT_VENV  the compatibility job's environment (default: .venv-compat), made by compat.sh
#
# The scripts never install into the system Python: on Debian 12 / Ubuntu 24.04 it is "externally
# managed" (PEP 668) and pip refuses; a virtual environment is the supported way.

ICONV_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ICONV_VENV="${ICONV_VENV:-${ICONV_ROOT}/.venv}"
ICONV_COMPAT_VENV="${ICONV_COMPAT_VENV:-${ICONV_ROOT}/.venv-compat}"
PIP_FLAGS=(-q --disable-pip-version-check --root-user-action=ignore)

# enter_venv DIR: put DIR's interpreter first on PATH (what `source DIR/bin/activate` does, without
# depending on the activate script under `set -u`); exits with a hint when DIR has no environment.
enter_venv() {
  local dir="$1"
  if [ ! -x "${dir}/bin/python" ]; then
    echo "no virtual environment at ${dir}: run 'bash .ci/setup.sh' first" >&2
    exit 1
  fi
  export VIRTUAL_ENV="${dir}"
  export PATH="${dir}/bin:${PATH}"
  unset PYTHONHOME
  hash -r
}

# make_venv DIR: create a virtual environment at DIR with the system's python3 unless one is there.
make_venv() {
  local dir="$1"
  if [ -x "${dir}/bin/python" ] && "${dir}/bin/python" -c "import pip" >/dev/null 2>&1; then
    return 0
  fi
  echo "creating the virtual environment ${dir} ($(python3 --version 2>&1))"
  python3 -m venv "${dir}"
}

# install_editable PYTHON: this package, editable, without touching its dependencies. Build
# isolation would fetch setuptools from the index at every install; use the environment's own,
# installing it first where the venv comes without one (Python >= 3.12).
install_editable() {
  local py="$1"
  if ! "${py}" -c "import setuptools" >/dev/null 2>&1; then
    "${py}" -m pip install "${PIP_FLAGS[@]}" "setuptools>=61"
  fi
  "${py}" -m pip install "${PIP_FLAGS[@]}" --no-deps --no-build-isolation -e "${ICONV_ROOT}"
}
