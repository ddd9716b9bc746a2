#!/usr/bin/env bash
# CI step: cross-builds sluice for aarch64 (the ci-cross profile: release
# without fat LTO, faster to build) and runs it under qemu user-mode:
# --version, check-config, then a short end-to-end run (device registered
# with the emulated CLI, one HTTP reading, SIGTERM, the reading is in the
# outbox). Also stages the arm64 .deb from that binary and checks its
# control fields and contents. Prints each part's duration.
#
#   .ci/cross-smoke.sh           # aarch64, what CI runs
#   .ci/cross-smoke.sh armv7     # the same for armv7 (best-effort; may need
#                                # SLUICE_CROSS_ALLOW_STALE_INDEX=1, cross/README.md)
set -euo pipefail
cd "$(dirname "$0")/.."

timed() {
    local name=$1 t0=$SECONDS
    shift
    "$@"
    echo "== cross-smoke $name: $((SECONDS - t0))s"
}
fail() {
    echo "cross-smoke: FAIL: $*" >&2
    exit 1
}

# jq and curl for the end-to-end part (cross/build.sh installs the rest).
need=()
command -v jq >/dev/null 2>&1 || need+=(jq)
command -v curl >/dev/null 2>&1 || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get -o Acquire::Retries=3 update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::Retries=3 install -y -qq \
        --no-install-recommends "${need[@]}"
fi

case "${1:-aarch64}" in
    aarch64) QEMU=(qemu-aarch64-static -L /usr/aarch64-linux-gnu)
        ELF="ELF 64-bit*ARM aarch64" DEB_ARCH=arm64 ;;
    armv7) QEMU=(qemu-arm-static -L /usr/arm-linux-gnueabihf)
        ELF="ELF 32-bit*ARM, EABI5" DEB_ARCH=armhf ;;
    *) echo "usage: .ci/cross-smoke.sh [aarch64|armv7]" >&2; exit 2 ;;
esac
TARGET=${1:-aarch64}
VERSION=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)

build() {
    BIN=$(bash cross/build.sh "$TARGET" --profile ci-cross | tail -1)
    [ -x "$BIN" ] || fail "cross/build.sh printed no binary ($BIN)"
    local desc
    desc=$(file -b "$BIN")
    echo "file: $desc"
    case "$desc" in
        *$ELF*) ;;
        *) fail "not a $TARGET ELF ($ELF): $desc" ;;
    esac
    echo "size: $(stat -c %s "$BIN") bytes (ci-cross profile, stripped)"
}

basics() {
    local v
    v=$("${QEMU[@]}" "$BIN" --version)
    [ "$v" = "sluice $VERSION" ] || fail "--version printed '$v', want 'sluice $VERSION'"
    echo "qemu: $v"
    "${QEMU[@]}" "$BIN" --config configs/dev.toml check-config >/dev/null ||
        fail "check-config configs/dev.toml failed under qemu"
    echo "qemu: check-config configs/dev.toml ok"
}

DAEMON=""
TMP=""
cleanup() {
    if [ -n "$DAEMON" ]; then
        kill -KILL "$DAEMON" 2>/dev/null || true
        wait "$DAEMON" 2>/dev/null || true
    fi
    [ -z "$TMP" ] || rm -rf "$TMP"
}
trap cleanup EXIT

e2e() {
    TMP=$(mktemp -d)
    local cfg="$TMP/sluice.toml"
    cat >"$cfg" <<EOF
[gateway]
id = "gw-qemu"
state_dir = "$TMP/state"

[listeners.http]
bind = "127.0.0.1:0"

[admin]
socket = "$TMP/admin.sock"
EOF
    local sl=("${QEMU[@]}" "$BIN" --config "$cfg")
    local token
    token=$("${sl[@]}" devices add probe-1 --type sensor)
    [ -n "$token" ] || fail "devices add printed no token"

    SLUICE_LOG=info "${sl[@]}" run 2>"$TMP/sluice.log" &
    DAEMON=$!
    local addr="" deadline=$((SECONDS + 60))
    while [ -z "$addr" ]; do
        [ $SECONDS -lt $deadline ] || { cat "$TMP/sluice.log" >&2; fail "daemon not up within 60 s"; }
        kill -0 "$DAEMON" 2>/dev/null || { cat "$TMP/sluice.log" >&2; fail "daemon exited"; }
        addr=$("${sl[@]}" status --json 2>/dev/null | jq -r '.listeners.http // empty' || true)
        [ -n "$addr" ] || sleep 0.2
    done
    echo "qemu: daemon up, HTTP on $addr"

    local code
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 20 \
        -d '{"temperature":21.5,"humidity":40}' "http://$addr/api/v1/$token/telemetry")
    [ "$code" = 200 ] || { cat "$TMP/sluice.log" >&2; fail "POST telemetry answered $code"; }
    echo "qemu: POST telemetry -> $code"

    kill -TERM "$DAEMON"
    local rc=0
    wait "$DAEMON" || rc=$?
    DAEMON=""
    [ "$rc" = 0 ] || { cat "$TMP/sluice.log" >&2; fail "daemon exited $rc after SIGTERM"; }
    echo "qemu: daemon stopped cleanly on SIGTERM"

    local stats records
    stats=$("${sl[@]}" queue stats --json)
    records=$(jq -r '.records' <<<"$stats")
    [ "$records" = 1 ] || fail "queue stats shows $records records, want 1: $stats"
    echo "qemu: queue stats --json: records=1"
}

deb() {
    local pkg
    pkg=$(bash packaging/deb/build.sh --bin "$BIN" --out "$TMP/deb" | tail -1)
    [ "$(basename "$pkg")" = "sluice_${VERSION}_$DEB_ARCH.deb" ] || fail "unexpected package name $pkg"
    [ "$(dpkg-deb -f "$pkg" Architecture)" = "$DEB_ARCH" ] || fail "Architecture is not $DEB_ARCH"
    local contents
    contents=$(dpkg-deb -c "$pkg")
    grep -q ' \./usr/bin/sluice$' <<<"$contents" || fail "usr/bin/sluice missing from $pkg"
    grep -q ' \./etc/sluice/sluice\.toml$' <<<"$contents" || fail "etc/sluice/sluice.toml missing from $pkg"
    echo "deb: $(basename "$pkg"), $(stat -c %s "$pkg") bytes"
}

timed build build
timed basics basics
timed e2e e2e
timed deb deb
echo "cross-smoke: OK"
