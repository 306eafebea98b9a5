#!/usr/bin/env bash
# A three-layer image on top of busybox.sh's, for checking how layers combine: the
# second layer deletes a file and a directory of the first (whiteouts), replaces a
# file, and makes a directory opaque; its config sets a working directory.
#
#   images/layered.sh LAYOUT TAG      adds LAYOUT:TAG
#
# Inside the image: /data/kept (from layer 1), no /data/deleted, no /data/gone-dir,
# /data/replaced reading "layer 2", /opaque holding only "new" (its "old" hidden),
# and WorkingDir /srv/app.
set -euo pipefail
layout=$1 tag=$2
here=$(dirname "$0")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$here/busybox.sh" "$layout" "$tag"

# Layer 1: files for the next layer to change.
mkdir -p "$work/l1/data/gone-dir" "$work/l1/opaque"
echo kept > "$work/l1/data/kept"
echo deleted > "$work/l1/data/deleted"
echo "layer 1" > "$work/l1/data/replaced"
echo inside > "$work/l1/data/gone-dir/file"
echo old > "$work/l1/opaque/old"

# Layer 2: OCI whiteouts, written as the image spec defines them.
mkdir -p "$work/l2/data" "$work/l2/opaque"
: > "$work/l2/data/.wh.deleted"
: > "$work/l2/data/.wh.gone-dir"
echo "layer 2" > "$work/l2/data/replaced"
: > "$work/l2/opaque/.wh..wh..opq"
echo new > "$work/l2/opaque/new"

for layer in l1 l2; do
    tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 \
        -C "$work/$layer" -cf "$work/$layer.tar" .
    umoci raw add-layer --image "$layout:$tag" "$work/$layer.tar" \
        --history.created_by "images/layered.sh $layer" >/dev/null
done
umoci config --image "$layout:$tag" --config.workingdir /srv/app \
    --config.env LAYERED=yes >/dev/null
