package netcfg

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/vishvananda/netlink"

	"github.com/nodeagent/nodeagent/agent/health"
	"github.com/nodeagent/nodeagent/test/privtest"
)

// seenWithin bounds how long a change may take to show in the check. It is the
// issue's requirement, not a speed measurement: the debounce is 75 ms.
const seenWithin = time.Second

// testLog returns a logger that writes into the test's log.
func testLog(t *testing.T) *slog.Logger {
	t.Helper()
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

// nsHandle opens a netlink handle inside ns, closed when t ends.
func nsHandle(t *testing.T, ns *privtest.Netns) *netlink.Handle {
	t.Helper()
	h, err := netlink.NewHandleAt(ns.Handle)
	if err != nil {
		t.Fatalf("netlink handle in %s: %v", ns.Name, err)
	}
	t.Cleanup(h.Close)
	return h
}

// addVeth creates name in h's namespace with its peer in peerNS. Deleting the
// namespaces (privtest's cleanup) removes both ends.
func addVeth(t *testing.T, h *netlink.Handle, name, peer string, peerNS *privtest.Netns) {
	t.Helper()
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: name, MTU: 1500},
		PeerName:      peer,
		PeerNamespace: netlink.NsFd(int(peerNS.Handle)),
	}
	if err := h.LinkAdd(veth); err != nil {
		t.Fatalf("add veth %s/%s: %v", name, peer, err)
	}
}

func mustLink(t *testing.T, h *netlink.Handle, name string) netlink.Link {
	t.Helper()
	l, err := h.LinkByName(name)
	if err != nil {
		t.Fatalf("link %s: %v", name, err)
	}
	return l
}

// running starts u.Run and stops it when t ends, failing t if Run returned an error.
func running(t *testing.T, u *Uplink) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- u.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run returned %v; want nil on cancellation", err)
			}
		case <-time.After(5 * time.Second):
			t.Errorf("Run did not return within 5s of cancellation")
		}
	})
}

// gauge reads a metric's value from reg.
func metricValue(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		m := mf.GetMetric()[0]
		switch {
		case m.GetGauge() != nil:
			return m.GetGauge().GetValue()
		case m.GetCounter() != nil:
			return m.GetCounter().GetValue()
		}
	}
	t.Fatalf("metric %s not registered", name)
	return 0
}

