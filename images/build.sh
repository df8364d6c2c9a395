#!/usr/bin/env bash
# vpcie guest image: a Debian 6.12 kernel plus a small initramfs (busybox,
# the host's Python, construct, guest_tools and the protocol part of vpcie).
#
#   VPCIE_PYTHON=.venv/bin/python bash images/build.sh     (scripts/setup.sh does this)
#
# Output:  images/out/vmlinuz, images/out/initramfs.gz (gzip'd newc cpio)
# Scratch: images/build/ (kernel .deb, unpacked kernel, staging tree)
#
# Boot it (TCG):
#   qemu-system-x86_64 -accel tcg -cpu max -smp 1 -m 512M \
#     -object memory-backend-memfd,id=mem,size=512M,share=on \
#     -machine q35,memory-backend=mem -nodefaults -no-reboot -display none \
#     -serial stdio -kernel images/out/vmlinuz -initrd images/out/initramfs.gz \
#     -append 'console=ttyS0 panic=-1 rdinit=/init quiet [vpcie.run=/opt/vpcie/guest_tools/demo.py] [vpcie.args=a,b]'
# The guest prints "vpcie-guest: exit N" (N = the program's exit status) and powers off.
#
# Idempotent: images/out/.stamp holds a hash of everything the image is made
# from (this script, which includes /init, the guest files, construct, the
# interpreter, busybox and the kernel package version); when it matches, the
# script does nothing.
#
# Knobs (optional):
#   VPCIE_PYTHON          interpreter whose site-packages has `construct`
#                         (default: .venv/bin/python, else /usr/bin/python3)
#   VPCIE_GUEST_KERNEL    kernel package to use instead of the newest 6.12 one,
#                         as NAME or NAME=VERSION
#   VPCIE_IMAGE_FORCE=1   rebuild even when the stamp matches
set -euo pipefail
export LC_ALL=C.UTF-8

IMAGES="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$IMAGES/.." && pwd)"
BUILD="$IMAGES/build"
OUT="$IMAGES/out"
STAMP="$OUT/.stamp"
SYS_PY=/usr/bin/python3      # Debian's interpreter (not pyenv's, not the venv's)

say() { printf 'build.sh: %s\n' "$*"; }
die() { printf 'build.sh: ERROR: %s\n' "$*" >&2; exit 1; }
# Anything else that fails (set -e) says where, instead of exiting silently.
trap 'printf "build.sh: ERROR: line %s: \"%s\" failed\n" "$LINENO" "$BASH_COMMAND" >&2' ERR

# The modules /init loads (in this order, after their dependencies), and their
# parameters. virtio_pci is built into Debian's kernel. fbdev_emulation=0: the
# console must not grab the GPU as a framebuffer.
GUEST_MODULES=(drm drm_kms_helper drm_shmem_helper virtio_dma_buf virtio_gpu)
declare -A MODULE_PARAMS=([drm_kms_helper]="fbdev_emulation=0")

# Parts of this repository copied into the guest (under /opt/vpcie).
REPO_GUEST_PATHS=(guest_tools vpcie/__init__.py vpcie/errors.py vpcie/protocol)

# Standard library parts a small guest program does not need (size, boot time):
# tests, GUI, packaging, databases, and the mail/web/XML stacks.
STDLIB_DROP_DIRS=(test idlelib tkinter turtledemo ensurepip lib2to3 pydoc_data
                  distutils unittest sqlite3 asyncio curses dbm venv
                  email http xml xmlrpc wsgiref html multiprocessing
                  config-*-linux-gnu site-packages dist-packages)
STDLIB_DROP_FILES=(turtle.py pydoc.py doctest.py _pydecimal.py sitecustomize.py
                   EXTERNALLY-MANAGED LICENSE.txt)
