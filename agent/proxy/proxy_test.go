package proxy

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/nodeagent/nodeagent/agent/health"
)

func TestRelayEcho(t *testing.T) {
	for _, mode := range []RelayMode{RelaySplice, RelayCopy} {
		t.Run(string(mode), func(t *testing.T) {
			t.Parallel()
			srv := startServer(t, "127.0.0.1:0", echo)
			h := startProxy(t, Options{Relay: mode, AddressMap: map[string]string{"169.254.7.1:80": srv.addr.String()}})
			h.orig.set("127.0.0.2", "169.254.7.1:80")
			c := h.dial(t, "127.0.0.2")
			msg := make([]byte, 3<<20)
			rand.Read(msg)
			go func() { c.Write(msg); c.CloseWrite() }()
			got, err := io.ReadAll(c)
			if err != nil {
				t.Fatalf("read echo: %v", err)
			}
			if !bytes.Equal(got, msg) {
				t.Fatalf("echo: got %d bytes (equal=%v); want the %d bytes sent", len(got), bytes.Equal(got, msg), len(msg))
			}
			c.Close()
			rec := h.logs.waitRecord(t, "connection", 5*time.Second, func(map[string]any) bool { return true })
			for k, want := range map[string]any{
				"original_dst": "169.254.7.1:80", "mapping": "169.254.7.1:80", "target": srv.addr.String(),
				"endpoint": srv.addr.String(), "bytes_upstream": float64(len(msg)), "bytes_downstream": float64(len(msg)), "reason": "done",
			} {
				if rec[k] != want {
					t.Errorf("access log %s: got %v; want %v", k, rec[k], want)
				}
			}
			if got := h.connections("169.254.7.1:80", resultConnected); got != 1 {
				t.Errorf("connections_total{connected}: got %v; want 1", got)
			}
			if got := testutil.ToFloat64(h.p.m.bytesUp); got != float64(len(msg)) {
				t.Errorf("bytes_total{upstream}: got %v; want %d", got, len(msg))
			}
			if got := testutil.ToFloat64(h.p.m.bytesDown); got != float64(len(msg)) {
				t.Errorf("bytes_total{downstream}: got %v; want %d", got, len(msg))
			}
			waitMetric(t, "active_connections", 0, func() float64 { return testutil.ToFloat64(h.p.m.active) })
			if n := testutil.CollectAndCount(h.p.m.connectDuration); n != 1 {
				t.Errorf("connect_duration_seconds series: got %d; want 1", n)
			}
		})
	}
}

func TestMappingKinds(t *testing.T) {
	t.Parallel()
	// Each server answers with its name, so the test sees where a connection went.
	named := func(name string) func(*net.TCPConn) {
		return func(c *net.TCPConn) { c.Write([]byte(name)) }
	}
	a := startServer(t, "127.0.0.1:0", named("a"))
	b := startServer(t, "127.0.0.1:0", named("b"))
	port := strconv.Itoa(int(b.addr.Port()))
	h := startProxy(t, Options{
		AddressMap: map[string]string{
			"169.254.8.1":         "cluster_a",     // any port
			"169.254.8.1:" + port: b.addr.String(), // the more specific key wins
			"169.254.8.2":         "127.0.0.1",     // host only: keep the original port
			"[fd00::8]:80":        "cluster_a",
		},
		Clusters: map[string]Cluster{"cluster_a": {Endpoints: []string{a.addr.String()}}},
	})
	tests := []struct{ src, dst, want string }{
		{"127.0.0.2", "169.254.8.1:1234", "a"},
		{"127.0.0.3", "169.254.8.1:" + port, "b"},
		{"127.0.0.4", "169.254.8.2:" + port, "b"},
		{"127.0.0.5", "[fd00::8]:80", "a"},
	}
	for _, tt := range tests {
		h.orig.set(tt.src, tt.dst)
		c := h.dial(t, tt.src)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		got, err := io.ReadAll(c)
		if err != nil || string(got) != tt.want {
			t.Errorf("original destination %s: got %q, %v; want %q", tt.dst, got, err, tt.want)
		}
	}
}

func TestNoOpenRelay(t *testing.T) {
	t.Parallel()
	srv := startServer(t, "127.0.0.1:0", echo)
	h := startProxy(t, Options{AddressMap: map[string]string{"169.254.9.1:80": srv.addr.String()}})
	h.orig.set("127.0.0.3", "169.254.9.2:80") // known to steering, but not mapped
	tests := []struct{ src, result string }{
		{"127.0.0.2", resultNoOriginalDst}, // dialled the proxy port directly
		{"127.0.0.3", resultUnmapped},
	}
	for _, tt := range tests {
		start := time.Now()
		err := h.dialReset(t, tt.src, 5*time.Second)
		if !isConnReset(err) {
			t.Errorf("from %s: got %v; want a connection reset", tt.src, err)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("from %s: reset after %v; want it at once", tt.src, d)
		}
		waitMetric(t, "connections_total{none,"+tt.result+"}", 1, func() float64 { return h.connections(mappingNone, tt.result) })
	}
	if n := srv.accepted.Load(); n != 0 {
		t.Errorf("server accepted %d connections; want 0", n)
	}
}

