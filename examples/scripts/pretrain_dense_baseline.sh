#!/usr/bin/env bash
# The dense baseline: the same script, model, data and seed as pretrain_1gpu.sh with DSV off.
set -euo pipefail
exec "$(dirname "$0")/pretrain_1gpu.sh" --dsv-mode dense "$@"
