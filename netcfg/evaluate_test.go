package netcfg

import (
	"fmt"
	"net"
	"net/netip"
	"reflect"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/nodeagent/nodeagent/agent/health"
)

func nic(index int, name string, mtu int) linkInfo {
	return linkInfo{index: index, name: name, kind: "device", adminUp: true, lowerUp: true,
		operState: netlink.OperUp, mtu: mtu, rxQueues: 4, txQueues: 4}
}

func lo() linkInfo {
	return linkInfo{index: 1, name: "lo", kind: "device", adminUp: true, lowerUp: true,
		operState: netlink.OperUnknown, mtu: 65536, rxQueues: 1, txQueues: 1, loopback: true}
}

func with(l linkInfo, f func(*linkInfo)) linkInfo {
	f(&l)
	return l
}

func snap(links []linkInfo, addrs map[int][]string, defaults ...int) *snapshot {
	s := &snapshot{links: links, addrs: map[int][]netip.Prefix{}, defaultRoute: map[int]bool{}}
	for i, as := range addrs {
		for _, a := range as {
			s.addrs[i] = append(s.addrs[i], netip.MustParsePrefix(a))
		}
	}
	for _, i := range defaults {
		s.defaultRoute[i] = true
	}
	return s
}

func TestEvaluate(t *testing.T) {
	h := newFakeHost(t)
	h.virtioNIC("eth1", "0000:00:05.0", "virtio3", "0")
	h.virtioNIC("eth0", "0000:00:03.0", "virtio0", "0")

	vfio := newFakeHost(t)
	vfio.virtioNIC("eth0", "0000:00:03.0", "virtio0", "0")
	vfio.pciFunc("0000:00:05.0", "0x020000", "0", "vfio-pci")
	vfio.pciFunc("0000:00:06.0", "0x020000", "1", "vfio-pci")

	ready := newFakeHost(t)
	ready.symlink("/var/run", "/run")
	ready.file("/run/vpp/vppmanagerinfofile", `{"Status": "ready"}`)
	ready.virtualNIC("eth1")

	starting := newFakeHost(t)
	starting.file("/var/run/vpp/vppmanagerinfofile", `{"Status": "starting"}`)
	starting.pciFunc("0000:00:05.0", "0x020000", "0", "vfio-pci")

	nodeIP := netip.MustParseAddr("10.0.0.7")
	base := Options{Interface: "eth1", MinMTU: 1500, NodeIP: nodeIP, HostRoot: h.root}
	opt := func(f func(*Options)) Options {
		o := base
		f(&o)
		return o
	}
	tap := func(index int, name string) linkInfo {
		return linkInfo{index: index, name: name, kind: "tuntap", adminUp: true, lowerUp: true,
			operState: netlink.OperUp, mtu: 1500, rxQueues: 1, txQueues: 1}
	}
	many := []linkInfo{lo()}
	for i := range 11 {
		many = append(many, nic(10+i, fmt.Sprintf("cali%d", i), 1500))
	}

	tests := []struct {
		name     string
		opts     Options
		snap     *snapshot
		remember string
		ok       bool
		detail   string
		mtu      int
		numaOK   bool
		waiting  bool
		wantPCI  string
		numa     int
	}{
		{
			name: "healthy virtio NIC",
			opts: base,
			snap: snap([]linkInfo{lo(), nic(2, "eth1", 1500)}, map[int][]string{2: {"10.0.0.7/24"}}, 2),
			ok:   true, mtu: 1500, numaOK: true, wantPCI: "0000:00:05.0",
			detail: "eth1: up, carrier, mtu 1500, 10.0.0.7/24 (node address), default route, pci 0000:00:05.0 driver virtio_net, numa 0, 4/4 queues",
		},
		{
			name: "node address unknown, two addresses, default route elsewhere",
			opts: opt(func(o *Options) { o.NodeIP = netip.Addr{} }),
			snap: snap([]linkInfo{lo(), nic(2, "eth0", 1500), nic(3, "eth1", 9000)}, map[int][]string{3: {"10.1.0.7/24", "fd00::7/64"}}, 2),
			ok:   true, mtu: 9000, numaOK: true, wantPCI: "0000:00:05.0",
			detail: "eth1: up, carrier, mtu 9000, 10.1.0.7/24, fd00::7/64, default route via eth0, pci 0000:00:05.0 driver virtio_net, numa 0, 4/4 queues",
		},
		{
			name: "no carrier",
			opts: base,
			snap: snap([]linkInfo{lo(), with(nic(2, "eth1", 1500), func(l *linkInfo) { l.lowerUp = false; l.operState = netlink.OperDown })}, map[int][]string{2: {"10.0.0.7/24"}}),
			mtu:  1500, numaOK: true, wantPCI: "0000:00:05.0",
			detail: "eth1: no carrier",
		},
		{
			name: "administratively down hides no carrier",
			opts: base,
			snap: snap([]linkInfo{lo(), with(nic(2, "eth1", 1500), func(l *linkInfo) { l.adminUp = false; l.lowerUp = false })}, map[int][]string{2: {"10.0.0.7/24"}}),
			mtu:  1500, numaOK: true, wantPCI: "0000:00:05.0",
			detail: "eth1: administratively down",
		},
		{
			name: "carrier but dormant",
			opts: base,
			snap: snap([]linkInfo{lo(), with(nic(2, "eth1", 1500), func(l *linkInfo) { l.operState = netlink.OperDormant })}, map[int][]string{2: {"10.0.0.7/24"}}),
			mtu:  1500, numaOK: true, wantPCI: "0000:00:05.0",
			detail: "eth1: operstate dormant",
		},
		{
			name: "several problems at once",
			opts: base,
			snap: snap([]linkInfo{lo(), with(nic(2, "eth1", 1400), func(l *linkInfo) { l.lowerUp = false })}, nil),
			mtu:  1400, numaOK: true, wantPCI: "0000:00:05.0",
			detail: "eth1: no carrier, mtu 1400 below uplink.min_mtu 1500, no global address",
		},
		{
			name: "node address on another interface",
			opts: base,
			snap: snap([]linkInfo{lo(), nic(2, "eth0", 1500), nic(3, "eth1", 1500)}, map[int][]string{2: {"10.0.0.7/24"}, 3: {"192.168.5.2/24"}}, 2),
			mtu:  1500, numaOK: true, wantPCI: "0000:00:05.0",
			detail: "eth1: node address 10.0.0.7 not on eth1 (has 192.168.5.2/24); it is on eth0",
		},
		{
			name:    "IPv4-mapped node address is named unmapped",
			opts:    opt(func(o *Options) { o.NodeIP = netip.MustParseAddr("::ffff:10.0.0.7") }),
			snap:    snap([]linkInfo{lo(), nic(2, "eth0", 1500)}, map[int][]string{2: {"10.0.0.7/24"}}, 2),
			waiting: true,
			detail:  "uplink eth1 not found; eth0 carries 10.0.0.7 and the default route — set uplink.interface: eth0? (interfaces: eth0)",
		},
		{
			name: "IPv4-mapped node address matches",
			opts: opt(func(o *Options) { o.NodeIP = netip.MustParseAddr("::ffff:10.0.0.7") }),
			snap: snap([]linkInfo{lo(), nic(2, "eth1", 1500)}, map[int][]string{2: {"10.0.0.7/24"}}),
			ok:   true, mtu: 1500, numaOK: true, wantPCI: "0000:00:05.0",
			detail: "eth1: up, carrier, mtu 1500, 10.0.0.7/24 (node address), no default route, pci 0000:00:05.0 driver virtio_net, numa 0, 4/4 queues",
		},
		{
			name: "virtual interface",
			opts: opt(func(o *Options) { o.Interface = "veth9"; o.NodeIP = netip.Addr{} }),
			snap: snap([]linkInfo{lo(), with(nic(2, "veth9", 1500), func(l *linkInfo) { l.kind = "veth"; l.rxQueues = 2; l.txQueues = 2 })}, map[int][]string{2: {"10.0.0.7/24"}}),
			ok:   true, mtu: 1500,
			detail: "veth9: up, carrier, mtu 1500, 10.0.0.7/24, no default route, no device (virtual veth), 2/2 queues",
		},
		{
			name:    "missing: the node address and default route name eth0",
			opts:    base,
			snap:    snap([]linkInfo{lo(), nic(2, "eth0", 1500), nic(3, "docker0", 1500)}, map[int][]string{2: {"10.0.0.7/24"}, 3: {"172.17.0.1/16"}}, 2),
			waiting: true,
			detail:  "uplink eth1 not found; eth0 carries 10.0.0.7 and the default route — set uplink.interface: eth0? (interfaces: eth0, docker0)",
		},
		{
			name:    "missing: many interfaces are capped",
			opts:    opt(func(o *Options) { o.NodeIP = netip.Addr{} }),
			snap:    snap(many, nil),
			waiting: true,
			detail:  "uplink eth1 not found (interfaces: cali0, cali1, cali2, cali3, cali4, cali5, cali6, cali7 and 3 more)",
		},
		{
			name:    "missing: NICs bound to vfio-pci",
			opts:    opt(func(o *Options) { o.HostRoot = vfio.root }),
			snap:    snap([]linkInfo{lo(), nic(2, "eth0", 1500)}, map[int][]string{2: {"10.0.0.7/24"}}, 2),
			waiting: true, wantPCI: "0000:00:05.0", numaOK: true,
			detail: "eth1 not in the host namespace: pci 0000:00:05.0 bound to vfio-pci, pci 0000:00:06.0 bound to vfio-pci (VPP owns it, or a crashed VPP left it there)",
		},
		{
			name:     "missing: the remembered PCI function is bound to vfio-pci",
			opts:     opt(func(o *Options) { o.HostRoot = vfio.root }),
			snap:     snap([]linkInfo{lo(), nic(2, "eth0", 1500)}, nil),
			remember: "0000:00:06.0",
			waiting:  true, wantPCI: "0000:00:06.0", numaOK: true, numa: 1,
			detail: "eth1 not in the host namespace: pci 0000:00:06.0 bound to vfio-pci (VPP owns it, or a crashed VPP left it there)",
		},
		{
			name:    "missing: vfio-pci with vpp-manager still starting",
			opts:    opt(func(o *Options) { o.HostRoot = starting.root }),
			snap:    snap([]linkInfo{lo()}, nil),
			waiting: true, wantPCI: "0000:00:05.0", numaOK: true,
			detail: "eth1 not in the host namespace: pci 0000:00:05.0 bound to vfio-pci (VPP owns it, or a crashed VPP left it there); vppmanagerinfofile: starting",
		},
		{
			name: "taken over by VPP",
			opts: opt(func(o *Options) { o.HostRoot = ready.root }),
			snap: snap([]linkInfo{lo(), tap(7, "eth1")}, map[int][]string{7: {"10.0.0.7/24"}}, 7),
			ok:   true, mtu: 1500,
			detail: "eth1 taken over by VPP (tap, vppmanagerinfofile: ready)",
		},
		{
			name:    "tap but vpp-manager starting",
			opts:    opt(func(o *Options) { o.HostRoot = starting.root }),
			snap:    snap([]linkInfo{lo(), tap(7, "eth1")}, nil),
			mtu:     1500,
			waiting: true,
			detail:  "eth1 is a tap but vppmanagerinfofile: starting (VPP not ready, or a crashed VPP left the tap)",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v := evaluate(tt.opts, tt.snap, tt.remember)
			want := health.Result{Name: health.Uplink, OK: tt.ok, Detail: tt.detail}
			if v.result != want {
				t.Errorf("got %+v\nwant %+v", v.result, want)
			}
			if v.up != tt.ok || v.mtu != tt.mtu || v.numa != tt.numa || v.numaOK != tt.numaOK || v.waiting != tt.waiting || v.pci != tt.wantPCI {
				t.Errorf("got up=%v mtu=%d numa=%d,%v waiting=%v pci=%q; want up=%v mtu=%d numa=%d,%v waiting=%v pci=%q",
					v.up, v.mtu, v.numa, v.numaOK, v.waiting, v.pci, tt.ok, tt.mtu, tt.numa, tt.numaOK, tt.waiting, tt.wantPCI)
			}
		})
	}
}

