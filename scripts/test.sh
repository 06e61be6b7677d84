#!/usr/bin/env bash
# Runs every check of the repository: formatting, clippy and the whole test suite.
#
# Made for a fresh Debian machine where it runs as root and only the package registries are
# reachable: it installs what is missing (Debian packages, the npm and PyPI packages of
# tests/interop) and skips what is already there, so a second run starts testing at once.
# Each integration test starts its own node on port 0, so the tests may run in parallel.
set -euo pipefail

cd "$(dirname "$0")/.."

# Upper bound for the whole `cargo test` run, so a hung test cannot hold CI until its own limit.
TEST_TIMEOUT="${NEXUS_TEST_TIMEOUT:-45m}"

log() {
    printf '==> %s\n' "$*"
}

apt_updated=0
apt_install() {
    if [ "$apt_updated" = 0 ]; then
        log "apt-get update"
        apt-get update -qq
        apt_updated=1
    fi
    log "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

install_system_packages() {
    local missing=()
    # The cluster tests start their own redis-server.
    command -v redis-server >/dev/null || missing+=(redis-server)
    # The compose test validates docker-compose.yml with `docker-compose config` (no engine needed).
    command -v docker-compose >/dev/null || missing+=(docker-compose)
    command -v node >/dev/null || missing+=(nodejs)
    command -v npm >/dev/null || missing+=(npm)
    command -v python3 >/dev/null || missing+=(python3)
    python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
    if [ "${#missing[@]}" -gt 0 ]; then
        apt_install "${missing[@]}"
    fi
}

# npm ci recreates node_modules, so it runs only when the lock file changed since the last run.
install_npm_packages() {
    local dir=tests/interop
    local stamp="$dir/node_modules/.package-lock.json"
    if [ -f "$stamp" ] && [ "$stamp" -nt "$dir/package-lock.json" ]; then
        return
    fi
    log "npm ci in $dir"
    (cd "$dir" && npm ci --no-audit --no-fund)
}

install_python_packages() {
    local requirements=tests/interop/requirements.txt
    local wanted
    wanted="$(sed -n 's/^websockets==//p' "$requirements")"
    if python3 -c "import sys, websockets; sys.exit(websockets.__version__ != '$wanted')" \
        2>/dev/null; then
        return
    fi
    local flags=(--disable-pip-version-check --root-user-action=ignore -q)
    # Debian's own Python rejects pip installs without this flag (PEP 668).
    if python3 -c 'import sys, sysconfig, os; sys.exit(not os.path.exists(
            os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'; then
        flags+=(--break-system-packages)
    fi
    log "pip install -r $requirements"
    python3 -m pip install "${flags[@]}" -r "$requirements"
}

# rustfmt and clippy come with the toolchain (rustup components); no registry here serves them.
check_rust_components() {
    local component
    for component in fmt clippy; do
        if ! cargo "$component" --version >/dev/null 2>&1; then
            echo "cargo $component is missing: install the toolchain component" >&2
            exit 1
        fi
    done
}

check_rust_components
install_system_packages
install_npm_packages
install_python_packages

log "cargo fmt --check"
cargo fmt --all --check

log "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

log "cargo test --workspace --no-fail-fast"
timeout --kill-after=30s "$TEST_TIMEOUT" cargo test --workspace --no-fail-fast
