#!/usr/bin/env bash
# Build the book and check every built page in headless Chromium.
#
#   bash .ci/build_book.sh        (after bash .ci/setup.sh, which makes the virtual environment)
#
# 1. jupyter-book executes every notebook listed in _toc.yml (ICONV_SIZE=ci unless set),
#    treating any warning (-W, nitpicky -n) or failing cell as an error; --keep-going reports
#    all of them before failing.
# 2. tests/browser/check_pages.py serves _build/html on 127.0.0.1 and checks each page in
#    headless Chromium with every non-local host unreachable: MathJax typeset, widgets drawn,
#    images and other resources load, internal links resolve. Screenshots: _build/screenshots/.
# Exits non-zero if either step fails.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$(pwd)"
source .ci/env.sh
enter_venv "${ICONV_VENV}"  # the environment made by .ci/setup.sh

# Notebooks run with cwd=book/; make the working tree's package importable even when it
# is not pip-installed, and build at the CPU size.
export PYTHONPATH="${root}${PYTHONPATH:+:${PYTHONPATH}}"
export ICONV_SIZE="${ICONV_SIZE:-ci}"
export PYDEVD_DISABLE_FILE_VALIDATION=1   # silence ipykernel's debugger warning on 3.11+

# The vendored widget renderer must be intact (offline check; tools/vendor_js.sh rebuilds it).
(cd _vendor/static/jupyter-widgets && sha256sum --quiet -c ../../SHA256SUMS)

rm -rf _build/html _build/jupyter_execute _build/screenshots
t0=$(date +%s)
jupyter-book build . --all -W -n --keep-going
t1=$(date +%s)
echo "book built in $((t1 - t0)) s (ICONV_SIZE=${ICONV_SIZE})"

python tests/browser/check_pages.py --html _build/html --toc _toc.yml --screenshots _build/screenshots
echo "browser check took $(( $(date +%s) - t1 )) s"
