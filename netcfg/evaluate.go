package netcfg

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/vishvananda/netlink"

	"github.com/nodeagent/nodeagent/agent/health"
)

// verdict is one evaluation of the uplink: the health result plus the values the
// metrics and accessors expose.
type verdict struct {
	result health.Result
	up     bool // the uplink is usable (the check passes)
	mtu    int  // the uplink's MTU; 0 when it is not in the namespace
	pci    string
	numa   int
	numaOK bool
	// waiting is true when the verdict depends on host state that no netlink event
	// announces (sysfs driver binding, vpp-manager's info file), so it must be re-read.
	waiting bool
}

// maxListed bounds how many interface names a "not found" detail lists.
const maxListed = 8

// evaluate judges the uplink named opts.Interface from a snapshot of the namespace and
// from sysfs and Calico-VPP's files under opts.HostRoot. rememberedPCI is the PCI
// address the uplink last had, if it was ever seen; it names the device once a
// userspace driver has taken it.
func evaluate(opts Options, s *snapshot, rememberedPCI string) verdict {
	opts.NodeIP = opts.NodeIP.Unmap()
	name := opts.Interface
	l, ok := s.link(name)
	if !ok {
		return evaluateMissing(opts, s, rememberedPCI)
	}
	dev := readDevice(opts.HostRoot, name)
	v := verdict{mtu: l.mtu, pci: dev.pci, numa: dev.numa, numaOK: dev.numaOK}
	v.result.Name = health.Uplink

	if l.kind == "tuntap" && !dev.present {
		// Calico-VPP replaced the NIC with a tap of the same name, MAC and addresses.
		st := readVPPStatus(opts.HostRoot)
		if st.err == nil && st.state == "ready" {
			v.up = true
			v.result.OK = true
			v.result.Detail = fmt.Sprintf("%s taken over by VPP (tap, vppmanagerinfofile: ready)", name)
			return v
		}
		v.waiting = true
		v.result.Detail = fmt.Sprintf("%s is a tap but vppmanagerinfofile: %s (VPP not ready, or a crashed VPP left the tap)", name, st)
		return v
	}

	addrs := s.addrs[l.index]
	var problems []string
	switch {
	case !l.adminUp:
		problems = append(problems, "administratively down")
	case !l.lowerUp:
		problems = append(problems, "no carrier")
	case l.operState != netlink.OperUp && l.operState != netlink.OperUnknown:
		problems = append(problems, "operstate "+l.operState.String())
	}
	if l.mtu < opts.MinMTU {
		problems = append(problems, fmt.Sprintf("mtu %d below uplink.min_mtu %d", l.mtu, opts.MinMTU))
	}
	nodeAddrHere := false
	if opts.NodeIP.IsValid() {
		for _, p := range addrs {
			if p.Addr() == opts.NodeIP {
				nodeAddrHere = true
			}
		}
	}
	switch {
	case len(addrs) == 0:
		problems = append(problems, "no global address")
	case opts.NodeIP.IsValid() && !nodeAddrHere:
		msg := fmt.Sprintf("node address %s not on %s (has %s)", opts.NodeIP, name, joinPrefixes(addrs))
		if other := linkWithAddr(s, opts); other != "" {
			msg += fmt.Sprintf("; it is on %s", other)
		}
		problems = append(problems, msg)
	}
	if len(problems) > 0 {
		v.result.Detail = name + ": " + strings.Join(problems, ", ")
		return v
	}

	parts := []string{"up", "carrier", fmt.Sprintf("mtu %d", l.mtu)}
	for _, p := range addrs {
		if opts.NodeIP.IsValid() && p.Addr() == opts.NodeIP {
			parts = append(parts, p.String()+" (node address)")
		} else {
			parts = append(parts, p.String())
		}
	}
	switch routes := defaultRouteLinks(s); {
	case s.defaultRoute[l.index]:
		parts = append(parts, "default route")
	case len(routes) > 0:
		parts = append(parts, "default route via "+strings.Join(routes, ", "))
	default:
		parts = append(parts, "no default route")
	}
	switch {
	case dev.pci != "" && dev.driver != "":
		parts = append(parts, fmt.Sprintf("pci %s driver %s", dev.pci, dev.driver))
	case dev.pci != "":
		parts = append(parts, "pci "+dev.pci)
	case dev.present && dev.driver != "":
		parts = append(parts, "driver "+dev.driver)
	case !dev.present:
		parts = append(parts, "no device (virtual "+l.kind+")")
	}
	if dev.numaOK {
		parts = append(parts, fmt.Sprintf("numa %d", dev.numa))
	}
	parts = append(parts, fmt.Sprintf("%d/%d queues", l.rxQueues, l.txQueues))
	v.up = true
	v.result.OK = true
	v.result.Detail = name + ": " + strings.Join(parts, ", ")
	return v
}

