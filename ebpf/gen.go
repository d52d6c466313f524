package ebpf

// The BPF objects are generated with Debian's clang and committed, so building
// and testing need no C toolchain. `make generate` (go generate ./ebpf) reproduces
// them byte for byte: bpf2go strips DWARF and maps the source directory to a
// relative path, so the checkout location is not baked in.
//
// Headers: <linux/bpf.h> from linux-libc-dev and <bpf/bpf_helpers.h> from
// libbpf-dev; bpf/include/asm holds architecture-neutral stand-ins for the
// <asm/*.h> headers that clang -target bpf cannot find. No vmlinux.h: the
// programs only touch UAPI context structs (bpf_sock_addr, bpf_sock_ops), which
// are stable, so CO-RE buys nothing here.

//go:generate go tool bpf2go -cc clang -strip llvm-strip -target bpfel -go-package ebpf -type addr_port -type orig_dst -type config -type target steer bpf/steer.c -- -O2 -g -Wall -Werror -Ibpf/include
