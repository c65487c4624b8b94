#!/usr/bin/env bash
# The test command (the README's): unit tests, then every chapter executed by nbval with its
# assert cells, in the virtual environment made by .ci/setup.sh (.ci/env.sh). Extra arguments go
# to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source .ci/env.sh
enter_venv "${ICONV_VENV}"
export ICONV_SIZE="${ICONV_SIZE:-ci}"
python -m pytest --nbval-lax --nbval-current-env tests/ book/ "$@"
