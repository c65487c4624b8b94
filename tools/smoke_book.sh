#!/usr/bin/env bash
# Prove the book pipeline in a scratch copy, before the chapters exist.
#
#   tools/smoke_book.sh                  # build must pass (zero warnings, browser check)
#   tools/smoke_book.sh --inject-failure # a failing assert must make the build exit non-zero
#   tools/smoke_book.sh --inject-warning # a Sphinx warning must make the build exit non-zero
#   add --template-only to replace every chapter (even existing ones) by the template
#
# Copies the working tree (without _build/ and .git/) to a temp dir, fills every chapter of
# _toc.yml that does not exist yet with a copy of tools/chapter_template.ipynb (labels made unique),
# and runs .ci/build_book.sh there. Prints the scratch dir; the working tree is not touched.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mode=""
template_only=0
for arg in "$@"; do
  case "$arg" in
    --template-only) template_only=1 ;;
    --inject-failure|--inject-warning) mode="$arg" ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done
scratch="$(mktemp -d /tmp/iconv-book-smoke.XXXXXX)"
tar -C "$here" --exclude=./_build --exclude=./.git -cf - . | tar -C "$scratch" -xf -
cd "$scratch"

python - "$mode" "$template_only" <<'PY'
import json, pathlib, re, sys
mode, template_only = sys.argv[1], sys.argv[2] == "1"
toc = pathlib.Path("_toc.yml").read_text()
chapters = re.findall(r"^\s*-\s*file:\s*(\S+)", toc, flags=re.M)
template = pathlib.Path("tools/chapter_template.ipynb").read_text()
made = []
for ch in chapters:
    if ch in ("book/intro", "book/references"):
        continue
    if not template_only and (pathlib.Path(ch + ".ipynb").exists() or pathlib.Path(ch + ".md").exists()):
        continue
    pathlib.Path(ch + ".md").unlink(missing_ok=True)
    tag = pathlib.Path(ch).name.split("_")[0]
    text = template.replace("fig-template-", f"fig-{tag}-").replace("eq-sneaky", f"eq-{tag}-sneaky")
    text = text.replace("# Chapter template", f"# Chapter {tag} (template copy)")
    pathlib.Path(ch + ".ipynb").write_text(text)
    made.append(ch)
print("template copies:", ", ".join(made) or "none")
if mode in ("--inject-failure", "--inject-warning"):
    target = pathlib.Path((made or chapters)[0] + ".ipynb")
    nb = json.loads(target.read_text())
    if mode == "--inject-failure":
        cell = {"cell_type": "code", "id": "injected", "metadata": {}, "outputs": [],
                "execution_count": None, "source": ["assert 1 + 1 == 3, 'injected failure'"]}
    else:  # a reference to a label that does not exist: a Sphinx warning
        cell = {"cell_type": "markdown", "id": "injected", "metadata": {},
                "source": ["See {numref}`no-such-label`."]}
    nb["cells"].append(cell)
    target.write_text(json.dumps(nb, indent=1))
    print("injected into", target)
PY

echo "scratch copy: $scratch"
set +e
bash .ci/build_book.sh
rc=$?
set -e
echo "build exit code: $rc"
case "$mode" in
  --inject-failure|--inject-warning)
    if [ $rc -ne 0 ]; then echo "OK: the injected problem failed the build"; exit 0; fi
    echo "FAIL: the build passed despite the injected problem"; exit 1 ;;
  *) exit $rc ;;
esac
