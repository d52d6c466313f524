package deploytest

import (
	"net"
	"strings"
	"syscall"
	"testing"
	"time"
)

// freeAddrs returns n distinct loopback addresses with ports that were free a moment ago.
func freeAddrs(t *testing.T, names ...string) map[string]string {
	t.Helper()
	addrs := map[string]string{}
	var ls []net.Listener
	for _, n := range names {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
		addrs[n] = l.Addr().String()
	}
	for _, l := range ls {
		l.Close()
	}
	return addrs
}

// The DaemonSet's rolling update (maxSurge, maxUnavailable 0, hostNetwork) runs the new
// pod next to the old one on the same node, binding the same addresses: the second
// process must start and become ready while the first still listens (SO_REUSEPORT),
// and connections must not be refused while the first one stops.
func TestRollingUpdateOverlapOnOneNode(t *testing.T) {
	t.Parallel()
	bin := nodeagentBinary(t)
	addrs := freeAddrs(t, "health", "proxy", "otlp-grpc", "otlp-http")
	cfg := harnessConfig(t, addrs)
	notify := newNotifySocket(t)

	old := startAgent(t, bin, cfg, nil, notify, 0)
	if _, err := notify.waitFor(old.pid, "READY=1", 60*time.Second, old.exited); err != nil {
		t.Fatalf("old pod: %v\n%s", err, old.output())
	}
	d := startDialer([]string{addrs["proxy"], addrs["health"], addrs["otlp-grpc"], addrs["otlp-http"]})

	surge := startAgent(t, bin, cfg, nil, notify, 0)
	if _, err := notify.waitFor(surge.pid, "READY=1", 60*time.Second, surge.exited); err != nil {
		msg := surge.output()
		if strings.Contains(msg, "address already in use") {
			t.Fatalf("the surge pod cannot bind next to the old one (listeners need SO_REUSEPORT):\n%s", msg)
		}
		t.Fatalf("surge pod: %v\n%s", err, msg)
	}
	select {
	case <-old.exited:
		t.Fatalf("the old pod exited when the new one started: %v\n%s", old.err, old.output())
	default:
	}

	// The kubelet stops the old pod once the new one is ready.
	old.cmd.Process.Signal(syscall.SIGTERM)
	if err := old.wait(t, 15*time.Second); err != nil {
		t.Errorf("old pod after SIGTERM: %v; want exit 0", err)
	}
	time.Sleep(300 * time.Millisecond)
	d.finish()
	if len(d.refused) > 0 {
		t.Errorf("%d connections refused during the overlap; want none: %v", len(d.refused), d.refused[:min(len(d.refused), 10)])
	}
	for a, n := range d.resets {
		if a != addrs["proxy"] {
			t.Errorf("%d connects to %s reset; only the proxy resets connections it cannot map", n, a)
		}
	}
	if code, err := httpStatus(addrs["health"], "/healthz"); err != nil || code != 200 {
		t.Errorf("after the old pod stopped, /healthz: %d %v; want 200 from the new pod", code, err)
	}
	checkServed(t, addrs)

	surge.cmd.Process.Signal(syscall.SIGTERM)
	surge.wait(t, 15*time.Second)
}