func TestConnectRefusedResetsClient(t *testing.T) {
	t.Parallel()
	var dialled atomic.Int64
	dead := deadPort(t)
	h := startProxy(t, Options{
		AddressMap:         map[string]string{"169.254.10.1:80": dead},
		MaxConnectAttempts: 3,
		DialControl: func(network, address string, c syscall.RawConn) error {
			dialled.Add(1)
			return nil
		},
	})
	h.orig.set("127.0.0.2", "169.254.10.1:80")
	start := time.Now()
	if err := h.dialReset(t, "127.0.0.2", 5*time.Second); !isConnReset(err) {
		t.Fatalf("got %v; want a connection reset", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("reset after %v; want it promptly", d)
	}
	waitMetric(t, "connections_total{connect_failed}", 1, func() float64 { return h.connections("169.254.10.1:80", resultConnectFailed) })
	if got := dialled.Load(); got != 3 {
		t.Errorf("upstream dials through DialControl: got %d; want 3 (max_connect_attempts)", got)
	}
}

// fullBacklogListener returns a listening address whose accept queue is full,
// so a further connect gets no SYN-ACK and hangs until the dialer gives up.
func fullBacklogListener(t *testing.T) string {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, _ := syscall.Getsockname(fd)
	addr := fmt.Sprintf("127.0.0.1:%d", sa.(*syscall.SockaddrInet4).Port)
	// Fill the queue (backlog 0 holds one connection) and check it is full.
	for i := 0; ; i++ {
		c, err := net.DialTimeout("tcp", addr, 300*time.Millisecond)
		if err != nil {
			return addr
		}
		t.Cleanup(func() { c.Close() })
		if i > 8 {
			t.Fatal("accept queue never filled")
		}
	}
}

func TestConnectTimeout(t *testing.T) {
	t.Parallel()
	blackhole := fullBacklogListener(t)
	h := startProxy(t, Options{
		AddressMap:         map[string]string{"169.254.11.1:80": blackhole},
		ConnectTimeout:     200 * time.Millisecond,
		MaxConnectAttempts: 2,
	})
	h.orig.set("127.0.0.2", "169.254.11.1:80")
	start := time.Now()
	if err := h.dialReset(t, "127.0.0.2", 5*time.Second); !isConnReset(err) {
		t.Fatalf("got %v; want a connection reset", err)
	}
	d := time.Since(start)
	if d < 350*time.Millisecond || d > 3*time.Second {
		t.Errorf("reset after %v; want about 2 attempts × 200ms", d)
	}
	waitMetric(t, "connections_total{connect_failed}", 1, func() float64 { return h.connections("169.254.11.1:80", resultConnectFailed) })
}

func TestIdleTimeout(t *testing.T) {
	t.Parallel()
	srv := startServer(t, "127.0.0.1:0", echo)
	h := startProxy(t, Options{AddressMap: map[string]string{"169.254.12.1:80": srv.addr.String()}, IdleTimeout: 300 * time.Millisecond})
	h.orig.set("127.0.0.2", "169.254.12.1:80")

	// A busy connection outlives the idle timeout.
	busy := h.dial(t, "127.0.0.2")
	buf := make([]byte, 4)
	var start time.Time
	for i := range 10 {
		if i > 0 {
			time.Sleep(100 * time.Millisecond)
		}
		if _, err := busy.Write([]byte("ping")); err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
		busy.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(busy, buf); err != nil {
			t.Fatalf("busy connection, round %d: %v", i, err)
		}
		start = time.Now()
	}
	// Then, silent, it is closed after about the idle timeout.
	busy.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := busy.Read(buf); err != io.EOF {
		t.Fatalf("idle connection: got %d, %v; want EOF", n, err)
	}
	if d := time.Since(start); d < 250*time.Millisecond || d > 2*time.Second {
		t.Errorf("closed after %v of silence; want about 300ms", d)
	}
	h.logs.waitRecord(t, "connection", 5*time.Second, func(r map[string]any) bool { return r["reason"] == "idle_timeout" })
}

func TestMaxConnectionDuration(t *testing.T) {
	t.Parallel()
	srv := startServer(t, "127.0.0.1:0", echo)
	h := startProxy(t, Options{AddressMap: map[string]string{"169.254.13.1:80": srv.addr.String()}, MaxConnectionDuration: 400 * time.Millisecond})
	h.orig.set("127.0.0.2", "169.254.13.1:80")
	c := h.dial(t, "127.0.0.2")
	start := time.Now()
	buf := make([]byte, 4)
	var err error
	for time.Since(start) < 5*time.Second {
		if _, err = c.Write([]byte("ping")); err != nil {
			break
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err = io.ReadFull(c, buf); err != nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if d := time.Since(start); d < 350*time.Millisecond || d > 2*time.Second {
		t.Errorf("busy connection ended after %v (%v); want about 400ms", d, err)
	}
	h.logs.waitRecord(t, "connection", 5*time.Second, func(r map[string]any) bool { return r["reason"] == "max_duration" })
}

func TestHalfClose(t *testing.T) {
	t.Parallel()
	// Server: reads everything until FIN, then answers with the byte count and
	// closes; the answer must still reach a client that already shut down writing.
	countThenClose := func(c *net.TCPConn) {
		n, _ := io.Copy(io.Discard, c)
		fmt.Fprintf(c, "got %d", n)
	}
	// Server: says hello and shuts down writing, then reads what the client sends
	// after that and acknowledges it on a fresh... no: it can no longer write, so it
	// records what it read.
	var afterFIN sync.Map
	helloThenRead := func(c *net.TCPConn) {
		c.Write([]byte("hello"))
		c.CloseWrite()
		b, _ := io.ReadAll(c)
		afterFIN.Store("data", string(b))
	}
	s1 := startServer(t, "127.0.0.1:0", countThenClose)
	s2 := startServer(t, "127.0.0.1:0", helloThenRead)
	for _, mode := range []RelayMode{RelaySplice, RelayCopy} {
		t.Run(string(mode), func(t *testing.T) {
			h := startProxy(t, Options{Relay: mode, AddressMap: map[string]string{
				"169.254.14.1:80": s1.addr.String(),
				"169.254.14.2:80": s2.addr.String(),
			}})
			h.orig.set("127.0.0.2", "169.254.14.1:80")
			h.orig.set("127.0.0.3", "169.254.14.2:80")

			// client → target FIN; target → client keeps flowing.
			c := h.dial(t, "127.0.0.2")
			c.Write(bytes.Repeat([]byte("x"), 100000))
			if err := c.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			got, err := io.ReadAll(c)
			if err != nil || string(got) != "got 100000" {
				t.Errorf("after client FIN: got %q, %v; want %q", got, err, "got 100000")
			}

			// target → client FIN; client → target keeps flowing.
			afterFIN.Delete("data")
			c2 := h.dial(t, "127.0.0.3")
			c2.SetReadDeadline(time.Now().Add(5 * time.Second))
			hello, err := io.ReadAll(c2) // ends at the server's FIN
			if err != nil || string(hello) != "hello" {
				t.Fatalf("before server FIN: got %q, %v; want %q", hello, err, "hello")
			}
			c2.Write([]byte("still here"))
			c2.CloseWrite()
			deadline := time.Now().Add(5 * time.Second)
			for {
				if v, ok := afterFIN.Load("data"); ok {
					if v != "still here" {
						t.Errorf("server read after its FIN: got %q; want %q", v, "still here")
					}
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("server never saw the client's data and FIN")
				}
				time.Sleep(5 * time.Millisecond)
			}
		})
	}
}

func TestDeadEndpointSkipped(t *testing.T) {
	t.Parallel()
	alive := startServer(t, "127.0.0.1:0", func(c *net.TCPConn) { c.Write([]byte("ok")) })
	dead := deadPort(t)
	var mu sync.Mutex
	dials := map[string]int{}
	h := startProxy(t, Options{
		AddressMap: map[string]string{"169.254.15.1:80": "c"},
		Clusters:   map[string]Cluster{"c": {Endpoints: []string{dead, alive.addr.String()}, LBPolicy: RoundRobin}},
		DialControl: func(network, address string, c syscall.RawConn) error {
			mu.Lock()
			dials[address]++
			mu.Unlock()
			return nil
		},
	})
	h.orig.set("127.0.0.2", "169.254.15.1:80")
	for i := range 10 {
		c := h.dial(t, "127.0.0.2")
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		got, err := io.ReadAll(c)
		if err != nil || string(got) != "ok" {
			t.Fatalf("connection %d: got %q, %v; want %q", i, got, err, "ok")
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if dials[dead] != 1 {
		t.Errorf("dials to the dead endpoint: got %d; want 1 (then skipped during its backoff)", dials[dead])
	}
	if dials[alive.addr.String()] != 10 {
		t.Errorf("dials to the live endpoint: got %d; want 10", dials[alive.addr.String()])
	}
	// The health check names nothing while one endpoint lives.
	if res, _ := h.rec.WaitFor(health.Proxy, 5*time.Second, func(r health.Result) bool { return r.OK }); !res.OK {
		t.Errorf("health: got %+v; want OK with one live endpoint", res)
	}
}

func TestClusterAllDeadUnhealthy(t *testing.T) {
	t.Parallel()
	h := startProxy(t, Options{
		AddressMap: map[string]string{"169.254.16.1:80": "c"},
		Clusters:   map[string]Cluster{"c": {Endpoints: []string{deadPort(t), deadPort(t)}}},
	})
	h.orig.set("127.0.0.2", "169.254.16.1:80")
	if err := h.dialReset(t, "127.0.0.2", 5*time.Second); !isConnReset(err) {
		t.Fatalf("got %v; want a reset", err)
	}
	res, ok := h.rec.WaitFor(health.Proxy, 5*time.Second, func(r health.Result) bool { return !r.OK })
	if !ok || !bytes.Contains([]byte(res.Detail), []byte("cluster c: no live endpoint")) {
		t.Errorf("health: got %+v; want not OK naming cluster c", res)
	}
}

func TestLoadBalancing(t *testing.T) {
	t.Parallel()
	// hold keeps each connection open until release is closed, so least_conn
	// sees the active counts.
	release := make(chan struct{})
	t.Cleanup(func() {
		select {
		case <-release:
		default:
			close(release)
		}
	})
	var servers []*server
	for i := range 3 {
		servers = append(servers, startServer(t, "127.0.0.1:0", func(c *net.TCPConn) {
			c.Write([]byte{byte('0' + i)})
			<-release
		}))
	}
	eps := []string{servers[0].addr.String(), servers[1].addr.String(), servers[2].addr.String()}
	h := startProxy(t, Options{
		AddressMap: map[string]string{"169.254.17.1:80": "rr", "169.254.17.2:80": "lc", "169.254.17.3:80": "rnd"},
		Clusters: map[string]Cluster{
			"rr":  {Endpoints: eps, LBPolicy: RoundRobin},
			"lc":  {Endpoints: eps, LBPolicy: LeastConn},
			"rnd": {Endpoints: eps, LBPolicy: Random},
		},
	})
	h.orig.set("127.0.0.2", "169.254.17.1:80")
	h.orig.set("127.0.0.3", "169.254.17.2:80")
	h.orig.set("127.0.0.4", "169.254.17.3:80")
	which := func(src string) int {
		c := h.dial(t, src)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		b := make([]byte, 1)
		if _, err := io.ReadFull(c, b); err != nil {
			t.Fatalf("from %s: %v", src, err)
		}
		return int(b[0] - '0')
	}
	counts := func(src string, n int) [3]int {
		var c [3]int
		for range n {
			c[which(src)]++
		}
		return c
	}
	if got := counts("127.0.0.2", 9); got != [3]int{3, 3, 3} {
		t.Errorf("round_robin over 9 connections: got %v; want [3 3 3]", got)
	}
	// rr left 3 open per endpoint; least_conn evens that out including its own.
	if got := counts("127.0.0.3", 6); got != [3]int{2, 2, 2} {
		t.Errorf("least_conn over 6 connections: got %v; want [2 2 2]", got)
	}
	got := counts("127.0.0.4", 60)
	for i, n := range got {
		if n == 0 {
			t.Errorf("random over 60 connections: endpoint %d never chosen (%v)", i, got)
		}
	}
}

// switchResolver answers every name with the address it currently holds.
type switchResolver struct {
	mu      sync.Mutex
	addr    netip.Addr
	err     error
	lookups atomic.Int64
}

func (r *switchResolver) set(a string, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if a != "" {
		r.addr = netip.MustParseAddr(a)
	}
	r.err = err
}

func (r *switchResolver) LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error) {
	r.lookups.Add(1)
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.err != nil {
		return nil, r.err
	}
	return []netip.Addr{r.addr}, nil
}

func TestDNSTargetReresolved(t *testing.T) {
	t.Parallel()
	// Two servers on the same port at two loopback addresses.
	var s1, s2 *server
	for try := 0; ; try++ {
		s1 = startServer(t, "127.0.0.21:0", func(c *net.TCPConn) { c.Write([]byte("one")) })
		var err error
		ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.22:%d", s1.addr.Port()))
		if err == nil {
			ln.Close()
			s2 = startServer(t, fmt.Sprintf("127.0.0.22:%d", s1.addr.Port()), func(c *net.TCPConn) { c.Write([]byte("two")) })
			break
		}
		if try > 10 {
			t.Fatal(err)
		}
	}
	res := &switchResolver{}
	res.set("127.0.0.21", nil)
	h := startProxy(t, Options{
		AddressMap: map[string]string{"169.254.18.1": "svc.example.test"}, // keep the original port
		Resolver:   res,
		DNSRefresh: 100 * time.Millisecond,
	})
	h.orig.set("127.0.0.2", netip.AddrPortFrom(netip.MustParseAddr("169.254.18.1"), s2.addr.Port()).String())
	get := func() string {
		c := h.dial(t, "127.0.0.2")
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		b, _ := io.ReadAll(c)
		return string(b)
	}
	if got := get(); got != "one" {
		t.Fatalf("first answer: got %q; want %q", got, "one")
	}
	res.set("127.0.0.22", nil)
	deadline := time.Now().Add(5 * time.Second)
	for get() != "two" {
		if time.Now().After(deadline) {
			t.Fatal("target never followed the new DNS answer")
		}
		time.Sleep(50 * time.Millisecond)
	}
	// A failing resolver keeps the last answer (and the check says so).
	res.set("", errors.New("server misbehaving"))
	r, ok := h.rec.WaitFor(health.Proxy, 5*time.Second, func(r health.Result) bool { return r.OK })
	if !ok {
		t.Errorf("health with a stale answer: got %+v; want OK", r)
	}
	if got := get(); got != "two" {
		t.Errorf("during a DNS outage: got %q; want the last answer %q", got, "two")
	}
}

func TestDNSNeverResolvedUnhealthy(t *testing.T) {
	t.Parallel()
	res := &switchResolver{}
	res.set("", errors.New("no such host"))
	h := startProxy(t, Options{
		AddressMap:     map[string]string{"169.254.19.1:80": "nowhere.example.test:80"},
		Resolver:       res,
		ConnectTimeout: 300 * time.Millisecond,
	})
	r, ok := h.rec.WaitFor(health.Proxy, 5*time.Second, func(r health.Result) bool { return !r.OK })
	if !ok || !bytes.Contains([]byte(r.Detail), []byte("nowhere.example.test")) {
		t.Errorf("health: got %+v; want not OK naming the name", r)
	}
	h.orig.set("127.0.0.2", "169.254.19.1:80")
	if err := h.dialReset(t, "127.0.0.2", 5*time.Second); !isConnReset(err) {
		t.Errorf("got %v; want a reset", err)
	}
	waitMetric(t, "connections_total{unresolved}", 1, func() float64 { return h.connections("169.254.19.1:80", resultUnresolved) })
}

// stream sends size random bytes in chunks through c (an echo) while reading the
// echo, and compares checksums.
func stream(c *net.TCPConn, size int, pause time.Duration) error {
	sum := sha256.New()
	errc := make(chan error, 1)
	go func() {
		buf := make([]byte, 16<<10)
		left := size
		for left > 0 {
			n := min(left, len(buf))
			rand.Read(buf[:n])
			sum.Write(buf[:n])
			if _, err := c.Write(buf[:n]); err != nil {
				errc <- fmt.Errorf("write: %w", err)
				return
			}
			left -= n
			time.Sleep(pause)
		}
		errc <- c.CloseWrite()
	}()
	back := sha256.New()
	c.SetReadDeadline(time.Now().Add(60 * time.Second))
	n, err := io.Copy(back, c)
	if werr := <-errc; werr != nil {
		return werr
	}
	if err != nil {
		return fmt.Errorf("read after %d bytes: %w", n, err)
	}
	if n != int64(size) || !bytes.Equal(sum.Sum(nil), back.Sum(nil)) {
		return fmt.Errorf("echo: got %d bytes (checksum match %v); want %d", n, bytes.Equal(sum.Sum(nil), back.Sum(nil)), size)
	}
	return nil
}

func TestReloadUnderLoad(t *testing.T) {
	t.Parallel()
	srv := startServer(t, "127.0.0.1:0", echo)
	other := startServer(t, "127.0.0.1:0", func(c *net.TCPConn) { c.Write([]byte("new")) })
	base := func(i int) Options {
		o := Options{
			AddressMap:   map[string]string{"169.254.20.1:80": "c"},
			Clusters:     map[string]Cluster{"c": {Endpoints: []string{srv.addr.String()}}},
			DrainTimeout: 100 * time.Millisecond,
			IdleTimeout:  time.Minute,
		}
		// Every reload adds a mapping of its own and changes another cluster.
		o.AddressMap[fmt.Sprintf("169.254.21.%d:80", i)] = other.addr.String()
		o.Clusters[fmt.Sprintf("extra%d", i)] = Cluster{Endpoints: []string{other.addr.String()}, LBPolicy: LeastConn}
		return o
	}
	h := startProxy(t, base(0))
	h.orig.set("127.0.0.2", "169.254.20.1:80")
	const conns = 200
	var wg sync.WaitGroup
	errs := make(chan error, conns)
	started := make(chan struct{}, conns)
	for i := range conns {
		c := h.dial(t, "127.0.0.2")
		wg.Go(func() {
			started <- struct{}{}
			if err := stream(c, 256<<10, 2*time.Millisecond); err != nil {
				errs <- fmt.Errorf("connection %d: %w", i, err)
			}
		})
	}
	for range conns {
		<-started
	}
	for i := 1; i <= 10; i++ {
		o := base(i)
		o.Relay = RelayCopy // even the relay mode of new connections may change
		if i%2 == 0 {
			o.Relay = RelaySplice
		}
		if err := h.p.Update(o); err != nil {
			t.Fatalf("reload %d: %v", i, err)
		}
		// The new mapping applies to the next connection at once.
		src := fmt.Sprintf("127.0.1.%d", i)
		h.orig.set(src, fmt.Sprintf("169.254.21.%d:80", i))
		c := h.dial(t, src)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if b, err := io.ReadAll(c); err != nil || string(b) != "new" {
			t.Errorf("reload %d: new mapping: got %q, %v; want %q", i, b, err, "new")
		}
		time.Sleep(30 * time.Millisecond)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if got := h.connections("169.254.20.1:80", resultConnected); got != conns {
		t.Errorf("connections_total{connected}: got %v; want %d", got, conns)
	}
}

func TestDrainRemovedMapping(t *testing.T) {
	t.Parallel()
	srv := startServer(t, "127.0.0.1:0", echo)
	opts := Options{
		AddressMap: map[string]string{
			"169.254.22.1:80": srv.addr.String(),
			"169.254.22.2:80": srv.addr.String(),
		},
		DrainTimeout: 300 * time.Millisecond,
	}
	h := startProxy(t, opts)
	h.orig.set("127.0.0.2", "169.254.22.1:80")
	h.orig.set("127.0.0.3", "169.254.22.2:80")
	kept := h.dial(t, "127.0.0.2")
	removed := h.dial(t, "127.0.0.3")
	ping := func(c *net.TCPConn) error {
		if _, err := c.Write([]byte("ping")); err != nil {
			return err
		}
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		_, err := io.ReadFull(c, make([]byte, 4))
		return err
	}
	for _, c := range []*net.TCPConn{kept, removed} {
		if err := ping(c); err != nil {
			t.Fatal(err)
		}
	}
	opts.AddressMap = map[string]string{"169.254.22.1:80": srv.addr.String()}
	if err := h.p.Update(opts); err != nil {
		t.Fatal(err)
	}
	// Until the drain timeout, both keep working.
	if err := ping(removed); err != nil {
		t.Errorf("removed mapping's connection right after reload: %v; want it to keep working", err)
	}
	// New connections to the removed mapping are refused.
	h.orig.set("127.0.0.4", "169.254.22.2:80")
	if err := h.dialReset(t, "127.0.0.4", 5*time.Second); !isConnReset(err) {
		t.Errorf("new connection to removed mapping: got %v; want a reset", err)
	}
	h.logs.waitRecord(t, "connection", 5*time.Second, func(r map[string]any) bool {
		return r["reason"] == "drain_timeout" && r["mapping"] == "169.254.22.2:80"
	})
	if err := ping(kept); err != nil {
		t.Errorf("kept mapping's connection after the drain: %v", err)
	}
}

func TestGracefulShutdown(t *testing.T) {
	t.Parallel()
	srv := startServer(t, "127.0.0.1:0", echo)
	h := startProxy(t, Options{
		AddressMap:    map[string]string{"169.254.23.1:80": srv.addr.String()},
		ShutdownGrace: 500 * time.Millisecond,
	})
	h.orig.set("127.0.0.2", "169.254.23.1:80")
	c := h.dial(t, "127.0.0.2")
	c.Write([]byte("ping"))
	io.ReadFull(c, make([]byte, 4))

	stopped := make(chan error, 1)
	start := time.Now()
	go func() { stopped <- h.stop() }()
	time.Sleep(100 * time.Millisecond)
	// During the grace period the connection still works.
	c.Write([]byte("pong"))
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := io.ReadFull(c, make([]byte, 4)); err != nil {
		t.Errorf("during grace: %v; want the connection to keep working", err)
	}
	if err := <-stopped; err != nil {
		t.Errorf("Run: got %v; want nil", err)
	}
	if d := time.Since(start); d < 450*time.Millisecond || d > 5*time.Second {
		t.Errorf("Run returned after %v; want about the 500ms grace", d)
	}
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Error("connection still open after the grace period")
	}
	if r, _ := h.rec.Last(health.Proxy); r.OK {
		t.Errorf("health after stop: got %+v; want not OK", r)
	}
	h.logs.waitRecord(t, "connection", 5*time.Second, func(r map[string]any) bool { return r["reason"] == "shutdown" })
}

func TestShutdownWithoutConnectionsIsQuick(t *testing.T) {
	t.Parallel()
	h := startProxy(t, Options{ShutdownGrace: time.Minute})
	start := time.Now()
	if err := h.stop(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("Run took %v to return with no connections; want it at once", d)
	}
}

func TestRunRestartsOnBorrowedListener(t *testing.T) {
	t.Parallel()
	srv := startServer(t, "127.0.0.1:0", func(c *net.TCPConn) { c.Write([]byte("ok")) })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	orig := newFakeOrig()
	orig.set("127.0.0.2", "169.254.24.1:80")
	p, err := New(Options{
		Listeners: []net.Listener{ln}, OriginalDst: orig,
		AddressMap: map[string]string{"169.254.24.1:80": srv.addr.String()},
	}, nil, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	for round := range 3 {
		ctx, cancel := context.WithCancel(context.Background())
		errc := make(chan error, 1)
		go func() { errc <- p.Run(ctx) }()
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.2")}}
		c, err := d.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		b, err := io.ReadAll(c)
		c.Close()
		if string(b) != "ok" {
			t.Errorf("round %d: got %q, %v; want %q", round, b, err, "ok")
		}
		cancel()
		if err := <-errc; err != nil {
			t.Fatalf("round %d: Run: %v", round, err)
		}
	}
}

func TestListenReusePortAndRestartOnListenChange(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ap := ln.Addr().(*net.TCPAddr).AddrPort()
	ln.Close()
	opts := Options{Listen: []netip.AddrPort{ap}, OriginalDst: newFakeOrig()}
	rec := health.NewRecorder()
	p, err := New(opts, nil, nil, rec)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- p.Run(ctx) }()
	if r, ok := rec.WaitFor(health.Proxy, 5*time.Second, func(r health.Result) bool { return r.OK }); !ok {
		t.Fatalf("health: got %+v; want OK", r)
	}
	// A second agent (rolling update) can bind the same address.
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		c.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, 0xf /* SO_REUSEPORT */, 1) })
		return serr
	}}
	ln2, err := lc.Listen(context.Background(), "tcp", ap.String())
	if err != nil {
		t.Errorf("second SO_REUSEPORT listener on %s: %v; want it to bind", ap, err)
	} else {
		ln2.Close()
	}
	// Same listen addresses: applied live. Different: needs a restart.
	if err := p.Update(opts); err != nil {
		t.Errorf("Update with the same listen addresses: got %v; want nil", err)
	}
	opts.Listen = []netip.AddrPort{netip.AddrPortFrom(ap.Addr(), ap.Port()+1)}
	if err := p.Update(opts); !errors.Is(err, health.ErrNeedsRestart) {
		t.Errorf("Update with new listen addresses: got %v; want ErrNeedsRestart", err)
	}
	cancel()
	if err := <-errc; err != nil {
		t.Errorf("Run: %v", err)
	}
}

