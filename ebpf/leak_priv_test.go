package ebpf

import (
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

	// Sockets close asynchronously (the proxy side closes first; the client's
	// last ACK may trail); the maps must drain to zero.
	var entries map[string]int
	deadline := time.Now().Add(10 * time.Second)
	for {
		s.mu.Lock()
		entries = mapEntries(s.cur)
		s.mu.Unlock()
		if entries["orig_by_cookie"] == 0 && entries["orig_by_client"] == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if entries["orig_by_cookie"] != 0 || entries["orig_by_client"] != 0 {
		t.Errorf("entries after %d connections: got orig_by_cookie=%d orig_by_client=%d; want 0 and 0",
			n, entries["orig_by_cookie"], entries["orig_by_client"])
	}
	if got := metricValue(t, reg, "nodeagent_steering_redirects_total", map[string]string{"family": "ipv4"}); got < float64(n) {
		t.Errorf("nodeagent_steering_redirects_total{family=ipv4}: got %v; want >= %d", got, n)
	}
	if got := metricValue(t, reg, "nodeagent_steering_map_entries", map[string]string{"map": "orig_by_client"}); got != 0 {
		t.Errorf("nodeagent_steering_map_entries{map=orig_by_client}: got %v; want 0", got)
	}
	if got := metricValue(t, reg, "nodeagent_steering_errors_total", nil); got != 0 {
		t.Errorf("nodeagent_steering_errors_total: got %v; want 0", got)
	}
}