func TestWatchTransitions(t *testing.T) {
	ns := privtest.NewNetns(t)
	peerNS := privtest.NewNetns(t)
	h := nsHandle(t, ns)
	peerH := nsHandle(t, peerNS)

	rec := health.NewRecorder()
	reg := prometheus.NewRegistry()
	u, err := New(Options{
		Interface: "eth1",
		MinMTU:    1500,
		NodeIP:    netip.MustParseAddr("10.0.0.7"),
		HostRoot:  t.TempDir(),
		NetnsPath: ns.Path,
	}, testLog(t), reg, rec)
	if err != nil {
		t.Fatal(err)
	}
	running(t, u)

	steps := []struct {
		name   string
		action func() error
		ok     bool
		detail string // exact, or a prefix when it ends in "…"
		up     float64
		mtu    float64
	}{
		{
			name: "absent", action: func() error { return nil },
			detail: "uplink eth1 not found (no interfaces besides loopback)",
		},
		{
			name: "created",
			action: func() error {
				addVeth(t, h, "eth1", "peer1", peerNS)
				return nil
			},
			detail: "eth1: administratively down, no global address", mtu: 1500,
		},
		{
			name:   "admin up",
			action: func() error { return h.LinkSetUp(mustLink(t, h, "eth1")) },
			detail: "eth1: no carrier, no global address", mtu: 1500,
		},
		{
			name:   "carrier",
			action: func() error { return peerH.LinkSetUp(mustLink(t, peerH, "peer1")) },
			detail: "eth1: no global address", mtu: 1500,
		},
		{
			name: "address added",
			action: func() error {
				return h.AddrAdd(mustLink(t, h, "eth1"), &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(10, 0, 0, 7), Mask: net.CIDRMask(24, 32)}})
			},
			ok: true, detail: "eth1: up, carrier, mtu 1500, 10.0.0.7/24 (node address), no default route, no device (virtual veth), …", up: 1, mtu: 1500,
		},
		{
			name: "default route",
			action: func() error {
				return h.RouteAdd(&netlink.Route{LinkIndex: mustLink(t, h, "eth1").Attrs().Index, Gw: net.IPv4(10, 0, 0, 1)})
			},
			ok: true, detail: "eth1: up, carrier, mtu 1500, 10.0.0.7/24 (node address), default route, no device (virtual veth), …", up: 1, mtu: 1500,
		},
		{
			name:   "mtu below minimum",
			action: func() error { return h.LinkSetMTU(mustLink(t, h, "eth1"), 1400) },
			detail: "eth1: mtu 1400 below uplink.min_mtu 1500", mtu: 1400,
		},
		{
			name:   "deleted",
			action: func() error { return h.LinkDel(mustLink(t, h, "eth1")) },
			detail: "uplink eth1 not found (no interfaces besides loopback)",
		},
	}
	for i, st := range steps {
		start := time.Now()
		if err := st.action(); err != nil {
			t.Fatalf("step %q: %v", st.name, err)
		}
		want := func(r health.Result) bool {
			if r.OK != st.ok {
				return false
			}
			if prefix, ok := strings.CutSuffix(st.detail, "…"); ok {
				return strings.HasPrefix(r.Detail, prefix)
			}
			return r.Detail == st.detail
		}
		got, ok := rec.WaitFor(health.Uplink, seenWithin, want)
		if !ok {
			t.Fatalf("step %q: after %v got %+v; want OK=%v detail %q", st.name, seenWithin, got, st.ok, st.detail)
		}
		t.Logf("step %q seen after %v", st.name, time.Since(start).Round(time.Millisecond))
		if v := metricValue(t, reg, "nodeagent_uplink_up"); v != st.up {
			t.Errorf("step %q: nodeagent_uplink_up got %v; want %v", st.name, v, st.up)
		}
		if v := metricValue(t, reg, "nodeagent_uplink_mtu_bytes"); v != st.mtu {
			t.Errorf("step %q: nodeagent_uplink_mtu_bytes got %v; want %v", st.name, v, st.mtu)
		}
		if v := metricValue(t, reg, "nodeagent_uplink_changes_total"); v < float64(i) {
			t.Errorf("step %q: nodeagent_uplink_changes_total got %v; want at least %v", st.name, v, i)
		}
	}
	// Each change was reported (and counted) once, not once per netlink event.
	hist := rec.History()
	for i := 1; i < len(hist); i++ {
		if hist[i] == hist[i-1] {
			t.Errorf("result reported twice in a row: %+v", hist[i])
		}
	}
	if v := metricValue(t, reg, "nodeagent_uplink_changes_total"); v != float64(len(hist)-1) {
		t.Errorf("nodeagent_uplink_changes_total got %v; want %d (reports minus the first): %+v", v, len(hist)-1, hist)
	}
	if len(hist) != len(steps) {
		t.Logf("note: %d reports for %d steps (transient kernel states in between): %+v", len(hist), len(steps), hist)
	}
}

