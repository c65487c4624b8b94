#!/usr/bin/env bash
# Runs of six or more lines shared by two places in the package (iconv/) and the chapters' code
# cells (book/*.ipynb, extracted to one .py file per chapter), found by the workplace's
# `duplicates` tool. Prints its report; the chapters' files are named book_<chapter>.py.
#
# Usage: bash tools/check_duplicates.sh [--most N] [other options of `duplicates`]
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
command -v duplicates >/dev/null || { echo "check_duplicates.sh: the 'duplicates' tool is not on PATH" >&2; exit 2; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

mkdir -p "$work/tree/book"
cp -r "$root/iconv" "$work/tree/iconv"
find "$work/tree/iconv" -name __pycache__ -prune -exec rm -rf {} +
python3 - "$root/book" "$work/tree/book" <<'PY'
import json, sys
from pathlib import Path

source, target = Path(sys.argv[1]), Path(sys.argv[2])
for notebook in sorted(source.glob("*.ipynb")):
    cells = [c for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]
    parts = [f"# cell {i}\n" + "".join(c["source"]) for i, c in enumerate(cells)]
    (target / f"book_{notebook.stem}.py").write_text("\n\n".join(parts) + "\n")
PY
cd "$work/tree"
duplicates --repo . --seconds 120 "$@"