# Extension modules left out (lib-dynload): test modules, and modules whose
# libraries are big (_ssl/_hashlib: OpenSSL, ~4.5 MB; hashlib and hmac fall
# back to CPython's own sha256/blake2/... implementations) or of no use here
# (bz2/lzma/uuid: their libraries; uuid.py works without _uuid).
DYNLOAD_DROP_RE='^(_test|_ctypes_test|xxlimited|_xx|_sqlite3|_curses|_dbm|_gdbm|readline|nis|ossaudiodev|_tkinter|_ssl|_hashlib|_asyncio|_crypt|audioop|_lsprof|_bz2|_lzma|_uuid|_codecs_(cn|hk|iso2022|jp|kr|tw)\.|_multibytecodec)'

# ---------------------------------------------------------------- checks
[[ -r /etc/os-release ]] || die "/etc/os-release not found: only Debian 12 (bookworm) and 13 (trixie) are supported"
# shellcheck disable=SC1091
CODENAME="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
case "$CODENAME" in
    bookworm) DEB_TAG=deb12 ;;
    trixie)   DEB_TAG=deb13 ;;
    *) die "unsupported system '$CODENAME': need Debian 12 (bookworm) or 13 (trixie)" ;;
esac

for tool in apt-cache apt-get dpkg dpkg-deb cpio gzip ldd sha256sum flock; do
    command -v "$tool" >/dev/null || die "'$tool' not found (scripts/setup.sh installs what this needs)"
done
BUSYBOX="$(command -v busybox || true)"
[[ -n $BUSYBOX ]] || die "busybox not found: apt-get install busybox-static"
[[ -x $SYS_PY ]] || die "$SYS_PY not found: apt-get install python3"
# Modules are .ko.xz in the .deb; busybox insmod needs them plain. Prefer xz,
# else busybox's own unxz (busybox-static is installed by setup.sh anyway).
if command -v xz >/dev/null; then UNXZ=(xz -dc); else UNXZ=("$BUSYBOX" xz -dc); fi

if [[ -z ${VPCIE_PYTHON:-} ]]; then
    if [[ -x $REPO/.venv/bin/python ]]; then VPCIE_PYTHON="$REPO/.venv/bin/python"; else VPCIE_PYTHON="$SYS_PY"; fi
fi
CONSTRUCT_DIR="$("$VPCIE_PYTHON" -c 'import construct, os; print(os.path.dirname(construct.__file__))' 2>/dev/null)" \
    || die "'$VPCIE_PYTHON' cannot import construct (set VPCIE_PYTHON to the venv's python; run scripts/setup.sh)"

for p in "${REPO_GUEST_PATHS[@]}"; do
    [[ -e $REPO/$p ]] || die "$REPO/$p is missing"
done

PY_REAL="$(readlink -f "$SYS_PY")"                                       # /usr/bin/python3.11
PY_VER="$("$SYS_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"   # 3.11
PY_STDLIB="/usr/lib/python$PY_VER"
[[ -f $PY_STDLIB/os.py ]] || die "$PY_STDLIB/os.py not found (Python standard library missing?)"

mkdir -p "$BUILD" "$OUT"
# One build at a time per checkout.
exec 8>"$BUILD/.lock"
flock -w 900 8 || die "another images/build.sh has held $BUILD/.lock for 15 minutes"

# ---------------------------------------------------------------- kernel choice
# Newest Debian 6.12 amd64 kernel known to apt: bookworm-backports or
# bookworm-security on Debian 12, the main suite on 13. Not rt, not cloud
# (cloud has no DRM). Signed and -unsigned packages hold the same kernel.
# Prints "NAME VERSION".
pick_kernel() {
    local re="^linux-image-6\\.12\\.[0-9.]+\\+${DEB_TAG}-amd64(-unsigned)?\$"
    local names name ver patch unsigned
    local best_name="" best_ver="" best_patch=-1 best_unsigned=0
    names="$(apt-cache pkgnames linux-image-6.12. 2>/dev/null | grep -E "$re" || true)"
    [[ -n $names ]] || return 0
    # apt-cache madison lists only versions that can actually be downloaded.
    # shellcheck disable=SC2086
    while IFS='|' read -r name ver _; do
        name="${name//[[:space:]]/}"; ver="${ver//[[:space:]]/}"
        [[ $name =~ $re && -n $ver ]] || continue           # e.g. deb-src lines
        patch="${name#linux-image-6.12.}"; patch="${patch%%+*}"; patch="${patch%%.*}"
        [[ $name == *-unsigned ]] && unsigned=1 || unsigned=0
        if (( patch > best_patch )) \
            || { (( patch == best_patch )) && dpkg --compare-versions "$ver" gt "$best_ver"; } \
            || { (( patch == best_patch )) && [[ $ver == "$best_ver" ]] && (( unsigned > best_unsigned )); }; then
            best_name=$name best_ver=$ver best_patch=$patch best_unsigned=$unsigned
        fi
    done < <(apt-cache madison $names 2>/dev/null)   # $names unquoted: one word each
    [[ -n $best_name ]] && echo "$best_name $best_ver"
    return 0
}