// fakeLister serves lookups from one set of links, and replays canned link dumps:
// each LinkList pops the next (result, error) pair and repeats the last one when
// they run out.
type fakeLister struct {
	all    []netlink.Link
	links  [][]netlink.Link
	linkEr []error
	addrs  []netlink.Addr
	routes []netlink.Route
	dumps  int
	gets   int
}

func (f *fakeLister) LinkByName(name string) (netlink.Link, error) {
	f.gets++
	for _, l := range f.all {
		if l.Attrs().Name == name {
			return l, nil
		}
	}
	return nil, netlink.LinkNotFoundError{}
}

func (f *fakeLister) LinkByIndex(index int) (netlink.Link, error) {
	f.gets++
	for _, l := range f.all {
		if l.Attrs().Index == index {
			return l, nil
		}
	}
	return nil, netlink.LinkNotFoundError{}
}

func (f *fakeLister) LinkList() ([]netlink.Link, error) {
	i := min(f.dumps, len(f.links)-1)
	f.dumps++
	return f.links[i], f.linkEr[i]
}

func (f *fakeLister) AddrList(netlink.Link, int) ([]netlink.Addr, error) { return f.addrs, nil }

func (f *fakeLister) RouteListFilteredIter(_ int, _ *netlink.Route, _ uint64, fn func(netlink.Route) bool) error {
	for _, r := range f.routes {
		if !fn(r) {
			break
		}
	}
	return nil
}

