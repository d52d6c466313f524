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
// address and a /32 route per pod — when the uplink is present (looked up by name)
// and when it is missing (every link dumped, to name them).
// Run: go test -run - -bench Evaluate ./netcfg
func BenchmarkEvaluate(b *testing.B) {
	for _, pods := range []int{0, 100, 500} {
		b.Run(fmt.Sprintf("pods=%d", pods), func(b *testing.B) {
			ns := privtest.NewNetns(b)
			h, err := newHandle(ns.Handle)
			if err != nil {
				b.Fatal(err)
			}
			defer h.Close()
			if err := h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth1"}, PeerName: "eth1p"}); err != nil {
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
				dst := &net.IPNet{IP: net.IPv4(10, 245, byte(i/250), byte(i%250+1)), Mask: net.CIDRMask(32, 32)}
				if err := h.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Dst: dst}); err != nil {
					b.Fatal(err)
				}
			}
			for _, uplink := range []string{"present", "missing"} {
				b.Run("uplink="+uplink, func(b *testing.B) {
					opts := Options{Interface: "eth1", NodeIP: netip.MustParseAddr("10.0.0.7"), HostRoot: b.TempDir()}.withDefaults()
					if uplink == "missing" {
						opts.Interface = "eth9"
					}
					for b.Loop() {
						s, err := takeSnapshot(h, opts.Interface, opts.NodeIP)
						if err != nil {
							b.Fatal(err)
						}
						_ = evaluate(opts, s, "")
					}
				})
			}
		})
	}
}
