#!/usr/bin/env bash
# Build (or reuse) a Debian trixie chroot with GIMP 3 and its Python support, for the plug-in's
# end-to-end test (tests/test_gimp_e2e.py). Idempotent: a finished chroot is left as it is.
#   PASTICHE_GIMP_CHROOT   where to build it (default /var/tmp/pastiche-gimp-chroot)
#   PASTICHE_DEBIAN_MIRROR Debian mirror (default http://deb.debian.org/debian)
# Needs root (debootstrap, chroot). Mounts /proc and /dev only while installing, and always
# unmounts them again.
set -euo pipefail

DIR="${PASTICHE_GIMP_CHROOT:-/var/tmp/pastiche-gimp-chroot}"
MIRROR="${PASTICHE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PACKAGES=(gimp python3-gi gir1.2-gimp-3.0)
STAMP="$DIR/.pastiche-gimp-ready"

ready() {
    [ -x "$DIR/usr/bin/gimp-console-3.0" ] && [ -e "$DIR/usr/lib/python3/dist-packages/gi/__init__.py" ] \
        && ls "$DIR"/usr/lib/*/girepository-1.0/Gimp-3.0.typelib >/dev/null 2>&1
}

if ready; then
    touch "$STAMP"
    echo "GIMP chroot ready at $DIR"
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    echo "Building the GIMP chroot needs root (debootstrap and chroot)." >&2
    exit 1
fi

if ! command -v debootstrap >/dev/null 2>&1; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap
fi

if [ ! -x "$DIR/usr/bin/apt-get" ] || [ -d "$DIR/debootstrap" ]; then
    if [ -d "$DIR/debootstrap" ]; then
        # An interrupted debootstrap (it keeps its work folder there) cannot be resumed.
        rm -rf --one-file-system "$DIR"
    elif [ -d "$DIR" ] && [ -n "$(ls -A "$DIR")" ]; then
        echo "$DIR exists, is not empty and is not a Debian tree; set PASTICHE_GIMP_CHROOT." >&2
        exit 1
    fi
    mkdir -p "$DIR"
    debootstrap --variant=minbase trixie "$DIR" "$MIRROR"
fi

MOUNTED=()
cleanup() {
    local i
    for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do
        umount "${MOUNTED[i]}" 2>/dev/null || umount -l "${MOUNTED[i]}" || true
    done
}
trap cleanup EXIT

mount_if_needed() {  # $1 = target inside the chroot, rest = mount arguments
    local target="$DIR$1"
    shift
    if ! mountpoint -q "$target"; then
        mount "$@" "$target"
        MOUNTED+=("$target")
    fi
}
mount_if_needed /proc -t proc proc
mount_if_needed /dev --bind /dev

cp -L /etc/resolv.conf "$DIR/etc/resolv.conf" 2>/dev/null || true
chroot "$DIR" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
    apt-get update -q
chroot "$DIR" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
chroot "$DIR" apt-get clean

if ready; then
    touch "$STAMP"
    echo "GIMP chroot ready at $DIR"
else
    echo "GIMP was installed in $DIR but gimp-console-3.0 or its Python support is missing." >&2
    exit 1
fi
