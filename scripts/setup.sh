#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine where we are root.
#
#   1. Debian packages the tests and the demo need (skipped when all present).
#   2. .venv at the repo root (system site packages, so python3-libnbd is visible).
#   3. The package, editable, with its test extras (skipped when pyproject.toml
#      has not changed since the last successful install).
#
# Quiet on success; on failure the captured output of the failing step is shown.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

APT_PACKAGES=(
    thin-provisioning-tools
    fuse3
    qemu-utils
    libnbd-bin
    python3-libnbd
    nbdkit
    fio
    e2fsprogs
    xfsprogs
    busybox-static
    openssl
    python3-venv
    python3-pip
)

log() { printf 'setup: %s\n' "$*" >&2; }

# Run a command with its output captured; show the output only if it fails.
quiet() {
    local out rc=0
    out="$(mktemp)"
    "$@" >"$out" 2>&1 || rc=$?
    if [ "$rc" -ne 0 ]; then
        log "FAILED (exit $rc): $*"
        cat "$out" >&2
    fi
    rm -f "$out"
    return "$rc"
}

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    # dpkg -s succeeds for removed-but-not-purged packages too; check the status line.
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        log "missing Debian packages (need root to install): ${missing[*]}"
        exit 1
    fi
    log "installing Debian packages: ${missing[*]}"
    quiet apt-get update
    quiet env DEBIAN_FRONTEND=noninteractive apt-get install -y "${APT_PACKAGES[@]}"
fi

if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    quiet /usr/bin/python3 -m venv --system-site-packages .venv
fi

# Reinstall only when pyproject.toml changed (or the package is not importable).
stamp=.venv/.devmapper-setup-stamp
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
have="$(cat "$stamp" 2>/dev/null || true)"
if [ "$want" != "$have" ] || ! .venv/bin/python -c 'import devmapper' >/dev/null 2>&1; then
    log "installing devmapper (editable) with test extras"
    quiet .venv/bin/pip install --disable-pip-version-check -q -e '.[test]'
    printf '%s\n' "$want" >"$stamp"
fi
