#!/usr/bin/env bash
# The whole test suite, from a fresh Debian/Ubuntu machine with a Rust
# toolchain: installs the real peers the end-to-end tests use when they are
# missing, then runs the format check, clippy with -D warnings, and every test.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null 2>&1 || need+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
command -v mosquitto_passwd >/dev/null 2>&1 || need+=(mosquitto)
command -v coap-client-notls >/dev/null 2>&1 || need+=(libcoap3-bin)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v curl >/dev/null 2>&1 || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing test peers: ${need[*]}"
  $sudo apt-get -o Acquire::Retries=3 update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get -o Acquire::Retries=3 install -y -qq --no-install-recommends "${need[@]}"
fi

# paho-mqtt (PyPI) drives the ThingsBoard-style MQTT 5 session test.
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import paho.mqtt' >/dev/null 2>&1; then
  echo "installing paho-mqtt"
  python3 -m pip install --quiet 'paho-mqtt==2.2.0' || echo "warning: paho-mqtt not installed; its test will say SKIPPED"
fi
# The ThingsBoard device SDK drives the device-API end-to-end test; it
# imports mmh3 (and would pip-install it itself at import time otherwise).
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import tb_device_mqtt' >/dev/null 2>&1; then
  echo "installing tb-mqtt-client"
  python3 -m pip install --quiet 'tb-mqtt-client==1.13.14' 'mmh3' || echo "warning: tb-mqtt-client not installed; its test will say SKIPPED"
fi
# aiocoap (PyPI) drives the CoAP device test (telemetry, Block2 firmware,
# Observe through the library API).
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import aiocoap' >/dev/null 2>&1; then
  echo "installing aiocoap"
  python3 -m pip install --quiet 'aiocoap==0.4.17' || echo "warning: aiocoap not installed; its test will say SKIPPED"
fi
# prometheus_client (PyPI) is the reference parser the /metrics test reads
# the exposition with.
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import prometheus_client' >/dev/null 2>&1; then
  echo "installing prometheus-client"
  python3 -m pip install --quiet 'prometheus-client==0.26.0' || echo "warning: prometheus-client not installed; its test will say SKIPPED"
fi

rustc -V
cargo -V
# Each step says how long it took (CI keeps a 30-minute budget).
timed() {
  local t=$SECONDS
  "$@"
  echo "== $1 $2: $((SECONDS - t))s"
}
timed cargo fmt --all -- --check
timed cargo clippy --workspace --all-targets -- -D warnings
timed cargo test --workspace