// The healthy detail names the queue counts the kernel reports.
func TestHealthyDetailQueues(t *testing.T) {
	ns := privtest.NewNetns(t)
	peerNS := privtest.NewNetns(t)
	h := nsHandle(t, ns)
	peerH := nsHandle(t, peerNS)
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: "eth1", MTU: 9000, NumTxQueues: 4, NumRxQueues: 3},
		PeerName:      "peer1",
		PeerNamespace: netlink.NsFd(int(peerNS.Handle)),
	}
	if err := h.LinkAdd(veth); err != nil {
		t.Fatalf("add veth: %v", err)
	}
	l := mustLink(t, h, "eth1")
	for _, err := range []error{
		h.AddrAdd(l, &netlink.Addr{IPNet: &net.IPNet{IP: net.ParseIP("fd00::7"), Mask: net.CIDRMask(64, 128)}}),
		h.LinkSetUp(l),
		peerH.LinkSetUp(mustLink(t, peerH, "peer1")),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	want := "eth1: up, carrier, mtu 9000, fd00::7/64, no default route, no device (virtual veth), 3/4 queues"
	deadline := time.Now().Add(5 * time.Second)
	var got []health.Result
	for time.Now().Before(deadline) { // the veth's carrier comes up asynchronously
		got = Check(context.Background(), Options{Interface: "eth1", HostRoot: t.TempDir(), NetnsPath: ns.Path})
		if len(got) == 1 && got[0].OK && got[0].Detail == want {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("got %+v; want OK %q", got, want)
}

// vppInfo is vpp-manager's info file as it writes it.
func vppInfo(status string) string {
	return `{"Status": "` + status + `", "UplinkStatuses": {"eth1": {"SwIfIndex": 1, "Name": "eth1", "IsMain": true, "Mtu": 1500}}}`
}

func addTap(t *testing.T, ns *privtest.Netns, name string) {
	t.Helper()
	if out, err := ns.Command("ip", "tuntap", "add", "mode", "tap", "name", name).CombinedOutput(); err != nil {
		t.Fatalf("add tap %s in %s: %v: %s", name, ns.Name, err, out)
	}
}

func TestTakenOverByVPP(t *testing.T) {
	tests := []struct {
		name   string
		status string // "" writes no info file
		ok     bool
		detail string
	}{
		{"ready", "ready", true, "eth1 taken over by VPP (tap, vppmanagerinfofile: ready)"},
		{"starting", "starting", false, "eth1 is a tap but vppmanagerinfofile: starting (VPP not ready, or a crashed VPP left the tap)"},
		{"no info file", "", false, "eth1 is a tap but vppmanagerinfofile: missing (VPP not ready, or a crashed VPP left the tap)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ns := privtest.NewNetns(t)
			host := newFakeHost(t)
			root := host.root
			if tt.status != "" {
				host.file("/var/run/vpp/vppmanagerinfofile", vppInfo(tt.status))
			}
			rec := health.NewRecorder()
			u, err := New(Options{Interface: "eth1", HostRoot: root, NetnsPath: ns.Path}, testLog(t), prometheus.NewRegistry(), rec)
			if err != nil {
				t.Fatal(err)
			}
			running(t, u)
			if got, ok := rec.WaitFor(health.Uplink, seenWithin, func(r health.Result) bool {
				return strings.HasPrefix(r.Detail, "uplink eth1 not found")
			}); !ok {
				t.Fatalf("before the tap: got %+v; want not found", got)
			}
			addTap(t, ns, "eth1")
			if got, ok := rec.WaitFor(health.Uplink, seenWithin, func(r health.Result) bool {
				return r.OK == tt.ok && r.Detail == tt.detail
			}); !ok {
				t.Fatalf("got %+v; want OK=%v %q", got, tt.ok, tt.detail)
			}
			if got := Check(context.Background(), Options{Interface: "eth1", HostRoot: root, NetnsPath: ns.Path}); len(got) != 1 || got[0].OK != tt.ok || got[0].Detail != tt.detail {
				t.Errorf("Check got %+v; want OK=%v %q", got, tt.ok, tt.detail)
			}
		})
	}
}

var linkNetns = regexp.MustCompile(`link-netns(id)? \S+`)

// netState is everything `ip` shows about a namespace, to prove Check changes nothing.
func netState(t *testing.T, ns *privtest.Netns) string {
	t.Helper()
	var b strings.Builder
	for _, args := range [][]string{{"-d", "link", "show"}, {"addr", "show"}, {"route", "show", "table", "all"}, {"-6", "route", "show", "table", "all"}} {
		cmd := ns.Command("ip", args...)
		var stderr strings.Builder
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("ip %v: %v: %s", args, err, stderr.String())
		}
		// ip names the veth peer's namespace by scanning /run/netns, which other
		// tests change concurrently ("Peer netns reference is invalid" on stderr,
		// link-netnsid instead of link-netns): that is not our namespace's state.
		b.WriteString(linkNetns.ReplaceAllString(string(out), ""))
	}
	return b.String()
}