# A kernel chosen by hand: NAME or NAME=VERSION.
pick_given_kernel() {
    local name="${VPCIE_GUEST_KERNEL%%=*}" ver=""
    [[ $VPCIE_GUEST_KERNEL == *=* ]] && ver="${VPCIE_GUEST_KERNEL#*=}"
    if [[ -z $ver ]]; then
        ver="$(apt-cache madison "$name" 2>/dev/null | awk -F'|' '{gsub(/ /,"",$2); print $2}' \
               | sort -V | tail -n1)"
    fi
    [[ -n $ver ]] && echo "$name $ver"
    return 0
}

if [[ -n ${VPCIE_GUEST_KERNEL:-} ]]; then
    KPICK="$(pick_given_kernel)"
    [[ -n $KPICK ]] || die "VPCIE_GUEST_KERNEL=$VPCIE_GUEST_KERNEL: apt knows no such package"
else
    KPICK="$(pick_kernel)"
fi
if [[ -z $KPICK && -f $BUILD/kernel.chosen ]]; then
    # apt's lists are gone (e.g. cleaned), but a kernel was fetched before.
    KPICK="$(cat "$BUILD/kernel.chosen")"
    say "apt knows no 6.12 kernel now; using the one fetched before: $KPICK"
fi
[[ -n $KPICK ]] || die "no Debian 6.12 kernel package (linux-image-6.12.N+$DEB_TAG-amd64[-unsigned]) known to apt; \
on bookworm enable bookworm-backports (scripts/setup.sh does) and run 'apt-get update'"
read -r KPKG KPKG_VER <<<"$KPICK"
KVER="${KPKG#linux-image-}"; KVER="${KVER%-unsigned}"            # 6.12.117+deb12-amd64

# ---------------------------------------------------------------- up to date?
# Hash of every input. Python caches (__pycache__, *.pyc) are not inputs.
hash_tree() {   # paths relative to $1, then their contents
    (cd "$1" && shift && find "$@" -name __pycache__ -prune -o -type f ! -name '*.py[co]' -print0 \
        | LC_ALL=C sort -z | while IFS= read -r -d '' f; do printf '%s\n' "$f"; cat "$f"; done)
}
INPUT_HASH="$( {
    cat "${BASH_SOURCE[0]}"
    echo "kernel $KPKG=$KPKG_VER"
    echo "python $PY_REAL"; "$SYS_PY" -VV; stat -c '%s %Y' "$PY_REAL"
    echo "busybox"; stat -L -c '%s %Y' "$BUSYBOX"
    hash_tree "$REPO" "${REPO_GUEST_PATHS[@]}"
    hash_tree "$(dirname "$CONSTRUCT_DIR")" construct
} | sha256sum | cut -d' ' -f1)"

if [[ ${VPCIE_IMAGE_FORCE:-0} != 1 && -s $OUT/vmlinuz && -s $OUT/initramfs.gz && -f $STAMP ]] \
    && [[ "$(head -n1 "$STAMP")" == "$INPUT_HASH" ]]; then
    say "up to date ($KVER, $(du -k "$OUT/initramfs.gz" | cut -f1) KiB initramfs)"
    exit 0
fi

