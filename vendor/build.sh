#!/bin/sh
# Rebuild the console's vendored front-end files from the npm registry (not needed at run time):
#   api/static/console/vendor/editor.js      CodeMirror 6 (view, state, commands, language, YAML, lint), one ES module
#   api/static/console/vendor/LICENSES.txt   the licences of everything bundled
#   tests/vendor/axe.min.js                  axe-core, for the browser tests' accessibility check
# The versions are pinned by package-lock.json: `npm ci` installs exactly those.
set -eu
cd "$(dirname "$0")"
npm ci --no-audit --no-fund
out=../api/static/console/vendor
mkdir -p "$out" ../tests/vendor
node_modules/.bin/esbuild editor.js --bundle --minify --format=esm --legal-comments=none \
    --target=es2020 --outfile="$out/editor.js"
{
  echo "Licences of the packages bundled into editor.js (versions from vendor/package-lock.json)."
  for dir in node_modules/@codemirror/* node_modules/@lezer/* node_modules/@marijn/* \
             node_modules/crelt node_modules/style-mod node_modules/w3c-keyname; do
    [ -f "$dir/package.json" ] || continue
    name=$(node -p "require('./$dir/package.json').name + '@' + require('./$dir/package.json').version")
    echo; echo "=== $name"; echo
    cat "$dir"/LICENSE* 2>/dev/null || node -p "require('./$dir/package.json').license"
  done
} > "$out/LICENSES.txt"
cp node_modules/axe-core/axe.min.js ../tests/vendor/axe.min.js
cp node_modules/axe-core/LICENSE ../tests/vendor/axe-core.LICENSE
echo "axe-core@$(node -p "require('./node_modules/axe-core/package.json').version")" > ../tests/vendor/axe-core.VERSION
ls -l "$out" ../tests/vendor
