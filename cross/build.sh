#!/usr/bin/env bash
# Cross-compiles `sluice` for an ARM gateway on Debian 12 without Docker,
# strips it, runs `sluice --version` under qemu and prints the stripped
# binary's path as the last line of stdout (everything else goes to stderr):
#
#   cross/build.sh aarch64                      # size-tuned release profile
#   cross/build.sh armv7                        # best-effort (cross/README.md)
#   cross/build.sh aarch64 --profile ci-cross   # CI's faster-to-build profile
#   BIN=$(cross/build.sh aarch64)               # stdout is only the path
#
# TARGET is aarch64, armv7 or the full Rust triple. What it does, and why,
# is in cross/README.md. Environment:
#   SKIP_APT=1                 never call apt-get install (tools are there)
#   SLUICE_CROSS_DIR=DIR       cargo target dir, sysroots and output
#                              (default target/cross)
#   SLUICE_CROSS_ALLOW_STALE_INDEX=1
#                              when the signed apt index of the target's
#                              architecture will not download (armhf here),
#                              take the std's SHA-256 from the mirror's
#                              Packages.xz even though it does not match the
#                              signed Release file (see cross/README.md)
#   DEBIAN_SECURITY_MIRROR=URL (default http://deb.debian.org/debian-security)
set -euo pipefail

usage() {
    echo "usage: cross/build.sh aarch64|armv7 [--profile release|ci-cross]" >&2
    exit 2
}
[ $# -ge 1 ] || usage
case "$1" in
    aarch64 | aarch64-unknown-linux-gnu)
        TRIPLE=aarch64-unknown-linux-gnu DEB_ARCH=arm64 GNU=aarch64-linux-gnu
        QEMU=qemu-aarch64-static ELF_MACHINE="ARM aarch64"
        ;;
    armv7 | armv7-unknown-linux-gnueabihf)
        TRIPLE=armv7-unknown-linux-gnueabihf DEB_ARCH=armhf GNU=arm-linux-gnueabihf
        QEMU=qemu-arm-static ELF_MACHINE="ARM, EABI5"
        ;;
    *) usage ;;
esac
shift
PROFILE=release
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) [ $# -ge 2 ] || usage; PROFILE=$2; shift 2 ;;
        --profile=*) PROFILE=${1#--profile=}; shift ;;
        *) usage ;;
    esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
DIR=${SLUICE_CROSS_DIR:-$ROOT/target/cross}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
SYSROOT="$DIR/sysroot-$TRIPLE"
OUT="$DIR/dist/$TRIPLE/$PROFILE/sluice"
MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
APT_RETRY=(-o Acquire::Retries=3)
T_START=$(date +%s)

log() { echo "cross/build.sh: $*" >&2; }
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}
installed() {
    [ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null)" = "ii " ]
}

# 1. Host tools, installed only when missing: Debian's rustc/cargo 1.96
#    (bookworm-security; rustup cannot add targets here), the target's gcc,
#    binutils and libc, qemu user-mode, and file/jq/xz for the checks. All are
#    amd64 packages: no dpkg architecture is added to the machine.
PKGS=(rustc-web cargo-web "gcc-$GNU" "binutils-$GNU" "libc6-dev-$DEB_ARCH-cross"
    qemu-user-static file xz-utils)
missing=()
for p in "${PKGS[@]}"; do installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    [ "${SKIP_APT:-0}" != 1 ] || { log "missing packages and SKIP_APT=1: ${missing[*]}"; exit 1; }
    log "installing ${missing[*]}"
    as_root apt-get "${APT_RETRY[@]}" update -qq >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get "${APT_RETRY[@]}" install -y -qq \
        --no-install-recommends "${missing[@]}" >&2
fi

RUST_VERSION=$(dpkg-query -W -f='${Version}' rustc-web)
MSRV=$(sed -n '/^\[workspace\.package\]/,/^\[/s/^rust-version *= *"\(.*\)"/\1/p' Cargo.toml)
if ! dpkg --compare-versions "$RUST_VERSION" ge "${MSRV:-0}"; then
    # bookworm main's rustc-web is 1.85; bookworm-security has 1.96.
    log "rustc-web $RUST_VERSION is older than rust-version $MSRV; install the" \
        "bookworm-security one (apt-cache policy rustc-web)"
    exit 1
fi
log "Debian rustc-web $RUST_VERSION"