# ---------------------------------------------------------------- kernel .deb
# Downloaded, never installed: `apt-get download` + `dpkg-deb -x`.
DEBS="$BUILD/debs"
KROOT="$BUILD/kernel/$KVER"         # the unpacked package
mkdir -p "$DEBS"
first_deb() {   # the cached .deb of $KPKG, or nothing
    local f
    for f in "$DEBS/${KPKG}"_*.deb; do [[ -f $f ]] && { echo "$f"; return 0; }; done
    return 0
}
DEB="$(first_deb)"
if [[ -n $DEB ]] && [[ "$(dpkg-deb -f "$DEB" Version 2>/dev/null)" != "$KPKG_VER" ]]; then
    rm -f "$DEB"; DEB=""
fi
if [[ -z $DEB ]]; then
    say "downloading $KPKG=$KPKG_VER"
    APT_DL=(apt-get download -q)
    # As root apt would try to drop to _apt, which cannot write here.
    [[ $(id -u) == 0 ]] && APT_DL+=(-o APT::Sandbox::User=root)
    if ! (cd "$DEBS" && "${APT_DL[@]}" "$KPKG=$KPKG_VER"); then
        [[ $(id -u) == 0 ]] || die "apt-get download $KPKG=$KPKG_VER failed (stale apt lists? run 'apt-get update' as root)"
        say "download failed; running apt-get update and trying again"
        apt-get -q update >/dev/null || die "apt-get update failed"
        (cd "$DEBS" && "${APT_DL[@]}" "$KPKG=$KPKG_VER") \
            || die "apt-get download $KPKG=$KPKG_VER failed"
    fi
    DEB="$(first_deb)"
    [[ -n $DEB ]] || die "apt-get download left no $KPKG .deb in $DEBS"
fi
echo "$KPKG $KPKG_VER" >"$BUILD/kernel.chosen"
# Older kernels (~100 MB each) are not kept.
find "$DEBS" -maxdepth 1 -name '*.deb' ! -name "$(basename "$DEB")" -delete
if [[ -d $BUILD/kernel ]]; then
    find "$BUILD/kernel" -mindepth 1 -maxdepth 1 ! -name "$KVER" -exec rm -rf {} +
fi

if [[ ! -f $KROOT/.unpacked || "$(cat "$KROOT/.unpacked")" != "$KPKG_VER" ]]; then
    say "unpacking $(basename "$DEB")"
    rm -rf "$KROOT"; mkdir -p "$KROOT"
    dpkg-deb -x "$DEB" "$KROOT"
    echo "$KPKG_VER" >"$KROOT/.unpacked"
fi
[[ -f $KROOT/boot/vmlinuz-$KVER ]] || die "$DEB has no boot/vmlinuz-$KVER"
MODDIR="$KROOT/lib/modules/$KVER"
[[ -d $MODDIR ]] || MODDIR="$KROOT/usr/lib/modules/$KVER"     # if Debian ever moves it
[[ -d $MODDIR ]] || die "$DEB has no lib/modules/$KVER"

# ---------------------------------------------------------------- staging tree
STAGE="$BUILD/stage"
rm -rf "$STAGE"
mkdir -p "$STAGE"/{bin,sbin,dev,proc,sys,tmp,run,root,etc,usr/bin,lib/modules,opt/vpcie}
chmod 1777 "$STAGE/tmp"

