#!/bin/sh
# Builds bpf/redirect.bpf.o from bpf/redirect.bpf.c. The object is committed (aya embeds it with
# include_bytes_aligned!, so cargo never needs clang) and .ci/run rebuilds it into a temporary
# directory and compares the bytes, so the output must depend on nothing but the source, the
# compiler and the headers:
# - clang runs in bpf/ on a relative path and -fdebug-compilation-dir=. replaces the working
#   directory in the DWARF, so a clone in another directory produces the same bytes;
# - the compiler is pinned to clang 14 (Debian 12), as a different LLVM emits different code;
# - the headers are the Debian 12 UAPI (linux-libc-dev) and libbpf-dev ones under /usr/include.
# -g is required: aya reads the BTF that describes the maps.
#
# Usage: bpf/build.sh [OUTPUT]    (default: bpf/redirect.bpf.o)
set -eu
out=${1:-}
case $out in "" | /*) ;; *) out="$PWD/$out" ;; esac
cd "$(dirname "$0")"
out=${out:-$PWD/redirect.bpf.o}

clang=${BPF_CLANG:-$(command -v clang-14 || command -v clang || true)}
if [ -z "$clang" ]; then
  echo "bpf/build.sh: clang not found (apt-get install clang libbpf-dev)" >&2
  exit 1
fi
if ! "$clang" --version | head -n 1 | grep -q 'clang version 14\.'; then
  echo "bpf/build.sh: $clang is not clang 14; the committed object is built with Debian clang 14 ($("$clang" --version | head -n 1))" >&2
  exit 1
fi
if [ ! -f /usr/include/bpf/bpf_helpers.h ]; then
  echo "bpf/build.sh: /usr/include/bpf/bpf_helpers.h not found (apt-get install libbpf-dev)" >&2
  exit 1
fi

"$clang" -O2 -g -target bpf -Wall -Werror \
  -I/usr/include/x86_64-linux-gnu \
  -fdebug-compilation-dir=. \
  -c redirect.bpf.c -o "$out"