# 2. The target's std must match the installed rustc exactly. It is unpacked
#    as a --sysroot, not installed: libstd-rust-web-dev:<arch> would pull
#    ~1.5 GB of <arch> runtime packages and needs the architecture added to
#    dpkg. Its index comes from a private apt state (bookworm-security, the
#    target's architecture only) so a broken foreign index can neither hide
#    the machine's own packages nor be hidden by them.
fetch_std() {
    local apt="$DIR/apt-$DEB_ARCH" dest=$1
    local pkg="libstd-rust-web-dev:$DEB_ARCH=$RUST_VERSION"
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial"
    echo "deb [arch=$DEB_ARCH signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR bookworm-security main" \
        >"$apt/sources.list"
    local opts=("${APT_RETRY[@]}" -o "Dir::Etc::sourcelist=$apt/sources.list"
        -o Dir::Etc::sourceparts=- -o "Dir::State::Lists=$apt/lists"
        -o "Dir::Cache=$apt/cache" -o "APT::Architectures::=$DEB_ARCH"
        -o APT::Sandbox::User=root)
    apt-get "${opts[@]}" update -qq >&2 || true
    if (cd "$dest" && apt-get "${opts[@]}" download "$pkg" >&2); then
        return 0
    fi
    if [ "${SLUICE_CROSS_ALLOW_STALE_INDEX:-0}" != 1 ]; then
        log "could not download $pkg through the signed $DEB_ARCH index."
        log "If apt reported 'File has unexpected size … Mirror sync in progress?' for"
        log "binary-$DEB_ARCH/Packages.xz, the mirror serves a stale index; rerun with"
        log "SLUICE_CROSS_ALLOW_STALE_INDEX=1 to take the package's SHA-256 from it (cross/README.md)."
        exit 1
    fi
    # The mirror's Packages.xz no longer matches the signed Release file, so
    # apt refuses it; the .deb is still checked against the SHA-256 that this
    # unsigned copy lists.
    log "WARNING: using the $DEB_ARCH index that failed its Release check (SLUICE_CROSS_ALLOW_STALE_INDEX=1)"
    /usr/lib/apt/apt-helper "${APT_RETRY[@]}" -o APT::Sandbox::User=root download-file \
        "$MIRROR/dists/bookworm-security/main/binary-$DEB_ARCH/Packages.xz" "$apt/Packages.xz" >&2
    local entry filename sha
    entry=$(xz -dc "$apt/Packages.xz" | awk -v v="$RUST_VERSION" '
        /^Package: libstd-rust-web-dev$/ { p = 1 }
        p && /^Version: / { ok = ($2 == v) }
        p && /^Filename: / { f = $2 }
        p && /^SHA256: / { s = $2 }
        /^$/ { if (p && ok && !done) { print f, s; done = 1 } p = ok = 0 }')
    read -r filename sha <<<"$entry" || true
    [ -n "${filename:-}" ] && [ -n "${sha:-}" ] || {
        log "no libstd-rust-web-dev $RUST_VERSION in the $DEB_ARCH index either"
        exit 1
    }
    /usr/lib/apt/apt-helper "${APT_RETRY[@]}" -o APT::Sandbox::User=root download-file "$MIRROR/$filename" \
        "$dest/$(basename "$filename")" "SHA256:$sha" >&2
}
STAMP="$SYSROOT/.version"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$RUST_VERSION" ]; then
    rm -rf "$SYSROOT"
    mkdir -p "$SYSROOT/deb" "$SYSROOT/lib"
    fetch_std "$SYSROOT/deb"
    dpkg-deb -x "$SYSROOT"/deb/libstd-rust-web-dev_*_"$DEB_ARCH".deb "$SYSROOT/unpacked"
    rm -rf "$SYSROOT/deb"
    ln -s "$SYSROOT/unpacked/usr/lib/rustlib" "$SYSROOT/lib/rustlib"
    test -d "$SYSROOT/lib/rustlib/$TRIPLE/lib" || {
        log "no $TRIPLE std in libstd-rust-web-dev:$DEB_ARCH $RUST_VERSION"
        exit 1
    }
    echo "$RUST_VERSION" >"$STAMP"
fi

# 3. Build with Debian's cargo/rustc: PATH without ~/.cargo/bin, whose
#    rustup toolchain has no ARM std. --sysroot reaches only the target
#    crates; build scripts and proc-macros keep the host sysroot. Linker and
#    runner come from cross/cargo-config.toml; cc-rs finds $GNU-gcc for
#    SQLite and ring by itself.
TRIPLE_ENV=$(echo "$TRIPLE" | tr 'a-z-' 'A-Z_')
CROSS_ENV=(
    env -u RUSTC -u RUSTDOC -u RUSTUP_TOOLCHAIN -u RUSTFLAGS -u CARGO_BUILD_RUSTFLAGS
    -u CARGO_BUILD_TARGET -u CARGO_ENCODED_RUSTFLAGS
    PATH=/usr/bin:/bin
    CARGO_TARGET_DIR="$DIR"
    "CARGO_TARGET_${TRIPLE_ENV}_RUSTFLAGS=--sysroot $SYSROOT"
)
"${CROSS_ENV[@]}" rustc -V >&2
"${CROSS_ENV[@]}" cargo -V >&2
T_BUILD=$(date +%s)
"${CROSS_ENV[@]}" cargo --config cross/cargo-config.toml build --locked \
    --target "$TRIPLE" --profile "$PROFILE" -p sluice-agent --bin sluice >&2
T_BUILT=$(date +%s)
BIN="$DIR/$TRIPLE/$PROFILE/sluice"

# 4. Strip into dist/ (the release profile already strips symbols; this also
#    covers profiles that do not), check the ELF machine, run it under qemu
#    (binfmt_misc may be absent, so qemu is called directly).
mkdir -p "$(dirname "$OUT")"
"$GNU-strip" -o "$OUT.tmp" "$BIN"
mv "$OUT.tmp" "$OUT"
FILE=$(file -b "$OUT")
case "$FILE" in
    *"$ELF_MACHINE"*) ;;
    *) log "unexpected ELF machine: $FILE"; exit 1 ;;
esac
VERSION=$("$QEMU" -L "/usr/$GNU" "$OUT" --version)
GLIBC=$("$GNU-objdump" -T "$OUT" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)
log "version:  $VERSION (under $QEMU)"
log "file:     $FILE"
log "size:     $(stat -c %s "$OUT") bytes stripped ($(stat -c %s "$BIN") as cargo left it)"
log "glibc:    needs $GLIBC or newer on the gateway"
log "time:     cargo build $((T_BUILT - T_BUILD)) s, whole script $(($(date +%s) - T_START)) s"
echo "$OUT"
