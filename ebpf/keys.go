package ebpf

import (
	"encoding/binary"
	"net/netip"
)

// Map layouts (see bpf/steer.c): addresses are 16 bytes in network order, IPv4
// as IPv4-mapped IPv6, stored in __u32[4] (so in native-endian words here);
// ports are in host order.

// Indices into the counters map; mirror enum counter in bpf/steer.c.
const (
	counterRedirectIPv4 = iota
	counterRedirectIPv6
	counterPodUnsteered
	counterSkippedMark
	counterErrors
	counterMax
)

func addrWords(a netip.Addr) [4]uint32 {
	b := a.As16() // IPv4 becomes ::ffff:a.b.c.d
	var w [4]uint32
	for i := range w {
		w[i] = binary.NativeEndian.Uint32(b[i*4:])
	}
	return w
}

func wordsAddr(w [4]uint32) netip.Addr {
	var b [16]byte
	for i := range w {
		binary.NativeEndian.PutUint32(b[i*4:], w[i])
	}
	return netip.AddrFrom16(b)
}

func interceptKey(i Intercept) steerAddrPort {
	return steerAddrPort{Addr: addrWords(i.Addr), Port: i.Port}
}

func clientKey(client netip.AddrPort) steerAddrPort {
	return steerAddrPort{Addr: addrWords(client.Addr()), Port: client.Port()}
}

func target(ap netip.AddrPort) steerTarget {
	if !ap.IsValid() {
		return steerTarget{}
	}
	return steerTarget{Addr: addrWords(ap.Addr()), Port: ap.Port(), Valid: 1}
}

// origAddr turns a map value into the address the workload dialled: IPv4 when it
// dialled IPv4 (plain or IPv4-mapped).
func origAddr(o steerOrigDst) netip.AddrPort {
	a := wordsAddr(o.Addr)
	if o.Family == 4 {
		a = a.Unmap()
	}
	return netip.AddrPortFrom(a, o.Port)
}