func dev(index int, name string) netlink.Link {
	return &netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: index, Name: name, MTU: 1500,
		Flags: net.FlagUp, RawFlags: unix.IFF_UP | unix.IFF_LOWER_UP, OperState: netlink.OperUp, NumRxQueues: 2, NumTxQueues: 3}}
}

func ipnet(s string) *net.IPNet {
	ip, n, err := net.ParseCIDR(s)
	if err != nil {
		panic(err)
	}
	n.IP = ip
	return n
}

func TestTakeSnapshot(t *testing.T) {
	full := []netlink.Link{dev(1, "lo"), dev(2, "eth0"), dev(3, "eth1"), dev(5, "cali1"), dev(6, "eth2")}
	partial := full[:2]
	tests := []struct {
		name        string
		uplink      string
		nodeIP      string
		links       [][]netlink.Link
		errs        []error
		wantLinks   []string
		interrupted bool
		dumps       int
	}{
		{
			name: "uplink present: it and the links the verdict names, no dump", uplink: "eth1", nodeIP: "10.6.0.7",
			links: [][]netlink.Link{full}, errs: []error{nil},
			wantLinks: []string{"eth0", "eth1", "eth2"}, // eth0: default route; eth2: node address; index 4 is gone
		},
		{
			name: "uplink missing: clean dump", uplink: "eth9",
			links: [][]netlink.Link{full}, errs: []error{nil},
			wantLinks: []string{"lo", "eth0", "eth1", "cali1", "eth2"}, dumps: 1,
		},
		{
			name: "uplink missing: interrupted twice then clean", uplink: "eth9",
			links: [][]netlink.Link{partial, partial, full}, errs: []error{netlink.ErrDumpInterrupted, netlink.ErrDumpInterrupted, nil},
			wantLinks: []string{"lo", "eth0", "eth1", "cali1", "eth2"}, dumps: 3,
		},
		{
			name: "uplink missing: always interrupted, partial result kept", uplink: "eth9",
			links: [][]netlink.Link{partial}, errs: []error{netlink.ErrDumpInterrupted},
			wantLinks: []string{"lo", "eth0"}, interrupted: true, dumps: dumpAttempts,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := &fakeLister{
				all:   full,
				links: tt.links, linkEr: tt.errs,
				addrs: []netlink.Addr{
					{IPNet: ipnet("10.0.0.7/24"), LinkIndex: 3, Scope: unix.RT_SCOPE_UNIVERSE},
					{IPNet: ipnet("fe80::1/64"), LinkIndex: 3, Scope: unix.RT_SCOPE_LINK},
					{IPNet: ipnet("127.0.0.1/8"), LinkIndex: 1, Scope: unix.RT_SCOPE_HOST},
					{IPNet: ipnet("fd00::7/64"), LinkIndex: 2, Scope: unix.RT_SCOPE_UNIVERSE},
					{IPNet: ipnet("10.6.0.7/24"), LinkIndex: 6, Scope: unix.RT_SCOPE_UNIVERSE},
				},
				routes: []netlink.Route{
					{Dst: ipnet("10.0.0.0/24"), LinkIndex: 3, Type: unix.RTN_UNICAST},
					{Dst: ipnet("10.5.0.0/16"), LinkIndex: 5, Type: unix.RTN_UNICAST},
					{Dst: nil, LinkIndex: 3, Gw: net.IPv4(10, 0, 0, 1), Type: unix.RTN_UNICAST},
					{Dst: ipnet("::/0"), Type: unix.RTN_UNICAST, MultiPath: []*netlink.NexthopInfo{{LinkIndex: 2}, {LinkIndex: 4}}},
					{Dst: ipnet("0.0.0.0/0"), LinkIndex: 7, Type: unix.RTN_UNREACHABLE},
				},
			}
			var nodeIP netip.Addr
			if tt.nodeIP != "" {
				nodeIP = netip.MustParseAddr(tt.nodeIP)
			}
			s, err := takeSnapshot(f, tt.uplink, nodeIP)
			if err != nil {
				t.Fatal(err)
			}
			var names []string
			for _, l := range s.links {
				names = append(names, l.name)
			}
			if !reflect.DeepEqual(names, tt.wantLinks) || s.interrupted != tt.interrupted || f.dumps != tt.dumps {
				t.Errorf("got links %v interrupted=%v after %d dumps; want %v interrupted=%v after %d",
					names, s.interrupted, f.dumps, tt.wantLinks, tt.interrupted, tt.dumps)
			}
			wantAddrs := map[int][]netip.Prefix{
				3: {netip.MustParsePrefix("10.0.0.7/24")},
				2: {netip.MustParsePrefix("fd00::7/64")},
				6: {netip.MustParsePrefix("10.6.0.7/24")},
			}
			if !reflect.DeepEqual(s.addrs, wantAddrs) {
				t.Errorf("got global addresses %v; want %v", s.addrs, wantAddrs)
			}
			wantRoutes := map[int]bool{3: true, 2: true, 4: true}
			if !reflect.DeepEqual(s.defaultRoute, wantRoutes) {
				t.Errorf("got default route links %v; want %v", s.defaultRoute, wantRoutes)
			}
			if l, _ := s.link("eth0"); l.rxQueues != 2 || l.txQueues != 3 || !l.adminUp || !l.lowerUp || l.kind != "device" {
				t.Errorf("got eth0 %+v; want a device, up with carrier and 2/3 queues", l)
			}
		})
	}
}