func TestCheckMissingNamesTheRightInterface(t *testing.T) {
	ns := privtest.NewNetns(t)
	peerNS := privtest.NewNetns(t)
	h := nsHandle(t, ns)
	addVeth(t, h, "eth0", "peer0", peerNS)
	addVeth(t, h, "eth2", "peer2", peerNS)
	eth0 := mustLink(t, h, "eth0")
	eth2 := mustLink(t, h, "eth2")
	for _, err := range []error{
		h.LinkSetUp(eth0),
		h.LinkSetUp(eth2),
		h.AddrAdd(eth0, &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(10, 0, 0, 7), Mask: net.CIDRMask(24, 32)}}),
		h.AddrAdd(eth2, &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(10, 1, 0, 7), Mask: net.CIDRMask(24, 32)}}),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	defaultVia := func(gw net.IP, link netlink.Link) {
		t.Helper()
		if err := h.RouteReplace(&netlink.Route{LinkIndex: link.Attrs().Index, Gw: gw}); err != nil {
			t.Fatalf("default route via %s: %v", link.Attrs().Name, err)
		}
	}
	tests := []struct {
		name   string
		setup  func()
		nodeIP string
		want   string
	}{
		{
			name: "no node ip, no default route", setup: func() {},
			want: "uplink eth1 not found (interfaces: eth0, eth2)",
		},
		{
			name: "node ip only", setup: func() {}, nodeIP: "10.0.0.7",
			want: "uplink eth1 not found; eth0 carries 10.0.0.7 — set uplink.interface: eth0? (interfaces: eth0, eth2)",
		},
		{
			name: "node ip and default route on eth0", setup: func() { defaultVia(net.IPv4(10, 0, 0, 1), eth0) }, nodeIP: "10.0.0.7",
			want: "uplink eth1 not found; eth0 carries 10.0.0.7 and the default route — set uplink.interface: eth0? (interfaces: eth0, eth2)",
		},
		{
			name: "default route elsewhere", setup: func() { defaultVia(net.IPv4(10, 1, 0, 1), eth2) }, nodeIP: "10.0.0.7",
			want: "uplink eth1 not found; eth0 carries 10.0.0.7, eth2 the default route — set uplink.interface: eth0? (interfaces: eth0, eth2)",
		},
		{
			name: "default route only", setup: func() {},
			want: "uplink eth1 not found; eth2 carries the default route — set uplink.interface: eth2? (interfaces: eth0, eth2)",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.setup()
			var nodeIP netip.Addr
			if tt.nodeIP != "" {
				nodeIP = netip.MustParseAddr(tt.nodeIP)
			}
			before := netState(t, ns)
			got := Check(context.Background(), Options{Interface: "eth1", NodeIP: nodeIP, HostRoot: t.TempDir(), NetnsPath: ns.Path})
			if len(got) != 1 || got[0].Name != health.Uplink || got[0].OK || got[0].Detail != tt.want {
				t.Errorf("got %+v; want one failing uplink result %q", got, tt.want)
			}
			if after := netState(t, ns); after != before {
				t.Errorf("Check changed the namespace:\nbefore:\n%s\nafter:\n%s", before, after)
			}
		})
	}
}

func TestUpdateAppliesLive(t *testing.T) {
	ns := privtest.NewNetns(t)
	peerNS := privtest.NewNetns(t)
	h := nsHandle(t, ns)
	addVeth(t, h, "eth0", "peer0", peerNS)

	rec := health.NewRecorder()
	opts := Options{Interface: "eth1", HostRoot: t.TempDir(), NetnsPath: ns.Path}
	u, err := New(opts, testLog(t), prometheus.NewRegistry(), rec)
	if err != nil {
		t.Fatal(err)
	}
	running(t, u)
	if got, ok := rec.WaitFor(health.Uplink, seenWithin, func(r health.Result) bool {
		return r.Detail == "uplink eth1 not found (interfaces: eth0)"
	}); !ok {
		t.Fatalf("got %+v; want eth1 not found", got)
	}
	opts.Interface = "eth0"
	if err := u.Update(opts); err != nil {
		t.Fatalf("Update(interface eth0) got %v; want nil", err)
	}
	if got, ok := rec.WaitFor(health.Uplink, seenWithin, func(r health.Result) bool {
		return r.Detail == "eth0: administratively down, no global address"
	}); !ok {
		t.Fatalf("after Update got %+v; want eth0 judged", got)
	}
	opts.NetnsPath = "/proc/self/ns/net"
	if err := u.Update(opts); !errors.Is(err, health.ErrNeedsRestart) {
		t.Errorf("Update(new netns) got %v; want ErrNeedsRestart", err)
	}
}