func TestRunFailsWhenAddressTaken(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0") // no SO_REUSEPORT: blocks the bind
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	rec := health.NewRecorder()
	p, err := New(Options{Listen: []netip.AddrPort{ln.Addr().(*net.TCPAddr).AddrPort()}, OriginalDst: newFakeOrig()}, nil, nil, rec)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Run(context.Background()); err == nil {
		t.Fatal("Run on a taken address: got nil; want an error")
	}
	if r, _ := rec.Last(health.Proxy); r.OK {
		t.Errorf("health: got %+v; want not OK", r)
	}
}

// flakyListener fails Accept with EMFILE a number of times, recording when.
type flakyListener struct {
	*net.TCPListener
	mu    sync.Mutex
	fails int
	at    []time.Time
}

func (l *flakyListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	if l.fails > 0 {
		l.fails--
		l.at = append(l.at, time.Now())
		l.mu.Unlock()
		return nil, &net.OpError{Op: "accept", Net: "tcp", Err: syscall.EMFILE}
	}
	l.mu.Unlock()
	return l.TCPListener.Accept()
}

func TestAcceptErrorsBackOff(t *testing.T) {
	t.Parallel()
	srv := startServer(t, "127.0.0.1:0", func(c *net.TCPConn) { c.Write([]byte("ok")) })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	fl := &flakyListener{TCPListener: ln.(*net.TCPListener), fails: 8}
	orig := newFakeOrig()
	orig.set("127.0.0.2", "169.254.25.1:80")
	logs := &logBuf{}
	p, err := New(Options{
		Listeners: []net.Listener{fl}, OriginalDst: orig,
		AddressMap: map[string]string{"169.254.25.1:80": srv.addr.String()},
	}, slogJSON(logs), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	errc := make(chan error, 1)
	go func() { errc <- p.Run(ctx) }()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.2")}}
	c, err := d.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	b, err := io.ReadAll(c)
	if string(b) != "ok" {
		t.Fatalf("after accept errors: got %q, %v; want %q", b, err, "ok")
	}
	fl.mu.Lock()
	at := append([]time.Time(nil), fl.at...)
	fl.mu.Unlock()
	// Gaps double from 5ms: 5, 10, 20, 40, 80, 160, 320 ms.
	for i := 1; i < len(at); i++ {
		want := acceptBackoffMin << (i - 1)
		if gap := at[i].Sub(at[i-1]); gap < want*9/10 {
			t.Errorf("gap before failed accept %d: got %v; want at least %v", i, gap, want)
		}
	}
	if got := testutil.ToFloat64(p.m.acceptErrors); got != 8 {
		t.Errorf("accept_errors_total: got %v; want 8", got)
	}
	// Logged at a bounded rate: 8 failures within ~0.6s give one line.
	if n := len(logs.records("accept failed; backing off")); n != 1 {
		t.Errorf("accept failure log lines: got %d; want 1", n)
	}
	cancel()
	if err := <-errc; err != nil {
		t.Errorf("Run: %v", err)
	}
}

func TestIdleConnectionsHoldNoPipes(t *testing.T) {
	t.Parallel()
	srv := startServer(t, "127.0.0.1:0", echo)
	h := startProxy(t, Options{Relay: RelaySplice, AddressMap: map[string]string{"169.254.26.1:80": srv.addr.String()}})
	h.orig.set("127.0.0.2", "169.254.26.1:80")
	const n = 100
	for i := range n {
		c := h.dial(t, "127.0.0.2")
		msg := []byte(fmt.Sprintf("hello %d", i))
		c.Write(msg)
		if _, err := io.ReadFull(c, make([]byte, len(msg))); err != nil {
			t.Fatal(err)
		}
	}
	waitMetric(t, "active_connections", n, func() float64 { return testutil.ToFloat64(h.p.m.active) })
	// The last burst of each direction returns its pipe right after the echo.
	waitMetric(t, fmt.Sprintf("pipes held by %d idle connections", n), 0, func() float64 {
		h.p.pipes.mu.Lock()
		defer h.p.pipes.mu.Unlock()
		return float64(h.p.pipes.open.Load() - int64(len(h.p.pipes.free)))
	})
}

func TestCheck(t *testing.T) {
	t.Parallel()
	alive := startServer(t, "127.0.0.1:0", func(*net.TCPConn) {})
	res := &switchResolver{}
	res.set("127.0.0.1", nil)
	good := Options{
		Listen:     []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:15001")},
		AddressMap: map[string]string{"169.254.27.1": "c", "169.254.27.2:80": "svc.example.test:80"},
		Clusters:   map[string]Cluster{"c": {Endpoints: []string{deadPort(t), alive.addr.String()}}},
		Resolver:   res,
	}
	tests := []struct {
		name   string
		mutate func(*Options)
		ok     bool
		detail string
	}{
		{"good", func(*Options) {}, true, "1 clusters reachable"},
		{"invalid", func(o *Options) { o.AddressMap = map[string]string{"x": "y"} }, false, "proxy.address_map"},
		{"dead cluster", func(o *Options) { o.Clusters = map[string]Cluster{"c": {Endpoints: []string{deadPort(t)}}} }, false, "cluster c: no endpoint answers"},
		{"foreign listen", func(o *Options) { o.Listen = []netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:15001")} }, false, "not on this host"},
		{"unresolvable", func(o *Options) { o.Resolver = &switchResolver{err: errors.New("no such host")} }, false, "resolve svc.example.test"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := good
			o.AddressMap = map[string]string{}
			for k, v := range good.AddressMap {
				o.AddressMap[k] = v
			}
			tt.mutate(&o)
			got := Check(context.Background(), o)
			if len(got) != 1 || got[0].Name != health.Proxy || got[0].OK != tt.ok || !bytes.Contains([]byte(got[0].Detail), []byte(tt.detail)) {
				t.Errorf("got %+v; want one %s result OK=%v with %q", got, health.Proxy, tt.ok, tt.detail)
			}
		})
	}
}

func TestListenerSocketOptionsInherited(t *testing.T) {
	t.Parallel()
	p, err := New(Options{OriginalDst: newFakeOrig()}, nil, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	lns, owned, err := p.listen(context.Background(), Options{Listen: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:0")}})
	if err != nil {
		t.Fatal(err)
	}
	defer lns[0].Close()
	if !owned[0] {
		t.Error("bound listener: got borrowed; want owned")
	}
	go func() {
		if c, err := net.Dial("tcp", lns[0].Addr().String()); err == nil {
			time.Sleep(time.Second)
			c.Close()
		}
	}()
	c, err := lns[0].Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	raw, _ := c.(*net.TCPConn).SyscallConn()
	for _, o := range []struct {
		name          string
		level, option int
		want          int
	}{
		{"SO_KEEPALIVE", syscall.SOL_SOCKET, syscall.SO_KEEPALIVE, 1},
		{"TCP_KEEPIDLE", syscall.IPPROTO_TCP, syscall.TCP_KEEPIDLE, int(keepAlive.Idle / time.Second)},
		{"TCP_KEEPINTVL", syscall.IPPROTO_TCP, syscall.TCP_KEEPINTVL, int(keepAlive.Interval / time.Second)},
		{"TCP_KEEPCNT", syscall.IPPROTO_TCP, syscall.TCP_KEEPCNT, keepAlive.Count},
		{"TCP_NODELAY", syscall.IPPROTO_TCP, syscall.TCP_NODELAY, 1},
	} {
		var got int
		var gerr error
		raw.Control(func(fd uintptr) { got, gerr = syscall.GetsockoptInt(int(fd), o.level, o.option) })
		if gerr != nil || got != o.want {
			t.Errorf("accepted socket %s: got %d, %v; want %d", o.name, got, gerr, o.want)
		}
	}
}

func TestMetricsRegisteredAndInitialised(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewRegistry()
	_, err := New(Options{
		AddressMap: map[string]string{"169.254.28.1": "c"},
		Clusters:   map[string]Cluster{"c": {Endpoints: []string{"127.0.0.1:9"}}},
	}, nil, reg, nil)
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]int{
		"nodeagent_proxy_connections_total":        2 + len(mappedResults), // none×{no_original_dst,unmapped} + the mapping's results
		"nodeagent_proxy_active_connections":       1,
		"nodeagent_proxy_bytes_total":              2,
		"nodeagent_proxy_connect_duration_seconds": 1,
		"nodeagent_proxy_accept_errors_total":      1,
	} {
		if got, err := testutil.GatherAndCount(reg, name); err != nil || got != want {
			t.Errorf("%s series: got %d, %v; want %d", name, got, err, want)
		}
	}
	// A second proxy on the same registry is an error, not a panic.
	if _, err := New(Options{}, nil, reg, nil); err == nil {
		t.Error("New with metrics already registered: got nil; want an error")
	}
}

func TestAccessLogOff(t *testing.T) {
	t.Parallel()
	srv := startServer(t, "127.0.0.1:0", func(c *net.TCPConn) { c.Write([]byte("ok")) })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	orig := newFakeOrig()
	orig.set("127.0.0.2", "169.254.29.1:80")
	logs := &logBuf{}
	p, err := New(Options{
		Listeners: []net.Listener{ln}, OriginalDst: orig, AccessLog: false,
		AddressMap: map[string]string{"169.254.29.1:80": srv.addr.String()},
	}, slogJSON(logs), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- p.Run(ctx) }()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.2")}}
	c, err := d.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	io.ReadAll(c)
	c.Close()
	waitMetric(t, "active_connections", 0, func() float64 { return testutil.ToFloat64(p.m.active) })
	cancel()
	<-errc
	if n := len(logs.records("connection")); n != 0 {
		t.Errorf("access log lines with AccessLog off: got %d; want 0", n)
	}
}
