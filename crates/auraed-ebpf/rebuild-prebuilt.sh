#!/bin/sh
# Rebuilds prebuilt/signal.bpf.o (used when clang is missing) and records the
# sha256 of the source it came from. Needs: clang llvm libbpf-dev bpftool, and
# a kernel with /sys/kernel/btf/vmlinux. Commit both files afterwards.
set -eu
cd "$(dirname "$0")"
BPFTOOL=${BPFTOOL:-$(command -v bpftool || echo /usr/sbin/bpftool)}
CLANG=${CLANG:-clang}
ARCH=${ARCH:-x86}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$BPFTOOL" btf dump file /sys/kernel/btf/vmlinux format c > "$tmp/vmlinux.h"
"$CLANG" -O2 -g -target bpf -Wall -Werror -D__TARGET_ARCH_"$ARCH" -I "$tmp" \
    -c src/signal.bpf.c -o "$tmp/signal.bpf.o"
# Keep .BTF/.BTF.ext (CO-RE relocations, map definitions); drop DWARF.
llvm-strip -g "$tmp/signal.bpf.o"
mkdir -p prebuilt
cp "$tmp/signal.bpf.o" prebuilt/signal.bpf.o
(cd src && sha256sum signal.bpf.c) > prebuilt/signal.bpf.c.sha256
echo "prebuilt/signal.bpf.o: $(wc -c < prebuilt/signal.bpf.o) bytes, source $(cut -d' ' -f1 prebuilt/signal.bpf.c.sha256)"
