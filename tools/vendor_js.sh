#!/usr/bin/env bash
# Reproduce the vendored ipywidgets JavaScript in _vendor/ from the npm registry.
#
# The book embeds ipywidgets state in its static HTML; the page needs the
# @jupyter-widgets/html-manager bundle to draw the widgets. myst-nb's default
# loads it (and RequireJS) from public CDNs; the book serves a local copy
# instead (see `nb_ipywidgets_js` in _config.yml), so it renders offline.
#
# We vendor `dist/embed.js`: the self-contained bundle of html-manager that
# renders the built-in widgets (@jupyter-widgets/base, controls, output) with no
# module loader. (`embed-amd.js` + RequireJS is what myst-nb uses by default; it
# is 3.6 MB, would only add the ability to fetch third-party widget modules
# from a CDN, and the book uses no third-party widgets.)
# Font Awesome webfonts referenced by the widget CSS are copied next to
# embed.js (woff2 only: every browser that runs the bundle picks woff2 first).
#
# Usage: tools/vendor_js.sh            # rewrite _vendor/ from npm
#        tools/vendor_js.sh --check    # verify _vendor/ matches npm byte for byte
set -euo pipefail

HTML_MANAGER_VERSION="1.0.15"   # html-manager 1.0.x renders ipywidgets 8 state

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$here/_vendor/static/jupyter-widgets"
mode="${1:-write}"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(
  cd "$tmp"
  npm pack --silent "@jupyter-widgets/html-manager@${HTML_MANAGER_VERSION}" >/dev/null
  mkdir hm && tar -xzf "jupyter-widgets-html-manager-${HTML_MANAGER_VERSION}.tgz" -C hm
)
src="$tmp/hm/package/dist"
# The woff2 fonts the bundle references through its webpack public path.
fonts=()
for f in "$src"/*.woff2; do
  name="$(basename "$f")"
  grep -q "${name}" "$src/embed.js" && fonts+=("$name")
done
files=(embed.js embed.js.LICENSE.txt "${fonts[@]}")

if [ "$mode" = "--check" ]; then
  status=0
  for f in "${files[@]}"; do
    if ! cmp -s "$src/$f" "$dest/$f"; then echo "DIFFERS: _vendor/static/jupyter-widgets/$f"; status=1; fi
  done
  extra=$(cd "$dest" && ls | grep -vxF -f <(printf '%s\n' "${files[@]}") || true)
  [ -z "$extra" ] || { echo "EXTRA files in $dest: $extra"; status=1; }
  [ $status -eq 0 ] && echo "_vendor/ matches @jupyter-widgets/html-manager@${HTML_MANAGER_VERSION}"
  exit $status
fi

rm -rf "$dest"
mkdir -p "$dest"
for f in "${files[@]}"; do cp "$src/$f" "$dest/$f"; done
# Browsers fetch source maps only with developer tools open; we do not ship it.
(cd "$dest" && sha256sum "${files[@]}") > "$here/_vendor/SHA256SUMS"
echo "vendored @jupyter-widgets/html-manager@${HTML_MANAGER_VERSION} into $dest:"
ls -la "$dest"
