package ebpf

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"
)

// TestNoLeak: many sequential short steered connections leave both
// original-destination maps empty once the sockets have closed. 100 000 in a
// full run, 5 000 with -short.
func TestNoLeak(t *testing.T) {
	e := newEnv(t)
	s, _, reg, _ := e.start(e.options())
	e.relay.Store(false)

	n := 100_000
	if testing.Short() {
		n = 5_000
	}
	start := time.Now()
	res := e.dial(e.host, true, dialRequest{Addr: "169.254.1.2:80", Count: n})
	t.Logf("%d connections in %v", res.OK, time.Since(start))
	if res.Err != "" || res.OK != n {
		t.Fatalf("sequential dials: got %d ok, error %q; want %d", res.OK, res.Err, n)
	}
	if res.Reply != "proxy 169.254.1.2:80" {
		t.Errorf("last reply: got %q; want proxy 169.254.1.2:80", res.Reply)
	}
	if m := e.missed.Load(); m != 0 {
		t.Errorf("connections the proxy could not find the original destination of: got %d; want 0", m)
	}

	waitDrained(t, s, fmt.Sprintf("%d connections", n))
	if got := metricValue(t, reg, "nodeagent_steering_redirects_total", map[string]string{"family": "ipv4"}); got < float64(n) {
		t.Errorf("nodeagent_steering_redirects_total{family=ipv4}: got %v; want >= %d", got, n)
	}
	if got := metricValue(t, reg, "nodeagent_steering_map_entries", map[string]string{"map": "orig_by_client"}); got != 0 {
		t.Errorf("nodeagent_steering_map_entries{map=orig_by_client}: got %v; want 0", got)
	}
	if got := metricValue(t, reg, "nodeagent_steering_errors_total", nil); got != 0 {
		t.Errorf("nodeagent_steering_errors_total: got %v; want 0", got)
	}

	// Connections the proxy refuses (nothing listens) never establish; their
	// cookie entries go at TCP_CLOSE too.
	opts := e.options()
	opts.ProxyAddr4 = netip.MustParseAddrPort("127.0.0.1:15999")
	opts.ProxyAddr6 = netip.MustParseAddrPort("[::1]:15999")
	if err := s.Update(opts); err != nil {
		t.Fatalf("Update: %v", err)
	}
	for _, addr := range []string{"169.254.1.2:80", "[fd00::2]:80"} {
		for range 10 {
			if res := e.dial(e.host, true, dialRequest{Addr: addr}); !strings.Contains(res.Err, "connection refused") {
				t.Fatalf("dial %s with no proxy listening: got reply %q err %q; want connection refused", addr, res.Reply, res.Err)
			}
		}
	}
	waitDrained(t, s, "refused connections")
}

// waitDrained waits until both original-destination maps are empty: sockets
// close asynchronously (the client's last ACK may trail the proxy's close).
func waitDrained(t *testing.T, s *Steering, after string) {
	t.Helper()
	var entries map[string]int
	deadline := time.Now().Add(10 * time.Second)
	for {
		s.mu.RLock()
		entries = mapEntries(s.cur)
		s.mu.RUnlock()
		if entries["orig_by_cookie"] == 0 && entries["orig_by_client"] == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if entries["orig_by_cookie"] != 0 || entries["orig_by_client"] != 0 {
		t.Errorf("entries after %s: got orig_by_cookie=%d orig_by_client=%d; want 0 and 0",
			after, entries["orig_by_cookie"], entries["orig_by_client"])
	}
}
