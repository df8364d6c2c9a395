#!/usr/bin/env bash
# vpcie setup: system packages, the Python venv, the cffi module, the guest image.
#
# Run as root on Debian 12 (bookworm) or 13 (trixie):   bash scripts/setup.sh
# Idempotent: a second run checks versions and stamps and finishes in seconds.
#
# Environment knobs (all optional):
#   VPCIE_SKIP_APT=1     never touch apt (packages were installed some other way)
#   VPCIE_FORCE_APT=1    do the apt work even when everything looks installed
#   VPCIE_SKIP_IMAGE=1   do not run images/build.sh
#   VPCIE_SETUP_LOG=PATH where apt/pip/build output goes (default: a file in /tmp)
#
# Why backports on bookworm: bookworm's QEMU 7.2 refuses vhost-user-gpu without
# KVM, and KVM cannot run guests on our machines; QEMU 10 and libvirt 11 come
# from bookworm-backports (docs/INSTALL.md, docs/TROUBLESHOOTING.md).
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
export LC_ALL=C.UTF-8

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

VENV="$REPO/.venv"
PY_STAMP="$VENV/.vpcie-pip-stamp"
NATIVE_STAMP="$VENV/.vpcie-native-stamp"
REPO_TAG="$(printf '%s' "$REPO" | sha256sum | cut -c1-12)"
LOG="${VPCIE_SETUP_LOG:-${TMPDIR:-/tmp}/vpcie-setup.$REPO_TAG.log}"

STEP="start"
CREATED_POLICY_RC=0
REPORTED=0
T0=$SECONDS

# One line saying which step failed, whatever failed (set -e exits through here).
on_exit() {
    local rc=$?
    if [[ $CREATED_POLICY_RC == 1 ]]; then
        rm -f /usr/sbin/policy-rc.d
    fi
    if [[ $rc != 0 && $REPORTED == 0 ]]; then
        echo "setup.sh: FAILED in step '$STEP' (exit $rc); details in $LOG" >&2
    fi
}
trap on_exit EXIT

say() { printf 'setup.sh: %s\n' "$*"; }
die() {
    echo "setup.sh: FAILED in step '$STEP': $*" >&2
    REPORTED=1
    exit 1
}

# Several shells may run the README's commands at once: one setup at a time
# per checkout (concurrent apt or pip runs into one venv would collide).
LOCK="${TMPDIR:-/tmp}/vpcie-setup.$REPO_TAG.lock"
exec 9>"$LOCK"
STEP="take $LOCK"
flock -w 1200 9 || die "another scripts/setup.sh has held $LOCK for 20 minutes"
STEP="open log $LOG"
: >"$LOG"

# Packages from the "new enough" suite: backports on bookworm, main on trixie.
VIRT_PKGS=(qemu-system-x86 qemu-system-gui qemu-utils
           libvirt-daemon-system libvirt-clients libvirt-dev)
# Packages from the release's main suite.
BASE_PKGS=(etcd-server pkg-config gcc python3-venv python3-dev busybox-static
           nftables iproute2 cpio gzip libffi-dev openssl ca-certificates)
QEMU_MIN_MAJOR=10
LIBVIRT_MIN_MAJOR=11

# Run a noisy command with its output in $LOG; on failure show the tail.
quiet() {
    local rc=0
    "$@" >>"$LOG" 2>&1 || rc=$?
    if [[ $rc != 0 ]]; then
        tail -n 25 "$LOG" >&2 || true
    fi
    return "$rc"
}

# ---------------------------------------------------------------- os-release
STEP="read /etc/os-release"
[[ -r /etc/os-release ]] || die "/etc/os-release not found: only Debian 12/13 are supported"
OS_ID="$(. /etc/os-release && echo "${ID:-}")"
CODENAME="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"

# ---------------------------------------------------------------- apt checks
pkg_installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" == installed ]]
}

qemu_major() {
    local v
    v="$( (qemu-system-x86_64 --version 2>/dev/null || true) \
          | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p' | head -n1)"
    echo "${v:-0}"
}

libvirt_major() {
    local v
    v="$(dpkg-query -W -f='${Version}' libvirt-daemon-system 2>/dev/null || true)"
    v="${v#*:}"          # drop an epoch
    echo "${v%%.*}" | grep -E '^[0-9]+$' || echo 0
}

