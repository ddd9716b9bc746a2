#!/usr/bin/env bash
# Cross-compiles `sluice` for aarch64-unknown-linux-gnu on Debian 12 without
# Docker, then runs it once under qemu. See cross/README.md for the why.
#
#   cross/build-aarch64.sh            # install what is missing, build, smoke-run
#   SKIP_APT=1 cross/build-aarch64.sh # the tools are already installed
#
# Output: target/cross/aarch64-unknown-linux-gnu/release/sluice
# (a separate target dir, so the host build cache is not invalidated).
set -euo pipefail

TARGET=aarch64-unknown-linux-gnu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export CARGO_TARGET_DIR="$ROOT/target/cross"
SYSROOT="$CARGO_TARGET_DIR/sysroot-$TARGET"
BIN="$CARGO_TARGET_DIR/$TARGET/release/sluice"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# 1. Tools: Debian's rustc/cargo 1.96 (bookworm-security; rustup cannot add
#    targets here), the aarch64 gcc/binutils/libc, and qemu user-mode.
if [ "${SKIP_APT:-0}" != 1 ]; then
    if dpkg --print-foreign-architectures | grep -qx armhf; then
        echo "warning: armhf is an added dpkg architecture; if its bookworm-security" >&2
        echo "         index is broken, apt may not see the 1.96 arm64 std (cross/README.md)" >&2
    fi
    dpkg --print-foreign-architectures | grep -qx arm64 || as_root dpkg --add-architecture arm64
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        rustc-web cargo-web gcc-aarch64-linux-gnu libc6-dev-arm64-cross \
        binutils-aarch64-linux-gnu qemu-user-static
fi

RUST_VERSION=$(dpkg-query -W -f='${Version}' rustc-web)
echo "Debian rustc-web $RUST_VERSION"

# 2. The aarch64 std must match the installed rustc exactly. Unpack it as a
#    sysroot instead of installing libstd-rust-web-dev:arm64, which would pull
#    ~1.5 GB of arm64 runtime packages (libllvm etc.) that are never run.
STAMP="$SYSROOT/.version"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$RUST_VERSION" ]; then
    rm -rf "$SYSROOT"
    mkdir -p "$SYSROOT/deb" "$SYSROOT/lib"
    (cd "$SYSROOT/deb" && apt-get download "libstd-rust-web-dev:arm64=$RUST_VERSION")
    dpkg-deb -x "$SYSROOT"/deb/libstd-rust-web-dev_*_arm64.deb "$SYSROOT/unpacked"
    rm -rf "$SYSROOT/deb"
    ln -s "$SYSROOT/unpacked/usr/lib/rustlib" "$SYSROOT/lib/rustlib"
    test -d "$SYSROOT/lib/rustlib/$TARGET/lib" || {
        echo "error: no $TARGET std in libstd-rust-web-dev:arm64 $RUST_VERSION" >&2
        exit 1
    }
    echo "$RUST_VERSION" >"$STAMP"
fi

# 3. Build with Debian's cargo/rustc (PATH without ~/.cargo/bin, where
#    rustup's toolchain has no aarch64 std). --sysroot reaches only the target
#    crates; build scripts and proc-macros keep the host sysroot. Linker and
#    runner come from cross/cargo-config.toml (passed with --config).
CROSS_ENV=(
    env -u RUSTC -u RUSTDOC -u RUSTUP_TOOLCHAIN -u RUSTFLAGS -u CARGO_BUILD_RUSTFLAGS
    PATH=/usr/bin:/bin
    CARGO_TARGET_DIR="$CARGO_TARGET_DIR"
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS="--sysroot $SYSROOT"
)
"${CROSS_ENV[@]}" rustc -V
"${CROSS_ENV[@]}" cargo -V
"${CROSS_ENV[@]}" cargo --config cross/cargo-config.toml build --locked --target "$TARGET" --release -p sluice-agent --bin sluice

# 4. Smoke run under qemu (binfmt_misc may be absent, so call qemu directly).
qemu-aarch64-static -L /usr/aarch64-linux-gnu "$BIN" --version

# 5. Size and glibc floor. The release profile already strips symbols; a
#    stripped copy shows whether anything is left to gain.
cp "$BIN" "$BIN.stripped"
aarch64-linux-gnu-strip "$BIN.stripped"
GLIBC=$(aarch64-linux-gnu-objdump -T "$BIN" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)
echo "binary:   $BIN"
echo "size:     $(stat -c %s "$BIN") bytes as built, $(stat -c %s "$BIN.stripped") bytes after aarch64-linux-gnu-strip"
echo "glibc:    needs $GLIBC or newer on the gateway"
file "$BIN" 2>/dev/null || true
