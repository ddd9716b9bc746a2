#!/usr/bin/env bash
# Builds sluice_<version>_<arch>.deb from an already built binary: stages a
# tree (binary, systemd units, sysusers/tmpfiles, polkit rule, the default
# configuration as a conffile) and packs it with `dpkg-deb --build`. No
# cargo-deb, no compiling. Prints the package's path as the last line of
# stdout.
#
#   packaging/deb/build.sh                          # target/release/sluice, host arch
#   packaging/deb/build.sh --bin "$(cross/build.sh aarch64)"   # arm64 package
#
# Options:
#   --bin PATH       the sluice binary (default target/release/sluice); it is
#                    stripped into the package, and its ELF machine sets the
#                    Architecture (amd64, arm64, armhf)
#   --out DIR        where the .deb goes (default target/deb)
#   --version V      package version (default: [workspace.package] version in
#                    Cargo.toml, with a pre-release "-" turned into "~")
#   --compress TYPE  dpkg-deb compressor: xz (default), gzip, zstd, none
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE="$ROOT/packaging/deb"
BIN="$ROOT/target/release/sluice"
OUTDIR="$ROOT/target/deb"
VERSION=""
COMPRESS=xz

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}
while [ $# -gt 0 ]; do
    case "$1" in
        --bin) BIN=${2:?--bin needs a path}; shift 2 ;;
        --out) OUTDIR=${2:?--out needs a directory}; shift 2 ;;
        --version) VERSION=${2:?--version needs a value}; shift 2 ;;
        --compress) COMPRESS=${2:?--compress needs a type}; shift 2 ;;
        -h | --help) usage ;;
        *) echo "packaging/deb/build.sh: unknown argument $1" >&2; usage ;;
    esac
done
log() { echo "packaging/deb/build.sh: $*" >&2; }
[ -f "$BIN" ] || { log "no binary at $BIN (build it first)"; exit 1; }

if [ -z "$VERSION" ]; then
    VERSION=$(sed -n '/^\[workspace\.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$ROOT/Cargo.toml")
    VERSION=${VERSION/-/\~}
fi
[ -n "$VERSION" ] || { log "no version in Cargo.toml"; exit 1; }

# The ELF header names the machine (e_machine, 2 bytes at offset 18, little
# endian on all three): the package's architecture and the strip to use.
[ "$(head -c 4 "$BIN" | od -An -c | tr -d ' ')" = '177ELF' ] || { log "$BIN is not an ELF file"; exit 1; }
MACHINE=$(od -An -tu2 -j18 -N2 "$BIN" | tr -d ' ')
case "$MACHINE" in
    62) ARCH=amd64 GNU=x86_64-linux-gnu ;;
    183) ARCH=arm64 GNU=aarch64-linux-gnu ;;
    40) ARCH=armhf GNU=arm-linux-gnueabihf ;;
    *) log "unsupported ELF machine $MACHINE in $BIN"; exit 1 ;;
esac
STRIP="$GNU-strip"
if ! command -v "$STRIP" >/dev/null 2>&1; then
    [ "$ARCH" = "$(dpkg --print-architecture)" ] && STRIP=strip
fi
command -v "$STRIP" >/dev/null 2>&1 || { log "$STRIP not found (binutils-$GNU)"; exit 1; }

STAGE="$OUTDIR/stage-$ARCH"
rm -rf "$STAGE"
mkdir -p "$STAGE/DEBIAN" "$STAGE/usr/bin" "$STAGE/usr/lib/systemd/system" \
    "$STAGE/usr/lib/sysusers.d" "$STAGE/usr/lib/tmpfiles.d" \
    "$STAGE/usr/share/polkit-1/rules.d" "$STAGE/usr/share/doc/sluice" "$STAGE/etc/sluice"

"$STRIP" -o "$STAGE/usr/bin/sluice" "$BIN"
chmod 0755 "$STAGE/usr/bin/sluice"
install -m 0644 "$ROOT/systemd/sluice.service" "$ROOT/systemd/sluice-update@.service" \
    "$STAGE/usr/lib/systemd/system/"
install -m 0644 "$ROOT/systemd/sluice.sysusers" "$STAGE/usr/lib/sysusers.d/sluice.conf"
install -m 0644 "$ROOT/systemd/sluice.tmpfiles" "$STAGE/usr/lib/tmpfiles.d/sluice.conf"
install -m 0644 "$ROOT/systemd/50-sluice-update.rules" "$STAGE/usr/share/polkit-1/rules.d/"
install -m 0644 "$HERE/copyright" "$STAGE/usr/share/doc/sluice/copyright"
# The reference configuration: every key at its default, state in
# /var/lib/sluice, admin socket in /run/sluice (what the units expect).
# Readable by all: it holds no secrets (those are files it names).
install -m 0644 "$ROOT/configs/sluice.toml" "$STAGE/etc/sluice/sluice.toml"
echo /etc/sluice/sluice.toml >"$STAGE/DEBIAN/conffiles"
install -m 0755 "$HERE/postinst" "$HERE/prerm" "$HERE/postrm" "$STAGE/DEBIAN/"

# The glibc floor is the newest GLIBC_x.y symbol version the binary needs.
GLIBC=$(grep -ao 'GLIBC_2\.[0-9][0-9.]*' "$STAGE/usr/bin/sluice" | sort -uV | tail -1)
GLIBC=${GLIBC#GLIBC_}
[ -n "$GLIBC" ] || { log "no GLIBC symbol versions in $BIN (static or not glibc?)"; exit 1; }
SIZE_KB=$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)

cat >"$STAGE/DEBIAN/control" <<EOF
Package: sluice
Version: $VERSION
Architecture: $ARCH
Maintainer: sluice maintainers <maintainers@sluice-gw.invalid>
Installed-Size: $SIZE_KB
Depends: libc6 (>= $GLIBC)
Suggests: polkitd
Section: net
Priority: optional
Homepage: https://github.com/sluice-gw/sluice
Description: edge/IoT gateway daemon with a durable outbox
 sluice accepts telemetry from devices over HTTP, MQTT and CoAP, keeps it
 in an on-disk outbox and forwards it to an MQTT cloud broker (generic
 topics or the ThingsBoard gateway API), with device firmware campaigns
 and signed fleet configuration. A single binary (SQLite and TLS built
 in), run by systemd as the unprivileged user sluice.
EOF

mkdir -p "$OUTDIR"
DEB="$OUTDIR/sluice_${VERSION}_${ARCH}.deb"
dpkg-deb --root-owner-group -Z"$COMPRESS" --build "$STAGE" "$DEB" >&2
rm -rf "$STAGE"
log "$(basename "$DEB"): $(stat -c %s "$DEB") bytes, Depends: libc6 (>= $GLIBC)"
echo "$DEB"
