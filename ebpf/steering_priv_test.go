package ebpf

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/nodeagent/nodeagent/test/privtest"
)

// TestSteering dials from helper processes in the "host" namespace, inside and
// outside the cgroup, and checks who answered and what getpeername said.
func TestSteering(t *testing.T) {
	e := newEnv(t)
	e.start(e.options())

	tests := []struct {
		name      string
		inCgroup  bool
		req       dialRequest
		wantReply string // prefix
		wantPeer  string
	}{
		{"ipv4 any port", true, dialRequest{Addr: "169.254.1.2:80"},
			"proxy 169.254.1.2:80 | direct 169.254.1.2:80", "169.254.1.2:80"},
		{"ipv4 exact port", true, dialRequest{Addr: "169.254.1.4:443"},
			"proxy 169.254.1.4:443 | error", "169.254.1.4:443"},
		{"ipv4 other port of exact entry", true, dialRequest{Addr: "169.254.1.4:80"},
			"direct 169.254.1.4:80", "169.254.1.4:80"},
		{"ipv4 unmapped", true, dialRequest{Addr: "169.254.1.9:80"},
			"direct 169.254.1.9:80", "169.254.1.9:80"},
		{"ipv6", true, dialRequest{Addr: "[fd00::2]:80"},
			"proxy [fd00::2]:80 | direct [fd00::2]:80", "[fd00::2]:80"},
		{"ipv6 unmapped", true, dialRequest{Addr: "[fd00::9]:80"},
			"direct [fd00::9]:80", "[fd00::9]:80"},
		{"ipv4-mapped ipv6", true, dialRequest{Addr: "[::ffff:169.254.1.2]:80", Six: true},
			"proxy 169.254.1.2:80 | direct 169.254.1.2:80", "[::ffff:169.254.1.2]:80"},
		{"outside the cgroup", false, dialRequest{Addr: "169.254.1.2:80"},
			"direct 169.254.1.2:80", "169.254.1.2:80"},
		{"outside the cgroup ipv6", false, dialRequest{Addr: "[fd00::2]:80"},
			"direct [fd00::2]:80", "[fd00::2]:80"},
		{"marked upstream socket", true, dialRequest{Addr: "169.254.1.2:80", Mark: true},
			"direct 169.254.1.2:80", "169.254.1.2:80"},
		{"marked upstream socket ipv6", true, dialRequest{Addr: "[fd00::2]:80", Mark: true},
			"direct [fd00::2]:80", "[fd00::2]:80"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			res := e.dial(e.host, tc.inCgroup, tc.req)
			if res.Err != "" {
				t.Fatalf("dial %s: %s", tc.req.Addr, res.Err)
			}
			if !strings.HasPrefix(res.Reply, tc.wantReply) {
				t.Errorf("reply: got %q; want prefix %q", res.Reply, tc.wantReply)
			}
			if res.Peer != tc.wantPeer {
				t.Errorf("getpeername: got %s; want %s", res.Peer, tc.wantPeer)
			}
		})
	}
}

// newPod makes a second namespace joined to the "host" one by a veth pair:
// host side 10.99.0.1/24, pod side 10.99.0.2/24, no other route.
func (e *env) newPod() *privtest.Netns {
	e.t.Helper()
	pod := privtest.NewNetns(e.t)
	e.ip(e.host, "link", "add", "natest-h", "type", "veth", "peer", "name", "natest-p", "netns", pod.Name)
	e.ip(e.host, "addr", "add", podIP.String()+"/24", "dev", "natest-h")
	e.ip(e.host, "link", "set", "natest-h", "up")
	e.ip(pod, "addr", "add", "10.99.0.2/24", "dev", "natest-p")
	e.ip(pod, "link", "set", "natest-p", "up")
	e.listen(e.host, "tcp4", podDst.String(), e.serveProxy)
	return pod
}

// TestPodRedirect: a socket in another namespace goes to pod_redirect; without
// pod_redirect it is left alone and counted.
func TestPodRedirect(t *testing.T) {
	e := newEnv(t)
	pod := e.newPod()
	opts := e.options()
	opts.PodRedirect = podDst
	s, _, reg, _ := e.start(opts)

	res := e.dial(pod, true, dialRequest{Addr: "169.254.1.2:80"})
	if want := "proxy 169.254.1.2:80 | direct 169.254.1.2:80"; res.Err != "" || res.Reply != want {
		t.Errorf("pod dial: got reply %q err %q; want %q", res.Reply, res.Err, want)
	}
	if res.Peer != "169.254.1.2:80" {
		t.Errorf("pod getpeername: got %s; want 169.254.1.2:80", res.Peer)
	}
	res = e.dial(pod, true, dialRequest{Addr: "[::ffff:169.254.1.2]:80", Six: true})
	if want := "proxy 169.254.1.2:80 | direct 169.254.1.2:80"; res.Err != "" || res.Reply != want {
		t.Errorf("pod dial ipv4-mapped: got reply %q err %q; want %q", res.Reply, res.Err, want)
	}
	// A host socket still goes to the loopback listener.
	res = e.dial(e.host, true, dialRequest{Addr: "169.254.1.2:80"})
	if want := "proxy 169.254.1.2:80 | direct 169.254.1.2:80"; res.Reply != want {
		t.Errorf("host dial: got reply %q err %q; want %q", res.Reply, res.Err, want)
	}

	// Live update: no pod_redirect. The pod has no route to 169.254.1.2, so an
	// unsteered dial fails at once.
	opts.PodRedirect = netip.AddrPort{}
	if err := s.Update(opts); err != nil {
		t.Fatalf("Update: %v", err)
	}
	before := metricValue(t, reg, "nodeagent_steering_pod_unsteered_total", nil)
	res = e.dial(pod, true, dialRequest{Addr: "169.254.1.2:80"})
	if !strings.Contains(res.Err, "network is unreachable") {
		t.Errorf("pod dial without pod_redirect: got reply %q err %q; want network is unreachable", res.Reply, res.Err)
	}
	if got := metricValue(t, reg, "nodeagent_steering_pod_unsteered_total", nil); got != before+1 {
		t.Errorf("nodeagent_steering_pod_unsteered_total: got %v; want %v", got, before+1)
	}
}

// metricValue returns the value of the series name{labels} in reg.
func metricValue(t *testing.T, reg *prometheus.Registry, name string, labels map[string]string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if labels[lp.GetName()] != lp.GetValue() {
					continue next
				}
			}
			switch {
			case m.GetCounter() != nil:
				return m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				return m.GetGauge().GetValue()
			}
		}
	}
	t.Fatalf("no series %s%v", name, labels)
	return 0
}
