# Sourced by the recipes: opens a new image `$layout:$tag` (creating the OCI layout
# if needed) and unpacks it under `$work`, setting `$root` to its empty rootfs.
if [ ! -e "$layout/index.json" ]; then
    rmdir "$layout" 2>/dev/null || true # umoci makes the directory itself
    umoci init --layout "$layout"
fi
umoci new --image "$layout:$tag"
umoci unpack --image "$layout:$tag" "$work/bundle" >/dev/null
root=$work/bundle/rootfs
