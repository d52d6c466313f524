package ebpf

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
)

// errUnsupported marks a failure that retrying cannot fix: the kernel lacks a
// feature, BPF is not permitted, or the host has no cgroup v2.
var errUnsupported = errors.New("steering unsupported on this host")

// minKernel is 5.8: the getpeername hooks.
const minKernel = 5<<16 | 8<<8

// probeKernel checks every kernel feature the programs need and names the first
// one missing.
func probeKernel() error {
	v, err := features.LinuxVersionCode()
	if err != nil {
		return fmt.Errorf("%w: read kernel version: %w", errUnsupported, err)
	}
	if v < minKernel {
		return fmt.Errorf("%w: kernel %d.%d is older than 5.8 (cgroup getpeername hooks)", errUnsupported, v>>16, v>>8&0xff)
	}
	type probe struct {
		what string
		fn   func() error
	}
	probes := []probe{
		{"program type cgroup_sock_addr", func() error { return features.HaveProgramType(ebpf.CGroupSockAddr) }},
		{"program type sock_ops", func() error { return features.HaveProgramType(ebpf.SockOps) }},
		{"helper bpf_get_netns_cookie in cgroup_sock_addr", func() error {
			return features.HaveProgramHelper(ebpf.CGroupSockAddr, asm.FnGetNetnsCookie)
		}},
		{"helper bpf_get_socket_cookie in cgroup_sock_addr", func() error {
			return features.HaveProgramHelper(ebpf.CGroupSockAddr, asm.FnGetSocketCookie)
		}},
		{"helper bpf_get_socket_cookie in sock_ops", func() error {
			return features.HaveProgramHelper(ebpf.SockOps, asm.FnGetSocketCookie)
		}},
		{"helper bpf_sock_ops_cb_flags_set in sock_ops", func() error {
			return features.HaveProgramHelper(ebpf.SockOps, asm.FnSockOpsCbFlagsSet)
		}},
		{"BPF map type LRU hash", func() error { return features.HaveMapType(ebpf.LRUHash) }},
	}
	for _, p := range probes {
		if err := p.fn(); err != nil {
			return fmt.Errorf("%w: missing %s: %w", errUnsupported, p.what, err)
		}
	}
	if _, err := socketNetnsCookie(); err != nil {
		return fmt.Errorf("%w: %w", errUnsupported, err)
	}
	return nil
}