// A subscription whose socket fails is re-established, and the check keeps following
// changes through it.
func TestResubscribeAfterSocketError(t *testing.T) {
	ns := privtest.NewNetns(t)
	peerNS := privtest.NewNetns(t)
	h := nsHandle(t, ns)

	var calls atomic.Int32
	broken := make(chan struct{})
	flaky := subscription{name: "link", subscribe: func(p subParams) (<-chan struct{}, error) {
		if calls.Add(1) == 1 {
			// The first socket dies under the watcher, as it does on ENOBUFS.
			killed := make(chan struct{})
			go func(done <-chan struct{}) {
				select {
				case <-broken:
				case <-done:
				}
				close(killed)
			}(p.done)
			p.done = killed
		}
		return subscribeLinks(p)
	}}

	rec := health.NewRecorder()
	u, err := New(Options{Interface: "eth1", HostRoot: t.TempDir(), NetnsPath: ns.Path}, testLog(t), prometheus.NewRegistry(), rec)
	if err != nil {
		t.Fatal(err)
	}
	u.subs = []subscription{flaky} // links only: a change must come through the new socket
	running(t, u)
	if got, ok := rec.WaitFor(health.Uplink, seenWithin, func(r health.Result) bool {
		return strings.HasPrefix(r.Detail, "uplink eth1 not found")
	}); !ok {
		t.Fatalf("got %+v; want not found", got)
	}
	close(broken)
	deadline := time.Now().Add(5 * time.Second)
	for calls.Load() < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("got %d subscribe calls after the socket failed; want a resubscribe", calls.Load())
		}
		time.Sleep(10 * time.Millisecond)
	}
	addVeth(t, h, "eth1", "peer1", peerNS)
	if got, ok := rec.WaitFor(health.Uplink, seenWithin, func(r health.Result) bool {
		return r.Detail == "eth1: administratively down, no global address"
	}); !ok {
		t.Fatalf("after resubscribe got %+v; want the new link seen", got)
	}
}

// Run can be restarted on the same Uplink after it returned, and it logs no change
// when nothing changed across the restart.
func TestRunRestart(t *testing.T) {
	ns := privtest.NewNetns(t)
	rec := health.NewRecorder()
	reg := prometheus.NewRegistry()
	u, err := New(Options{Interface: "eth1", HostRoot: t.TempDir(), NetnsPath: ns.Path}, slog.New(slog.NewTextHandler(io.Discard, nil)), reg, rec)
	if err != nil {
		t.Fatal(err)
	}
	goroutines := runtime.NumGoroutine()
	for i := range 3 {
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- u.Run(ctx) }()
		deadline := time.Now().Add(seenWithin)
		for len(rec.History()) < i+1 && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		if h := rec.History(); len(h) != i+1 || !strings.HasPrefix(h[i].Detail, "uplink eth1 not found") {
			t.Fatalf("run %d: got reports %+v; want a not-found report at start", i, h)
		}
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("run %d: Run returned %v; want nil", i, err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("run %d: Run did not return after cancellation", i)
		}
	}
	// Everything Run started (subscriptions, their sockets' goroutines, the inotify
	// reader) is gone once it returned.
	deadline := time.Now().Add(2 * time.Second)
	for runtime.NumGoroutine() > goroutines && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > goroutines {
		t.Errorf("got %d goroutines after 3 runs; want at most the %d before", n, goroutines)
	}
	if v := metricValue(t, reg, "nodeagent_uplink_changes_total"); v != 0 {
		t.Errorf("changes_total after restarts without change got %v; want 0", v)
	}
	// Each Run reports once at start, but only the first observation is news.
	if n := len(rec.History()); n != 3 {
		t.Errorf("got %d reports over 3 runs without change; want 3 (one at each start)", n)
	}
}