# --- kernel modules: dependency closure in load order.
# The package has no modules.dep (depmod runs at install); modinfo's
# "depends=" line in each .ko says what it needs. Module names use '_',
# file names may use '-' (virtio-gpu.ko.xz is module virtio_gpu).
declare -A KO_FILE=()
while IFS= read -r -d '' f; do
    b="$(basename "$f")"; b="${b%%.ko*}"; KO_FILE[${b//-/_}]="$f"
done < <(find "$MODDIR/kernel" -name '*.ko' -print0 -o -name '*.ko.xz' -print0 -o -name '*.ko.zst' -print0)
BUILTIN="$(sed -e 's#.*/##' -e 's#\.ko$##' -e 's#-#_#g' "$MODDIR/modules.builtin" 2>/dev/null || true)"

ko_depends() {   # the "depends=" field of a plain .ko
    tr '\0' '\n' <"$1" | sed -n 's/^depends=//p' | head -n1 | tr ',' ' '
}

declare -A KO_DONE=()
LOAD_ORDER=()
add_module() {   # depth-first: dependencies before the module
    local m="${1//-/_}" dep plain
    [[ -z ${KO_DONE[$m]:-} ]] || return 0
    KO_DONE[$m]=1
    if [[ -z ${KO_FILE[$m]:-} ]]; then
        grep -qx "$m" <<<"$BUILTIN" && return 0
        die "module $m: not in $MODDIR (nor built in)"
    fi
    plain="$STAGE/lib/modules/$m.ko"
    case "${KO_FILE[$m]}" in
        *.xz)  "${UNXZ[@]}" "${KO_FILE[$m]}" >"$plain" ;;
        *.zst) command -v zstd >/dev/null || die "${KO_FILE[$m]}: zstd needed"
               zstd -dcq "${KO_FILE[$m]}" >"$plain" ;;
        *)     cp "${KO_FILE[$m]}" "$plain" ;;
    esac
    for dep in $(ko_depends "$plain"); do add_module "$dep"; done
    LOAD_ORDER+=("$m")
}
for m in "${GUEST_MODULES[@]}"; do add_module "$m"; done
# /init reads this: one "FILE PARAMS..." line per module, in load order.
for m in "${LOAD_ORDER[@]}"; do
    echo "$m.ko ${MODULE_PARAMS[$m]:-}"
done >"$STAGE/lib/modules/load.list"
say "kernel $KVER; modules: ${LOAD_ORDER[*]}"

# --- busybox and its applets (relative links, so they work inside the guest).
cp -L "$BUSYBOX" "$STAGE/bin/busybox"
for a in $("$BUSYBOX" --list); do
    [[ $a == busybox || -e $STAGE/bin/$a ]] || ln -s busybox "$STAGE/bin/$a"
done

# --- Python: interpreter, standard library (pruned), shared libraries.
cp -L "$PY_REAL" "$STAGE/usr/bin/$(basename "$PY_REAL")"
ln -sf "$(basename "$PY_REAL")" "$STAGE/usr/bin/python3"
mkdir -p "$STAGE/usr/lib"
cp -a "$PY_STDLIB" "$STAGE/usr/lib/"
GUEST_STDLIB="$STAGE$PY_STDLIB"
for d in "${STDLIB_DROP_DIRS[@]}"; do
    # shellcheck disable=SC2086  # the config-* glob is meant to expand
    rm -rf "${GUEST_STDLIB:?}"/$d
done
for f in "${STDLIB_DROP_FILES[@]}"; do rm -f "$GUEST_STDLIB/$f"; done
find "$GUEST_STDLIB" -name __pycache__ -prune -exec rm -rf {} +
find "$GUEST_STDLIB/lib-dynload" -maxdepth 1 -name '*.so' -printf '%f\n' \
    | grep -E "$DYNLOAD_DROP_RE" | while read -r so; do rm -f "$GUEST_STDLIB/lib-dynload/$so"; done
# Links left pointing outside (or at something dropped) would dangle in the guest.
find "$GUEST_STDLIB" -xtype l -delete

# --- Guest Python packages under /opt/vpcie (on PYTHONPATH in the guest).
copy_py_tree() {   # SRC_ROOT REL_PATH: copy without Python caches
    (cd "$1" && find "$2" -name __pycache__ -prune -o \( -type f ! -name '*.py[co]' \) -print0 \
        | cpio --null -pdm --quiet "$STAGE/opt/vpcie")
}
copy_py_tree "$(dirname "$CONSTRUCT_DIR")" construct
for p in "${REPO_GUEST_PATHS[@]}"; do copy_py_tree "$REPO" "$p"; done

