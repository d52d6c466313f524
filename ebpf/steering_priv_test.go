package ebpf

import (
	"strings"
	"testing"
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
