#!/usr/bin/env bash
# A minimal image: a static busybox and its applets, built offline with umoci from
# Debian's busybox-static.
#
#   images/busybox.sh LAYOUT TAG     adds LAYOUT:TAG (an OCI layout directory)
#
# Then push it, e.g.: skopeo copy oci:LAYOUT:TAG docker://REGISTRY/busybox:TAG
set -euo pipefail
layout=$1 tag=$2
busybox=/bin/busybox
[ -x "$busybox" ] || {
    echo "busybox.sh: needs $busybox (apt-get install busybox-static)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
. "$(dirname "$0")/umoci-start.sh"
mkdir -p "$root/bin" "$root/etc" "$root/root"
cp "$busybox" "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n' > "$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
echo "busybox image" > "$root/etc/image-release"
umoci repack --image "$layout:$tag" "$work/bundle" >/dev/null
umoci config --image "$layout:$tag" --config.env PATH=/bin \
    --author paddock --history.created_by "images/busybox.sh" >/dev/null