# Prints the reason apt work is needed, or nothing when all is in place.
apt_needed() {
    local p
    for p in "${VIRT_PKGS[@]}" "${BASE_PKGS[@]}"; do
        pkg_installed "$p" || { echo "package $p missing"; return; }
    done
    (( $(qemu_major) >= QEMU_MIN_MAJOR )) || { echo "QEMU older than $QEMU_MIN_MAJOR"; return; }
    (( $(libvirt_major) >= LIBVIRT_MIN_MAJOR )) || { echo "libvirt older than $LIBVIRT_MIN_MAJOR"; return; }
}

# Add bookworm-backports to apt's sources unless some enabled source has it.
ensure_backports_source() {
    local f=/etc/apt/sources.list.d/debian.sources
    if grep -qsE '^[^#]*\bbookworm-backports\b' /etc/apt/sources.list \
        /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; then
        return
    fi
    # Prefer editing the first stanza's "Suites: bookworm ..." line of debian.sources.
    if [[ -f $f ]] && grep -qE '^Suites:.*(^|[[:space:]])bookworm([[:space:]]|$)' "$f"; then
        cp -p "$f" "$f.vpcie-bak"
        awk '!done && /^Suites:/ && $0 ~ /[[:space:]]bookworm([[:space:]]|$)/ {
                 print $0 " bookworm-backports"; done = 1; next }
             { print }' "$f.vpcie-bak" >"$f"
        say "added bookworm-backports to $f (backup: $f.vpcie-bak)"
    else
        cat >/etc/apt/sources.list.d/backports.sources <<'EOF'
# Added by vpcie scripts/setup.sh: QEMU 10 and libvirt 11 for bookworm.
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
        say "created /etc/apt/sources.list.d/backports.sources"
    fi
}

APT_OPTS=(-y -q -o DPkg::Lock::Timeout=600
          -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)

install_packages() {
    local virt_target=()
    case "$OS_ID:$CODENAME" in
        debian:bookworm) virt_target=(-t bookworm-backports) ;;
        debian:trixie)   virt_target=() ;;
        *) die "unsupported system '$OS_ID $CODENAME': need Debian 12 (bookworm) or 13 (trixie); set VPCIE_SKIP_APT=1 if QEMU>=$QEMU_MIN_MAJOR, libvirt>=$LIBVIRT_MIN_MAJOR and the packages in docs/INSTALL.md are installed" ;;
    esac
    [[ $(id -u) == 0 ]] || die "apt work needed but not root: run 'sudo bash scripts/setup.sh'"

    if [[ $CODENAME == bookworm ]]; then
        STEP="apt sources: bookworm-backports"
        ensure_backports_source
    fi

    # No systemd here: keep package scripts from starting libvirtd/etcd/virtlogd
    # (tests start them as plain processes). An existing policy-rc.d is kept.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\n# vpcie setup.sh: no service starts during install\nexit 101\n' \
            >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        CREATED_POLICY_RC=1
    fi

    STEP="apt-get update"
    say "apt-get update"
    quiet apt-get -q -o DPkg::Lock::Timeout=600 update

    STEP="apt-get install (base packages)"
    say "apt-get install ${BASE_PKGS[*]}"
    # --no-upgrade: leave already-installed base packages at their versions.
    quiet apt-get install "${APT_OPTS[@]}" --no-upgrade "${BASE_PKGS[@]}"

    STEP="apt-get install (QEMU/libvirt${virt_target[*]:+ from ${virt_target[1]}})"
    say "apt-get install ${virt_target[*]} ${VIRT_PKGS[*]}"
    quiet apt-get install "${APT_OPTS[@]}" "${virt_target[@]}" "${VIRT_PKGS[@]}"

    if [[ $CREATED_POLICY_RC == 1 ]]; then
        rm -f /usr/sbin/policy-rc.d
        CREATED_POLICY_RC=0
    fi

    STEP="check installed versions"
    local why
    why="$(apt_needed)"
    [[ -z $why ]] || die "after apt-get install: $why"
}

STEP="check system packages"
if [[ ${VPCIE_SKIP_APT:-0} == 1 ]]; then
    say "VPCIE_SKIP_APT=1: not touching apt"
else
    WHY="$(apt_needed)"
    if [[ ${VPCIE_FORCE_APT:-0} == 1 ]]; then
        WHY="${WHY:-VPCIE_FORCE_APT=1}"
    fi
    if [[ -n $WHY ]]; then
        say "system packages: $WHY -> installing (log: $LOG)"
        install_packages
    else
        say "system packages: up to date"
    fi
