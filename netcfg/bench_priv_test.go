package netcfg

import (
	"fmt"
	"net"
	"net/netip"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/nodeagent/nodeagent/test/privtest"
)

// BenchmarkEvaluate measures one re-evaluation (address and route dumps, link lookups,
// the verdict) in a namespace shaped like a busy Kubernetes node — one veth pair, an
// address and a /32 route per pod — with netlink strict checking (as Run uses it) and
// without (older kernels). Run: go test -run - -bench Evaluate ./netcfg
func BenchmarkEvaluate(b *testing.B) {
	for _, pods := range []int{0, 100, 500} {
		for _, strict := range []bool{false, true} {
			b.Run(fmt.Sprintf("pods=%d/strict=%v", pods, strict), func(b *testing.B) {
				ns := privtest.NewNetns(b)
				h, err := newHandle(ns.Handle) // strict checking on, as Run has it
				if err != nil {
					b.Fatal(err)
				}
				defer h.Close()
				if !strict {
					if err := h.SetStrictCheck(false); err != nil {
						b.Fatal(err)
					}
				}
				uplink := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth1"}, PeerName: "eth1p"}
				if err := h.LinkAdd(uplink); err != nil {
					b.Fatal(err)
				}
				for i := range pods {
					veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: fmt.Sprintf("cali%d", i)}, PeerName: fmt.Sprintf("pod%d", i)}
					if err := h.LinkAdd(veth); err != nil {
						b.Fatal(err)
					}
					l, err := h.LinkByName(veth.Name)
					if err != nil {
						b.Fatal(err)
					}
					ip := net.IPv4(10, 244, byte(i/250), byte(i%250+1))
					if err := h.AddrAdd(l, &netlink.Addr{IPNet: &net.IPNet{IP: ip, Mask: net.CIDRMask(32, 32)}}); err != nil {
						b.Fatal(err)
					}
					if err := h.LinkSetUp(l); err != nil {
						b.Fatal(err)
					}
					if err := h.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Dst: &net.IPNet{IP: net.IPv4(10, 245, byte(i/250), byte(i%250+1)), Mask: net.CIDRMask(32, 32)}}); err != nil {
						b.Fatal(err)
					}
				}
				opts := Options{Interface: "eth1", NodeIP: netip.MustParseAddr("10.0.0.7"), HostRoot: b.TempDir()}.withDefaults()
				b.ResetTimer()
				for b.Loop() {
					s, err := takeSnapshot(h, opts.Interface, opts.NodeIP)
					if err != nil {
						b.Fatal(err)
					}
					_ = evaluate(opts, s, "")
				}
			})
		}
	}
}
