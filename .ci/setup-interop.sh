#!/usr/bin/env bash
# Sets up the Python virtualenv used by the QUIC "perf" interop peers in
# tests/interop/ (perf_client.py, perf_server.py), which are built on aioquic.
#
# Usage: .ci/setup-interop.sh
#   INTEROP_VENV   where to put the venv   (default: <repo>/target/interop-venv)
#   INTEROP_PYTHON interpreter to build it (default: python3)
#
# Idempotent: an existing venv that already has the pinned aioquic is reused
# without touching the network. The last line on stdout is the venv's python
# path, so callers can do: PY=$(.ci/setup-interop.sh | tail -n1)
# Everything else (pip, apt chatter) goes to stderr.
set -euo pipefail

# Pinned so interop results are reproducible; 1.7.2 ships abi3 wheels that
# install on CPython 3.11 without a C toolchain (as do its deps, e.g. pylsqpack).
AIOQUIC_VERSION=1.7.2
# The independent DNS-over-QUIC client (its DoQ support runs on aioquic).
DNSPYTHON_VERSION=2.7.0

die() { echo "setup-interop: error: $*" >&2; exit 1; }
log() { echo "setup-interop: $*" >&2; }

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${INTEROP_VENV:-$repo_root/target/interop-venv}
python=${INTEROP_PYTHON:-python3}
vpy=$venv/bin/python

command -v "$python" >/dev/null 2>&1 || die "'$python' not found; install Python >= 3.11"
# aioquic 1.7.x declares Requires-Python >= 3.11; say so instead of a pip resolver error.
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$("$python" -V 2>&1) is too old; aioquic $AIOQUIC_VERSION needs Python >= 3.11"

# Fast path: venv already complete.
if [[ -x $vpy ]] && "$vpy" - "$AIOQUIC_VERSION" "$DNSPYTHON_VERSION" >/dev/null 2>&1 <<'EOF'
import sys
from importlib.metadata import version
sys.exit(0 if version("aioquic") == sys.argv[1] and version("dnspython") == sys.argv[2] else 1)
EOF
then
    log "reusing $venv (aioquic $AIOQUIC_VERSION)"
    echo "$vpy"
    exit 0
fi

# Debian/Ubuntu split venv+ensurepip into python3-venv; without it
# `python3 -m venv` fails (or leaves a venv without pip).
if ! "$python" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        log "python venv/ensurepip missing; installing python3-venv via apt-get"
        { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv; } >&2 \
            || die "apt-get install python3-venv failed"
    else
        die "'$python -m venv' is unavailable; install python3-venv (needs root)"
    fi
    "$python" -c 'import venv, ensurepip' >/dev/null 2>&1 \
        || die "'$python' still lacks venv/ensurepip after installing python3-venv"
fi

# A half-made venv (e.g. interrupted earlier run) lacks bin/python; recreate it.
if [[ ! -x $vpy ]]; then
    log "creating venv at $venv"
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv" >&2 || die "'$python -m venv $venv' failed"
fi

log "installing aioquic==$AIOQUIC_VERSION"
# --only-binary: never fall back to compiling C extensions (no toolchain in CI).
"$vpy" -m pip install --disable-pip-version-check --quiet --only-binary=:all: \
    "aioquic==$AIOQUIC_VERSION" "dnspython==$DNSPYTHON_VERSION" >&2 \
    || die "pip install aioquic==$AIOQUIC_VERSION dnspython==$DNSPYTHON_VERSION failed (PyPI reachable? wheels for $("$vpy" -V 2>&1)?)"

"$vpy" -c 'import aioquic.asyncio' >/dev/null 2>&1 || die "aioquic installed but does not import"
log "ready: $("$vpy" -V 2>&1), aioquic $AIOQUIC_VERSION"
echo "$vpy"