fi

# ---------------------------------------------------------------- venv
# Debian's interpreter, not pyenv's: python3-dev headers and libvirt-dev match it.
STEP="python venv"
SYS_PY=/usr/bin/python3
[[ -x $SYS_PY ]] || die "$SYS_PY missing (install python3-venv python3-dev)"
if [[ -x $VENV/bin/python ]] && grep -qE '^home = /usr/bin$' "$VENV/pyvenv.cfg" 2>/dev/null \
    && "$VENV/bin/python" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
    :
else
    if [[ -e $VENV ]]; then
        say "replacing $VENV (not a working venv of $SYS_PY)"
        rm -rf "$VENV"
    fi
    say "creating $VENV with $SYS_PY"
    quiet "$SYS_PY" -m venv "$VENV"
    rm -f "$PY_STAMP" "$NATIVE_STAMP"
fi

STEP="pip install -e .[test,libvirt,etcd]"
# The stamp covers what decides the install: pyproject.toml and the interpreter.
PY_HASH="$( { cat pyproject.toml; "$VENV/bin/python" -VV; } | sha256sum | cut -d' ' -f1)"
if [[ -f $PY_STAMP && "$(cat "$PY_STAMP")" == "$PY_HASH" && -x $VENV/bin/vpcie ]]; then
    say "python packages: up to date"
else
    say "pip install -e '.[test,libvirt,etcd]' (log: $LOG)"
    quiet "$VENV/bin/python" -m pip install --disable-pip-version-check -q -e '.[test,libvirt,etcd]'
    echo "$PY_HASH" >"$PY_STAMP"
fi

# ---------------------------------------------------------------- cffi module
STEP="build cffi module (vpcie._native._build)"
if [[ -f vpcie/_native/_build.py ]]; then
    NATIVE_HASH="$( { "$VENV/bin/python" -VV
                      find vpcie/_native -maxdepth 1 -type f \
                          \( -name '_build.py' -o -name '*.h' -o -name '*.c' \) \
                          ! -name '_vq_native.c' -print0 | sort -z | xargs -0 -r cat; } \
                    | sha256sum | cut -d' ' -f1)"
    if [[ -f $NATIVE_STAMP && "$(cat "$NATIVE_STAMP")" == "$NATIVE_HASH" ]] \
        && compgen -G 'vpcie/_native/*.so' >/dev/null; then
        say "cffi module: up to date"
    else
        say "building cffi module"
        quiet "$VENV/bin/python" -m vpcie._native._build
        echo "$NATIVE_HASH" >"$NATIVE_STAMP"
    fi
else
    say "cffi module: vpcie/_native/_build.py not present yet, skipped"
fi

# ---------------------------------------------------------------- guest image
# HOOK: guest image. images/build.sh (owned by the image work) fetches the guest
# kernel .deb with `apt-get download` + `dpkg-deb -x` into images/build/ and
# builds the initramfs into images/out/. The guest kernel is NEVER installed
# into the host (no linux-image-amd64 here). build.sh must be idempotent itself.
STEP="guest image (images/build.sh)"
if [[ ${VPCIE_SKIP_IMAGE:-0} == 1 ]]; then
    say "guest image: VPCIE_SKIP_IMAGE=1, skipped"
elif [[ -f images/build.sh ]]; then
    say "guest image: running images/build.sh"
    VPCIE_PYTHON="$VENV/bin/python" bash images/build.sh
else
    say "guest image: images/build.sh not present yet, skipped"
fi

# ---------------------------------------------------------------- summary
STEP="summary"
qemu_v="$(qemu-system-x86_64 --version 2>/dev/null | head -n1 | sed 's/^QEMU emulator version //' || true)"
libvirt_v="$(dpkg-query -W -f='${Version}' libvirt-daemon-system 2>/dev/null || true)"
etcd_v="$( (etcd --version 2>/dev/null || true) | sed -n 's/^etcd Version: //p' | head -n1)"
py_v="$("$VENV/bin/python" -c 'import platform; print(platform.python_version())')"
say "done in $((SECONDS - T0)) s: QEMU ${qemu_v:-none}; libvirt ${libvirt_v:-none}; etcd ${etcd_v:-none}; Python $py_v in .venv"
