#!/usr/bin/env bash
# Builds the Debian package a DBA installs without Rust, from the tree `cargo pgrx package` makes:
#
#   scripts/package.sh [OUT_DIR]   OUT_DIR/postgresql-15-evoq_<version>_<arch>.deb (the naming of
#                                  PGDG's extension packages) and OUT_DIR/SHA256SUMS beside it;
#                                  OUT_DIR defaults to target/package
#
# The version is Cargo.toml's, the one evoq.control gets too (default_version = '@CARGO_VERSION@');
# the architecture is dpkg's. `cargo pgrx package` is a release build: about 5 minutes on 2 cores
# the first time, seconds once the release build is up to date. EVOQ_MAINTAINER overrides the
# Maintainer field. Needs dpkg-dev (dpkg-shlibdeps) and binutils (strip), which setup.sh installs.
set -euo pipefail
cd "$(dirname "$0")/.."

# Always Debian's PostgreSQL 15, never a private copy (PGBIN): the package's paths are its paths.
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
NAME=postgresql-15-evoq
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
SUMMARY=$(sed -n 's/^description = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
ARCH=$(dpkg --print-architecture)
MAINTAINER=${EVOQ_MAINTAINER:-evoq maintainers <maintainers@users.noreply.b-seed-0dede2ff.example>}
OUT=$(realpath -m "${1:-target/package}")
DEB=${NAME}_${VERSION}_${ARCH}.deb
if [ -z "$VERSION" ] || [ -z "$SUMMARY" ]; then echo "package: no version or description in Cargo.toml" >&2; exit 1; fi

# dpkg-shlibdeps looks for a package's files in debian/<package>/ under the directory it runs in.
WORK=$(mktemp -d /tmp/evoq-package.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
STAGE=$WORK/debian/$NAME
LIBDIR=usr/lib/postgresql/15/lib EXTDIR=usr/share/postgresql/15/extension

echo "== cargo pgrx package (release build of evoq $VERSION; about 5 minutes on 2 cores the first time)"
start=$SECONDS
if ! cargo pgrx package --pg-config "$PG_CONFIG" --out-dir "$STAGE" >"$WORK/cargo-pgrx-package.log" 2>&1; then
  tail -n 40 "$WORK/cargo-pgrx-package.log" >&2
  exit 1
fi
echo "   built in $((SECONDS - start)) s"

# What the package must hold, checked rather than assumed: pgrx copies sql/evoq--*--*.sql with
# @CARGO_VERSION@ filled in, and ALTER EXTENSION evoq UPDATE needs every one of them.
expected=("$LIBDIR/evoq.so" "$EXTDIR/evoq.control" "$EXTDIR/evoq--$VERSION.sql")
for script in sql/evoq--*--*.sql; do expected+=("$EXTDIR/$(basename "$script")"); done
for f in "${expected[@]}"; do
  [ -f "$STAGE/$f" ] || { echo "package: cargo pgrx package did not write /$f" >&2; exit 1; }
done
grep -qx "default_version = '$VERSION'" "$STAGE/$EXTDIR/evoq.control" \
  || { echo "package: the control file's default_version is not $VERSION" >&2; exit 1; }
unexpected=$(cd "$STAGE" && { find . -type f | sed 's|^\./||' | grep -vxF -f <(printf '%s\n' "${expected[@]}") || true; })
[ -z "$unexpected" ] || { echo "package: unexpected files in pgrx's tree: $unexpected" >&2; exit 1; }

# As dh_strip does: PostgreSQL needs only the dynamic symbols (.dynsym), which strip keeps.
strip --strip-unneeded --remove-section=.comment --remove-section=.note "$STAGE/$LIBDIR/evoq.so"
find "$STAGE" -type d -exec chmod 0755 {} +
find "$STAGE" -type f -exec chmod 0644 {} + # shared libraries too, as Debian ships them

# Depends: the server whose files these are, and what the library links, computed by dpkg's own
# tool from the libraries' symbol versions (libc6 (>= 2.34), libgcc-s1 (>= 4.2) on bookworm).
printf 'Source: evoq\n\nPackage: %s\nArchitecture: any\n' "$NAME" >"$WORK/debian/control"
shlibs=$(cd "$WORK" && dpkg-shlibdeps -O -e"debian/$NAME/$LIBDIR/evoq.so" 2>"$WORK/shlibdeps.log" | sed -n 's/^shlibs:Depends=//p') \
  || { cat "$WORK/shlibdeps.log" >&2; exit 1; }
[ -n "$shlibs" ] || { cat "$WORK/shlibdeps.log" >&2; echo "package: dpkg-shlibdeps found no dependencies" >&2; exit 1; }

# dpkg-gencontrol's rule: each file's size in KiB rounded up, plus 1 KiB per directory.
installed_size=$(find "$STAGE" -mindepth 1 \( -type f -printf '%s\n' -o -type d -printf '1024\n' \) |
  awk '{ kib += int(($1 + 1023) / 1024) } END { print kib }')

mkdir -m 0755 "$STAGE/DEBIAN"
(cd "$STAGE" && find usr -type f -print0 | sort -z | xargs -0 md5sum) >"$STAGE/DEBIAN/md5sums" # for dpkg --verify
cat >"$STAGE/DEBIAN/control" <<CONTROL
Package: $NAME
Version: $VERSION
Architecture: $ARCH
Maintainer: $MAINTAINER
Installed-Size: $installed_size
Depends: postgresql-15, $shlibs
Recommends: postgresql-15-cron
Section: database
Priority: optional
Description: $SUMMARY
 evoq is a PostgreSQL 15 extension that gives every user of an application
 their own WhatsApp number: a trigger queues each new profile, and SQL
 functions create its Evolution API instance, keep its QR code fresh until the
 user scans it, follow the server's webhooks and delete the instance with the
 user.
 .
 pg_cron runs the jobs (evoq_schedule()); without it, call evoq_process_queue()
 and evoq_refresh_qr() from any scheduler, or load the background worker with
 shared_preload_libraries = 'evoq'.
CONTROL
chmod 0644 "$STAGE/DEBIAN/control" "$STAGE/DEBIAN/md5sums"

mkdir -p "$OUT"
rm -f "$OUT/$DEB"
dpkg-deb --build --root-owner-group "$STAGE" "$OUT/$DEB" >/dev/null
(cd "$OUT" && sha256sum "$DEB" >SHA256SUMS)
echo "== $OUT/$DEB ($(du -h --apparent-size "$OUT/$DEB" | cut -f1), Installed-Size $installed_size KiB)"
echo "   Depends: postgresql-15, $shlibs; Recommends: postgresql-15-cron"
echo "   $OUT/SHA256SUMS: $(cut -d' ' -f1 "$OUT/SHA256SUMS")"
echo "   install it: apt-get install ./$DEB (after: cd $OUT && sha256sum -c SHA256SUMS)"