// evaluateMissing explains an uplink that is not in the namespace: taken by a userspace
// driver, or simply a wrong name (then it names the likely right one).
func evaluateMissing(opts Options, s *snapshot, rememberedPCI string) verdict {
	opts.NodeIP = opts.NodeIP.Unmap()
	name := opts.Interface
	v := verdict{result: health.Result{Name: health.Uplink}, waiting: true}

	bound := userspaceBoundNICs(opts.HostRoot)
	if i := slices.IndexFunc(bound, func(b pciBinding) bool { return b.addr == rememberedPCI }); i >= 0 {
		bound = bound[i : i+1]
	}
	if len(bound) > 0 {
		var bs []string
		for _, b := range bound {
			bs = append(bs, fmt.Sprintf("pci %s bound to %s", b.addr, b.driver))
		}
		v.pci = bound[0].addr
		v.numa, v.numaOK = pciNUMA(opts.HostRoot, v.pci) // still in sysfs while vfio-pci holds it
		v.result.Detail = fmt.Sprintf("%s not in the host namespace: %s (VPP owns it, or a crashed VPP left it there)", name, strings.Join(bs, ", "))
		if st := readVPPStatus(opts.HostRoot); st.state != "missing" {
			v.result.Detail += "; vppmanagerinfofile: " + st.String()
		}
		return v
	}

	var msg strings.Builder
	fmt.Fprintf(&msg, "uplink %s not found", name)
	nodeLink := linkWithAddr(s, opts)
	routes := defaultRouteLinks(s)
	switch {
	case nodeLink != "" && slices.Contains(routes, nodeLink):
		fmt.Fprintf(&msg, "; %s carries %s and the default route — set uplink.interface: %s?", nodeLink, opts.NodeIP, nodeLink)
	case nodeLink != "" && len(routes) > 0:
		fmt.Fprintf(&msg, "; %s carries %s, %s the default route — set uplink.interface: %s?", nodeLink, opts.NodeIP, strings.Join(routes, ", "), nodeLink)
	case nodeLink != "":
		fmt.Fprintf(&msg, "; %s carries %s — set uplink.interface: %s?", nodeLink, opts.NodeIP, nodeLink)
	case len(routes) > 0:
		fmt.Fprintf(&msg, "; %s carries the default route — set uplink.interface: %s?", strings.Join(routes, ", "), routes[0])
	}
	var names []string
	for _, l := range s.links {
		if !l.loopback {
			names = append(names, l.name)
		}
	}
	switch {
	case len(names) == 0:
		msg.WriteString(" (no interfaces besides loopback)")
	case len(names) > maxListed:
		fmt.Fprintf(&msg, " (interfaces: %s and %d more)", strings.Join(names[:maxListed], ", "), len(names)-maxListed)
	default:
		fmt.Fprintf(&msg, " (interfaces: %s)", strings.Join(names, ", "))
	}
	v.result.Detail = msg.String()
	return v
}

// linkWithAddr names the link carrying opts.NodeIP, or "" when it is unknown or on none.
func linkWithAddr(s *snapshot, opts Options) string {
	if !opts.NodeIP.IsValid() {
		return ""
	}
	for _, l := range s.links {
		for _, p := range s.addrs[l.index] {
			if p.Addr() == opts.NodeIP {
				return l.name
			}
		}
	}
	return ""
}

// defaultRouteLinks names the links that carry a default route, in link order.
func defaultRouteLinks(s *snapshot) []string {
	var out []string
	for _, l := range s.links {
		if s.defaultRoute[l.index] {
			out = append(out, l.name)
		}
	}
	return out
}

func joinPrefixes(ps []netip.Prefix) string {
	ss := make([]string, len(ps))
	for i, p := range ps {
		ss[i] = p.String()
	}
	return strings.Join(ss, ", ")
}