# Check that the pruned tree has what the guest code and the promised stdlib
# modules import (the host interpreter, run on the staged stdlib only), and
# precompile what was imported. Under TCG compiling sources costs seconds at
# every boot (construct + vpcie.protocol: ~2.4 s from source, ~0.6 s from
# .pyc), but .pyc of the whole stdlib would add ~3.5 MB to the image: so
# bytecode only for the modules imported here, sources for the rest.
# unchecked-hash: the .pyc is used without comparing source mtimes; dfile:
# tracebacks show guest paths. Same interpreter on host and guest.
IMPORT_CHECK='
import sys, os, py_compile, pkgutil
import construct, vpcie, vpcie.errors, vpcie.protocol, guest_tools
for m in pkgutil.iter_modules(vpcie.protocol.__path__, "vpcie.protocol."):
    __import__(m.name)
# guest_tools is work in progress: a module that does not import only warns.
for m in pkgutil.walk_packages(guest_tools.__path__, "guest_tools."):
    try:
        __import__(m.name)
    except Exception as e:
        print("build.sh: WARNING: %s does not import on the guest tree: %s: %s"
              % (m.name, type(e).__name__, e), file=sys.stderr)
import ctypes, mmap, fcntl, struct, hashlib, hmac, json, dataclasses, enum, typing
import collections, functools, re, os, time, array, zlib, binascii, math, select
import argparse, logging, traceback, threading, signal, errno, io, pathlib, copy
import contextlib, itertools, queue, random, socket, selectors, subprocess, shutil
import tempfile, textwrap, base64, weakref, datetime, statistics, string, operator
hashlib.sha256(b"x"); hashlib.blake2s(b"x")
stage = sys.argv[1]
for mod in list(sys.modules.values()):
    f = getattr(mod, "__file__", None) or ""
    if f.startswith(stage + "/") and f.endswith(".py"):
        py_compile.compile(f, dfile=f[len(stage):], doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
'
env -i PATH=/usr/bin:/bin PYTHONHOME="$STAGE/usr" PYTHONPATH="$STAGE/opt/vpcie" PYTHONDONTWRITEBYTECODE=1 \
    "$SYS_PY" -S -c "$IMPORT_CHECK" "$STAGE" \
    || die "import check against the staged guest tree failed (see above): a needed module was pruned or is missing"
# All of /opt/vpcie (the guest programs themselves, e.g. guest_tools/demo.py).
"$SYS_PY" -m compileall -q --invalidation-mode unchecked-hash -s "$STAGE" -p / "$STAGE/opt/vpcie" >/dev/null \
    || die "compileall of the guest packages failed"

# Shared libraries of the interpreter, the extension modules and busybox, at
# the paths ldd names (dereferenced), plus the ELF interpreter. The guest's
# /lib is a plain directory (no usrmerge links), which ld.so searches.
LIBS="$( { ldd "$PY_REAL"; ldd "$BUSYBOX" 2>/dev/null || true
           find "$GUEST_STDLIB/lib-dynload" -name '*.so' -exec ldd {} \; ; } \
         | awk '/=> \// { print $3 } /^[[:space:]]*\/[^ ]+ \(0x/ { print $1 }' | sort -u)"
for lib in $LIBS; do
    [[ -f $lib ]] || die "ldd names $lib but it is not there"
    mkdir -p "$STAGE$(dirname "$lib")"
    cp -L "$lib" "$STAGE$lib"
done
[[ -f $STAGE/lib64/ld-linux-x86-64.so.2 ]] || die "ELF interpreter /lib64/ld-linux-x86-64.so.2 not found by ldd"

# Minimal /etc so Python and busybox find a user and a host name.
echo 'root:x:0:0:root:/root:/bin/sh' >"$STAGE/etc/passwd"
echo 'root:x:0:' >"$STAGE/etc/group"
echo 'vpcie-guest' >"$STAGE/etc/hostname"

# The kernel's built-in initramfs already has /dev/console; one here as well
# in case that ever changes (needs root; without it the built-in one is used).
mknod -m 600 "$STAGE/dev/console" c 5 1 2>/dev/null || true

# --- /init (busybox sh). Kept in this file so the stamp covers it.
cat >"$STAGE/init" <<'INIT'
#!/bin/sh
# /init of the vpcie guest (written by images/build.sh). Output: serial console.
export PATH=/bin:/usr/bin HOME=/root
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PYTHONUTF8=1 PYTHONPATH=/opt/vpcie

