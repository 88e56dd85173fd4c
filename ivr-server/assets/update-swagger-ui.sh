#!/usr/bin/env bash
# Refreshes the vendored Swagger UI (served at /docs, embedded in the binary) from the npm
# package swagger-ui-dist, at the pinned version below. Only the files /docs uses are kept:
# the bundle, its stylesheet and the licence. Change VERSION, run this, commit the result.
set -euo pipefail
VERSION=5.35.0
here="$(cd "$(dirname "$0")" && pwd)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "swagger-ui-dist@$VERSION" >/dev/null && tar -xzf "swagger-ui-dist-$VERSION.tgz")
out="$here/swagger-ui"
mkdir -p "$out"
for file in swagger-ui-bundle.js swagger-ui.css LICENSE; do
  cp "$work/package/$file" "$out/$file"
done
# The bundle's last line points at a source map that is not vendored; drop it so browsers
# don't ask for it.
sed -i '/^\/\/# sourceMappingURL=/d' "$out/swagger-ui-bundle.js"
sed -i '/^\/\*# sourceMappingURL=/d' "$out/swagger-ui.css"
echo "$VERSION" > "$out/VERSION"
echo "swagger-ui-dist $VERSION -> $out"
