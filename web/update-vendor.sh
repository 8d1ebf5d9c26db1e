#!/bin/sh
# Refresh the web UI's vendored libraries in web/vendor/ from the npm registry (`make web-vendor`).
# Exact versions are pinned here; bump one, run this, check the UI (tests/test_web_ui.py), commit.
set -eu

MARKED=18.2.1
DOMPURIFY=3.4.18
HIGHLIGHT=11.12.0

here=$(cd "$(dirname "$0")" && pwd)
out="$here/vendor"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

cd "$tmp"
npm pack --silent "marked@$MARKED" "dompurify@$DOMPURIFY" "@highlightjs/cdn-assets@$HIGHLIGHT" >/dev/null
for tgz in *.tgz; do
	mkdir "${tgz%.tgz}"
	tar xzf "$tgz" -C "${tgz%.tgz}"
done

rm -rf "$out"
mkdir -p "$out/marked" "$out/dompurify" "$out/highlight"
cp "marked-$MARKED/package/lib/marked.umd.js" "$out/marked/marked.umd.js"
cp "marked-$MARKED/package/LICENSE" "$out/marked/LICENSE"
cp "dompurify-$DOMPURIFY/package/dist/purify.min.js" "$out/dompurify/purify.min.js"
cp "dompurify-$DOMPURIFY/package/LICENSE" "$out/dompurify/LICENSE"
h="highlightjs-cdn-assets-$HIGHLIGHT/package"
cp "$h/highlight.min.js" "$out/highlight/highlight.min.js"
cp "$h/styles/github.min.css" "$out/highlight/github.min.css"
cp "$h/styles/github-dark.min.css" "$out/highlight/github-dark.min.css"
cp "$h/LICENSE" "$out/highlight/LICENSE"

cat >"$out/VERSIONS" <<END
# from the npm registry by web/update-vendor.sh; do not edit these files by hand
marked $MARKED
dompurify $DOMPURIFY
@highlightjs/cdn-assets $HIGHLIGHT
END
echo "web/vendor: marked $MARKED, dompurify $DOMPURIFY, highlight.js $HIGHLIGHT"