func TestRunFailsOnMissingNamespace(t *testing.T) {
	u, err := New(Options{NetnsPath: filepath.Join(t.TempDir(), "nope")}, slog.New(slog.NewTextHandler(io.Discard, nil)), prometheus.NewRegistry(), health.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if err := u.Run(context.Background()); err == nil || !strings.Contains(err.Error(), "open network namespace") {
		t.Errorf("Run got %v; want an error opening the namespace", err)
	}
}

// The whole life of an uplink under Calico-VPP, with the NIC's sysfs on a temp tree and
// its netdev a veth in a throwaway namespace: a healthy NIC (PCI, driver and NUMA node
// from sysfs), VPP binds it to vfio-pci and removes it, creates the tap, and finally
// vpp-manager writes "ready" (seen through inotify, not a timer).
func TestVPPTakeoverLifecycle(t *testing.T) {
	ns := privtest.NewNetns(t)
	peerNS := privtest.NewNetns(t)
	h := nsHandle(t, ns)
	host := newFakeHost(t)
	host.virtioNIC("eth1", "0000:00:05.0", "virtio3", "1")
	host.pciFunc("0000:00:06.0", "0x020000", "0", "vfio-pci") // another NIC, passed through for something else
	host.symlink("/var/run", "/run")
	host.dir("/run")

	addVeth(t, h, "eth1", "peer1", peerNS)
	eth1 := mustLink(t, h, "eth1")
	for _, err := range []error{
		h.AddrAdd(eth1, &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(10, 0, 0, 7), Mask: net.CIDRMask(24, 32)}}),
		h.LinkSetUp(eth1),
		nsHandle(t, peerNS).LinkSetUp(mustLink(t, nsHandle(t, peerNS), "peer1")),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}

	rec := health.NewRecorder()
	u, err := New(Options{Interface: "eth1", NodeIP: netip.MustParseAddr("10.0.0.7"), HostRoot: host.root, NetnsPath: ns.Path},
		testLog(t), prometheus.NewRegistry(), rec)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := u.NUMANode(); ok {
		t.Errorf("NUMANode before Run got known; want unknown")
	}
	running(t, u)

	wait := func(step string, ok bool, detail string) {
		t.Helper()
		got, seen := rec.WaitFor(health.Uplink, seenWithin, func(r health.Result) bool {
			if prefix, cut := strings.CutSuffix(detail, "…"); cut {
				return r.OK == ok && strings.HasPrefix(r.Detail, prefix)
			}
			return r.OK == ok && r.Detail == detail
		})
		if !seen {
			t.Fatalf("%s: got %+v; want OK=%v %q", step, got, ok, detail)
		}
	}
	// The veth comes up asynchronously; the NIC's device details come from sysfs.
	got, ok := rec.WaitFor(health.Uplink, 5*time.Second, func(r health.Result) bool { return r.OK })
	if want := "eth1: up, carrier, mtu 1500, 10.0.0.7/24 (node address), no default route, pci 0000:00:05.0 driver virtio_net, numa 1, "; !ok || !strings.HasPrefix(got.Detail, want) {
		t.Fatalf("healthy NIC: got %+v; want pci 0000:00:05.0 driver virtio_net, numa 1", got)
	}
	if n, ok := u.NUMANode(); n != 1 || !ok {
		t.Errorf("NUMANode got %d, %v; want 1, true", n, ok)
	}

	// VPP unbinds the NIC from virtio-pci, binds it to vfio-pci: the netdev disappears.
	dev := "/sys/devices/pci0000:00/0000:00:05.0"
	for _, p := range []string{"/sys/class/net/eth1", dev + "/driver", "/sys/bus/pci/drivers/virtio-pci/0000:00:05.0"} {
		if err := os.Remove(filepath.Join(host.root, p)); err != nil {
			t.Fatal(err)
		}
	}
	host.symlink(dev+"/driver", "../../../bus/pci/drivers/vfio-pci")
	host.symlink("/sys/bus/pci/drivers/vfio-pci/0000:00:05.0", "../../../../devices/pci0000:00/0000:00:05.0")
	if err := h.LinkDel(eth1); err != nil {
		t.Fatal(err)
	}
	wait("bound to vfio-pci", false, "eth1 not in the host namespace: pci 0000:00:05.0 bound to vfio-pci (VPP owns it, or a crashed VPP left it there)")
	if n, ok := u.NUMANode(); n != 1 || !ok {
		t.Errorf("NUMANode while vfio-pci holds the NIC got %d, %v; want 1, true (from the PCI function)", n, ok)
	}

	// vpp-manager creates the tap with the uplink's name before it is ready.
	host.file("/run/vpp/vppmanagerinfofile", vppInfo("starting"))
	addTap(t, ns, "eth1")
	wait("tap, starting", false, "eth1 is a tap but vppmanagerinfofile: starting (VPP not ready, or a crashed VPP left the tap)")

	// Written as vpp-manager does: a new file renamed over the old one would be
	// IN_MOVED_TO; os.WriteFile truncates and writes in place (IN_CLOSE_WRITE).
	host.file("/run/vpp/vppmanagerinfofile", vppInfo("ready"))
	wait("ready", true, "eth1 taken over by VPP (tap, vppmanagerinfofile: ready)")
	if _, ok := u.NUMANode(); ok {
		t.Errorf("NUMANode after takeover got known; want unknown (the tap has no device)")
	}
}

