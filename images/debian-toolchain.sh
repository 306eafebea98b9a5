#!/usr/bin/env bash
# A C/C++ toolchain image made from this Debian machine's own installed packages
# (no network): gcc, g++, binutils, the C library's headers, bash and coreutils, with
# everything they depend on. Actions see the same compiler as the host, so remote and
# local builds produce the same bytes.
#
#   images/debian-toolchain.sh LAYOUT TAG     adds LAYOUT:TAG
#
# Needs: dpkg, apt-cache, umoci (apt-get install umoci) and the packages below.
set -euo pipefail
layout=$1 tag=$2
roots=(bash coreutils dash diffutils findutils grep sed mawk gzip tar
       gcc g++ cpp binutils libc6-dev libc-bin)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The installed packages the roots need, following Depends and Pre-Depends only.
packages=$(apt-cache depends --recurse --installed --no-recommends --no-suggests \
    --no-conflicts --no-breaks --no-replaces --no-enhances "${roots[@]}" \
    | grep -v '^ ' | grep -v '^<' | sort -u)
# (dpkg-query fails on virtual names, which have no files anyway.)
installed=$({ dpkg-query -W -f '${db:Status-Abbrev} ${Package}\n' $packages 2>/dev/null || true; } \
    | awk '$1 == "ii" { print $2 }')

. "$(dirname "$0")/umoci-start.sh"

# Every file the packages own, as dpkg lists it; directories without recursion.
# Debian 12 has a merged /usr: /bin, /lib, /lib64 and /sbin are symlinks into it,
# so they go first and the files behind them land in /usr.
for link in bin lib lib32 lib64 libx32 sbin; do
    if [ -L "/$link" ]; then
        mkdir -p "$root/usr/$link"
        cp -P "/$link" "$root/$link"
    fi
done
for package in $installed; do
    dpkg -L "$package" 2>/dev/null || true
done | grep '^/' | sort -u | while read -r path; do
    [ -e "$path" ] || [ -L "$path" ] || continue
    [ -e "$root$path" ] || [ -L "$root$path" ] && [ -L "$path" ] && continue
    [ -d "$path" ] && [ ! -L "$path" ] && { mkdir -p "$root$path"; continue; }
    real=$(realpath -s "$path")
    dir=$(dirname "$real")
    # Through a top-level symlink (/bin/bash is really /usr/bin/bash): copy into the
    # real directory, which the symlink in the image leads to as well.
    resolved=$(cd "$dir" 2>/dev/null && pwd -P) || continue
    mkdir -p "$root$resolved"
    cp -P --preserve=mode,timestamps,links "$path" "$root$resolved/"
done
# Debian's alternatives (cc, c++, awk, ...) and the dynamic linker's cache.
mkdir -p "$root/etc/alternatives"
cp -P -r /etc/alternatives/. "$root/etc/alternatives/"
find /usr/bin /usr/sbin -maxdepth 1 -lname '/etc/alternatives/*' -exec cp -P -t "$root/usr/bin" {} +
printf 'root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n' > "$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
ldconfig -r "$root" 2>/dev/null || true
echo "Debian toolchain image, from: $(echo $installed | tr '\n' ' ')" > "$root/etc/image-release"

umoci repack --image "$layout:$tag" "$work/bundle" >/dev/null
umoci config --image "$layout:$tag" \
    --config.env PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin \
    --history.created_by "images/debian-toolchain.sh" >/dev/null
