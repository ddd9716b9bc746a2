#!/usr/bin/env bash
# Kept for existing instructions: the same as `cross/build.sh aarch64`
# (see cross/README.md). Extra arguments (e.g. --profile ci-cross) are
# passed on; SKIP_APT=1 still skips apt-get.
exec "$(dirname "$0")/build.sh" aarch64 "$@"
