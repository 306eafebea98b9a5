#!/usr/bin/env bash
# `paddock cc` against a plain build, ccache, sccache and distcc, in one run on this
# machine: builds the zstd library (the C sources of zstd 1.5.x that the zstd-sys
# crate vendors, so they are on any machine that has built Paddock) with make -j,
# each way from a clean tree, and prints seconds and the ratio to the plain build.
#
#   bash bench/cc.sh            # uses target/release/paddock (cargo build --release)
#
# It installs Debian's ccache, sccache and distcc if they are missing, starts a
# throwaway `paddock up` (container workers, the disk CAS) and distccd on loopback,
# and removes everything it made when it ends.
set -euo pipefail
cd "$(dirname "$0")/.."
paddock=${PADDOCK:-$PWD/target/release/paddock}
jobs=${JOBS:-$(nproc)}
[ -x "$paddock" ] || { echo "build it first: cargo build --release" >&2; exit 1; }

missing=()
for p in ccache sccache distcc make; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/zstd-sys-*/zstd/lib 2>/dev/null | sort | tail -1)
[ -n "$src" ] || { echo "no zstd-sys sources: build Paddock first (cargo build)" >&2; exit 1; }
version=$(basename "$(dirname "$(dirname "$src")")")

work=$(mktemp -d /tmp/paddock-bench-cc.XXXXXX)
farm_pid=""; distccd_pid=""
cleanup() {
  [ -n "$farm_pid" ] && kill "$farm_pid" 2>/dev/null && wait "$farm_pid" 2>/dev/null || true
  [ -n "$distccd_pid" ] && kill "$distccd_pid" 2>/dev/null || true
  SCCACHE_DIR="$work/sccache" sccache --stop-server >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

project="$work/zstd"
cp -r "$src" "$project"
cat > "$project/Makefile" <<'MAKE'
SRCS := $(wildcard common/*.c compress/*.c decompress/*.c dictBuilder/*.c)
ASM := decompress/huf_decompress_amd64.S
OBJS := $(patsubst %.c,obj/%.o,$(SRCS)) $(patsubst %.S,obj/%.o,$(ASM))
CFLAGS := -O2 -g -Wall -I. -Icommon -DXXH_NAMESPACE=ZSTD_
libzstd.a: $(OBJS)
	ar rcs $@ $^
obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -MMD -MP -c $< -o $@
obj/%.o: %.S
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@
clean:
	rm -rf obj libzstd.a
-include $(wildcard obj/*/*.d)
MAKE
files=$(cd "$project" && ls common/*.c compress/*.c decompress/*.c dictBuilder/*.c | wc -l)

export PADDOCK_ROOT="$project" PADDOCK_CC_DIR="$work/paddock-cc"
timed() { # name, CC
  make -C "$project" -s clean >/dev/null
  local start end
  start=$(date +%s.%N)
  make -C "$project" -s -j"$jobs" CC="$2" >"$work/$1.log" 2>&1 || { cat "$work/$1.log"; exit 1; }
  end=$(date +%s.%N)
  echo "$1 $(echo "$end - $start" | bc)" >> "$work/times"
}
objects() { (cd "$project" && find obj -name '*.o' -print0 | sort -z | xargs -0 sha256sum) }

# Plain, twice (the first warms the page cache and is not counted).
timed warmup gcc; : > "$work/times"
timed plain gcc
objects > "$work/plain.sums"

# paddock cc against a fresh farm on loopback.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$paddock" up --listen "127.0.0.1:$port" --metrics-listen 127.0.0.1:0 --data-dir "$work/farm" \
  >"$work/farm.out" 2>"$work/farm.log" &
farm_pid=$!
until grep -q "serving REAPI" "$work/farm.out" 2>/dev/null; do sleep 0.1; done
sleep 1 # the local worker connects
export PADDOCK_REMOTE="grpc://127.0.0.1:$port"
timed "paddock-cold" "$paddock cc gcc"
objects > "$work/paddock.sums"
timed "paddock-warm" "$paddock cc gcc"
unset PADDOCK_REMOTE
identical=no; cmp -s "$work/plain.sums" "$work/paddock.sums" && identical=yes

export CCACHE_DIR="$work/ccache"
timed "ccache-cold" "ccache gcc"
timed "ccache-warm" "ccache gcc"

export SCCACHE_DIR="$work/sccache" SCCACHE_IDLE_TIMEOUT=0 SCCACHE_SERVER_PORT=$((port + 7))
sccache --start-server >/dev/null 2>&1
timed "sccache-cold" "sccache gcc"
timed "sccache-warm" "sccache gcc"

distcc_note=""
dport=$((port + 11))
if distccd --daemon --no-detach --allow 127.0.0.1 --listen 127.0.0.1 --port "$dport" \
     --jobs "$jobs" --user nobody --log-file "$work/distccd.log" & then
  distccd_pid=$!
  sleep 1
  if kill -0 "$distccd_pid" 2>/dev/null; then
    DISTCC_HOSTS="127.0.0.1:$dport/$jobs" DISTCC_DIR="$work/distcc" timed "distcc" "distcc gcc"
  else
    distcc_note="distccd did not start: $(tail -1 "$work/distccd.log" 2>/dev/null)"
  fi
fi

plain=$(awk '$1=="plain"{print $2}' "$work/times")
echo "paddock bench cc: $version, $files C sources + 1 assembler source, make -j$jobs, $(nproc) CPUs, $(date -u +%Y-%m-%d)"
echo "paddock cc objects identical to the plain build's: $identical"
printf '| %-13s | %8s | %9s |\n' way seconds "× plain"
printf '| %-13s | %8s | %9s |\n' --- --- ---
while read -r name secs; do
  printf '| %-13s | %8.2f | %9.2f |\n' "$name" "$secs" "$(echo "$secs / $plain" | bc -l)"
done < "$work/times"
[ -z "$distcc_note" ] || echo "$distcc_note"
"$paddock" cc --stats | sed 's/^/  /'
