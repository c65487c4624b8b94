#!/usr/bin/env bash
# The test command (the README's): unit tests, then every chapter executed by nbval.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export ICONV_SIZE="${ICONV_SIZE:-ci}"
python -m pytest --nbval-lax tests/ book/ "$@"