say() { echo "vpcie-guest: $*"; }
up() { cut -d' ' -f1 /proc/uptime; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/shm /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t devpts devpts /dev/pts
# stdin/stdout/stderr on the console even if the kernel could not open one.
[ -t 1 ] || exec </dev/console >/dev/console 2>&1
say "init at $(up) s"

# DRM and virtio-gpu, dependencies first; list made at build time.
# vpcie.fbdev=1 on the command line: keep the DRM framebuffer console (the
# guest then draws its text console on the GPU: 2D resources, transfers and
# flushes every ~200 ms, as a desktop guest would).
fbdev=0
grep -q 'vpcie.fbdev=1' /proc/cmdline && fbdev=1
while read -r ko params; do
    [ "$ko" = drm_kms_helper.ko ] && params="fbdev_emulation=$fbdev"
    # shellcheck disable=SC2086  # params split into words on purpose
    insmod "/lib/modules/$ko" $params || say "insmod $ko failed"
done </lib/modules/load.list
[ "$fbdev" = 1 ] && say "framebuffer console on: $(ls /dev/fb* 2>/dev/null | tr '\n' ' ')"

# Wait for the render node only where a virtio-gpu PCI device (1af4:1050,
# e.g. vhost-user-gpu-pci) exists; PCI is enumerated before /init runs.
gpu=""
for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/vendor" 2>/dev/null)" = 0x1af4 ] && [ "$(cat "$d/device" 2>/dev/null)" = 0x1050 ] \
        && gpu="${d##*/}"
done
if [ -z "$gpu" ]; then
    say "no virtio-gpu PCI device; no /dev/dri/renderD128"
else
    i=0
    while [ ! -e /dev/dri/renderD128 ] && [ $i -lt 100 ]; do usleep 100000; i=$((i + 1)); done
    if [ -e /dev/dri/renderD128 ]; then
        say "render node /dev/dri/renderD128 (virtio-gpu $gpu) at $(up) s"
    else
        say "virtio-gpu $gpu present but no /dev/dri/renderD128 after 10 s"
    fi
fi

# vpcie.run=PATH [vpcie.args=A,B,...] on the kernel command line.
run="" args=""
set -f
for w in $(cat /proc/cmdline); do
    case "$w" in
        vpcie.run=*)  run="${w#vpcie.run=}" ;;
        vpcie.args=*) args="${w#vpcie.args=}" ;;
    esac
done
if [ -n "$run" ]; then
    # Arguments: vpcie.args split on commas (no quoting; keep them simple).
    oldifs=$IFS; IFS=,; set -- $args; IFS=$oldifs
    set +f
    say "python3 $run${*:+ $*} (at $(up) s)"
    python3 "$run" "$@"
    rc=$?
else
    set +f
    python3 -c 'import sys; print("vpcie-guest: python", sys.version.split()[0])'
    rc=$?
fi
say "exit $rc"
sync
poweroff -f
sleep 5
INIT
chmod 755 "$STAGE/init"

# ---------------------------------------------------------------- output
# Write next to the outputs, then rename: an interrupted build leaves the old
# image and no matching stamp.
rm -f "$STAMP"
cp "$KROOT/boot/vmlinuz-$KVER" "$OUT/vmlinuz.tmp"
(cd "$STAGE" && find . -mindepth 1 | LC_ALL=C sort \
    | cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -9n >"$OUT/initramfs.gz.tmp"
mv -f "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
mv -f "$OUT/initramfs.gz.tmp" "$OUT/initramfs.gz"
printf '%s\nkernel %s=%s (%s)\npython %s\n' "$INPUT_HASH" "$KPKG" "$KPKG_VER" "$KVER" "$PY_REAL" >"$STAMP"
say "wrote $OUT/vmlinuz ($KVER) and $OUT/initramfs.gz ($(du -k "$OUT/initramfs.gz" | cut -f1) KiB)"