func TestRunCancelledAtStart(t *testing.T) {
	ns := privtest.NewNetns(t)
	u, err := New(Options{HostRoot: t.TempDir(), NetnsPath: ns.Path}, slog.New(slog.NewTextHandler(io.Discard, nil)), prometheus.NewRegistry(), health.Discard)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := u.Run(ctx); err != nil {
		t.Errorf("Run with a cancelled context got %v; want nil", err)
	}
}

// A storm of netlink events is gathered into few evaluations, and the last change of
// the storm is still reflected within a second.
func TestEventStormIsDebounced(t *testing.T) {
	ns := privtest.NewNetns(t)
	peerNS := privtest.NewNetns(t)
	h := nsHandle(t, ns)
	addVeth(t, h, "eth1", "peer1", peerNS)
	addVeth(t, h, "eth9", "peer9", peerNS)
	eth1, eth9 := mustLink(t, h, "eth1"), mustLink(t, h, "eth9")
	if err := h.LinkSetUp(eth9); err != nil {
		t.Fatal(err)
	}

	rec := health.NewRecorder()
	u, err := New(Options{Interface: "eth1", HostRoot: t.TempDir(), NetnsPath: ns.Path}, slog.New(slog.NewTextHandler(io.Discard, nil)), prometheus.NewRegistry(), rec)
	if err != nil {
		t.Fatal(err)
	}
	running(t, u)
	if got, ok := rec.WaitFor(health.Uplink, seenWithin, func(r health.Result) bool {
		return r.Detail == "eth1: administratively down, no global address"
	}); !ok {
		t.Fatalf("got %+v; want eth1 down", got)
	}
	time.Sleep(3 * debounceDelay) // let the subscriptions' initial dumps settle
	before := u.evaluations.Load()

	const n = 300
	start := time.Now()
	for i := range n {
		addr := &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(10, 9, byte(i/250), byte(i%250+1)), Mask: net.CIDRMask(16, 32)}}
		if err := h.AddrAdd(eth9, addr); err != nil {
			t.Fatalf("add address %d: %v", i, err)
		}
		route := &netlink.Route{LinkIndex: eth9.Attrs().Index, Dst: &net.IPNet{IP: net.IPv4(10, 200, byte(i/250), byte(i%250)), Mask: net.CIDRMask(32, 32)}}
		if err := h.RouteAdd(route); err != nil {
			t.Fatalf("add route %d: %v", i, err)
		}
	}
	if err := h.LinkSetMTU(eth1, 1280); err != nil {
		t.Fatal(err)
	}
	if got, ok := rec.WaitFor(health.Uplink, seenWithin, func(r health.Result) bool {
		return r.Detail == "eth1: administratively down, mtu 1280 below uplink.min_mtu 1500, no global address"
	}); !ok {
		t.Fatalf("after the storm got %+v; want the MTU change seen", got)
	}
	storm := time.Since(start)
	time.Sleep(3 * debounceDelay)
	evals := u.evaluations.Load() - before
	t.Logf("%d address and %d route events over %v: %d evaluations", n, n, storm.Round(time.Millisecond), evals)
	// One evaluation per debounce window at most, plus the last one.
	if limit := int64(storm/debounceDelay) + 2; evals > limit {
		t.Errorf("got %d evaluations for %d events over %v; want at most %d (one per %v window)", evals, 2*n, storm, limit, debounceDelay)
	}
}

// A subscription socket that overflows under an event storm (ENOBUFS) is
// re-established, and the check converges on the state after the storm within a
// second. The overflow is made certain: the first address subscription has the
// smallest receive buffer the kernel allows and its reader is held until the storm is
// over, so the kernel must drop notifications.
func TestSurvivesSocketOverflow(t *testing.T) {
	ns := privtest.NewNetns(t)
	peerNS := privtest.NewNetns(t)
	h := nsHandle(t, ns)
	addVeth(t, h, "eth1", "peer1", peerNS)
	addVeth(t, h, "eth9", "peer9", peerNS)
	eth1, eth9 := mustLink(t, h, "eth1"), mustLink(t, h, "eth9")

	hold := make(chan struct{})
	var addrCalls atomic.Int32
	heldAddrs := subscription{name: "address", subscribe: func(p subParams) (<-chan struct{}, error) {
		if addrCalls.Add(1) > 1 {
			return subscribeAddrs(p) // the resubscription is the real one
		}
		ch := make(chan netlink.AddrUpdate)
		err := netlink.AddrSubscribeWithOptions(ch, p.done, netlink.AddrSubscribeOptions{
			Namespace: nsOption(p.ns), ErrorCallback: p.onErr, ReceiveBufferSize: 1,
		})
		if err != nil {
			return nil, err
		}
		return forward(ch, func(netlink.AddrUpdate) bool {
			select {
			case <-hold:
			case <-p.done:
			}
			return true
		}), nil
	}}

	rec := health.NewRecorder()
	u, err := New(Options{Interface: "eth1", HostRoot: t.TempDir(), NetnsPath: ns.Path}, testLog(t), prometheus.NewRegistry(), rec)
	if err != nil {
		t.Fatal(err)
	}
	u.subs = []subscription{{name: "link", subscribe: subscribeLinks}, heldAddrs}
	running(t, u)
	if got, ok := rec.WaitFor(health.Uplink, seenWithin, func(r health.Result) bool {
		return r.Detail == "eth1: administratively down, no global address"
	}); !ok {
		t.Fatalf("got %+v; want eth1 down", got)
	}

	const n = 500
	for i := range n {
		addr := &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(10, 9, byte(i/250), byte(i%250+1)), Mask: net.CIDRMask(16, 32)}}
		if err := h.AddrAdd(eth9, addr); err != nil {
			t.Fatalf("add address %d: %v", i, err)
		}
	}
	close(hold)
	deadline := time.Now().Add(3 * time.Second) // the resubscribe waits out its backoff
	for addrCalls.Load() < 2 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := u.resubscribes.Load(); addrCalls.Load() < 2 || got != 1 {
		t.Fatalf("got %d address subscriptions, %d resubscribes after overflowing the socket; want 2 and 1", addrCalls.Load(), got)
	}

	// The address subscription is the only one that sees an address change.
	if err := h.AddrAdd(eth1, &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(10, 0, 0, 7), Mask: net.CIDRMask(24, 32)}}); err != nil {
		t.Fatal(err)
	}
	if got, ok := rec.WaitFor(health.Uplink, seenWithin, func(r health.Result) bool {
		return r.Detail == "eth1: administratively down"
	}); !ok {
		t.Fatalf("after resubscribing got %+v; want the address on eth1 seen", got)
	}
}
