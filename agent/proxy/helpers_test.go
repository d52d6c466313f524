package proxy

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/nodeagent/nodeagent/agent/health"
)

// fakeOrig maps a client's source IP (tests dial from distinct 127.0.0.x
// addresses) to an original destination, as the steering layer maps the client's
// ip:port.
type fakeOrig struct {
	mu    sync.Mutex
	m     map[netip.Addr]netip.AddrPort
	calls atomic.Int64
}

func newFakeOrig() *fakeOrig { return &fakeOrig{m: map[netip.Addr]netip.AddrPort{}} }

func (f *fakeOrig) set(client string, dst string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.m[netip.MustParseAddr(client)] = netip.MustParseAddrPort(dst)
}

func (f *fakeOrig) OriginalDst(c netip.AddrPort) (netip.AddrPort, bool) {
	f.calls.Add(1)
	f.mu.Lock()
	defer f.mu.Unlock()
	d, ok := f.m[c.Addr()]
	return d, ok
}

// logBuf collects JSON log lines.
type logBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// records returns the parsed log records whose msg is msg.
func (l *logBuf) records(msg string) []map[string]any {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []map[string]any
	sc := bufio.NewScanner(bytes.NewReader(l.b.Bytes()))
	for sc.Scan() {
		var m map[string]any
		if json.Unmarshal(sc.Bytes(), &m) == nil && m["msg"] == msg {
			out = append(out, m)
		}
	}
	return out
}

// waitRecord waits for a log record msg satisfying cond.
func (l *logBuf) waitRecord(t *testing.T, msg string, timeout time.Duration, cond func(map[string]any) bool) map[string]any {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		for _, r := range l.records(msg) {
			if cond(r) {
				return r
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %q log record matched within %v; got %v", msg, timeout, l.records(msg))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

type harness struct {
	p    *Proxy
	addr string // where to dial the proxy
	orig *fakeOrig
	reg  *prometheus.Registry
	rec  *health.Recorder
	logs *logBuf
	stop func() error // cancels Run and returns its error
}

// startProxy runs a proxy on a borrowed 127.0.0.1:0 listener. opts.OriginalDst
// defaults to a fresh fakeOrig.
func startProxy(t *testing.T, opts Options) *harness {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h := &harness{reg: prometheus.NewRegistry(), rec: health.NewRecorder(), logs: &logBuf{}}
	if opts.OriginalDst == nil {
		h.orig = newFakeOrig()
		opts.OriginalDst = h.orig
	}
	opts.Listeners = []net.Listener{ln}
	if opts.ConnectTimeout == 0 {
		opts.ConnectTimeout = 2 * time.Second
	}
	opts.AccessLog = true
	log := slog.New(slog.NewJSONHandler(h.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	p, err := New(opts, log, h.reg, h.rec)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	h.p = p
	h.addr = ln.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- p.Run(ctx) }()
	var once sync.Once
	var runErr error
	h.stop = func() error {
		once.Do(func() {
			cancel()
			select {
			case runErr = <-errc:
			case <-time.After(20 * time.Second):
				runErr = errors.New("Run did not return within 20s of cancel")
			}
			ln.Close()
		})
		return runErr
	}
	t.Cleanup(func() {
		if err := h.stop(); err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	if _, ok := h.rec.WaitFor(health.Proxy, 5*time.Second, func(health.Result) bool { return true }); !ok {
		t.Fatal("proxy reported no health within 5s")
	}
	return h
}

// dial connects to the proxy from source IP src (127.0.0.x).
func (h *harness) dial(t *testing.T, src string) *net.TCPConn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", h.addr)
	if err != nil {
		t.Fatalf("dial proxy from %s: %v", src, err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

func (h *harness) connections(mapping, result string) float64 {
	return testutil.ToFloat64(h.p.m.connections.WithLabelValues(mapping, result))
}

// waitMetric polls f until it returns want.
func waitMetric(t *testing.T, what string, want float64, f func() float64) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		got := f()
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: got %v; want %v", what, got, want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// server is a loopback test server; handle runs per connection.
type server struct {
	ln       net.Listener
	addr     netip.AddrPort
	accepted atomic.Int64
	wg       sync.WaitGroup
}

func startServer(t *testing.T, addr string, handle func(*net.TCPConn)) *server {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	s := &server{ln: ln, addr: ln.Addr().(*net.TCPAddr).AddrPort()}
	s.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.accepted.Add(1)
			s.wg.Go(func() {
				defer c.Close()
				handle(c.(*net.TCPConn))
			})
		}
	})
	t.Cleanup(func() { ln.Close() })
	return s
}

func echo(c *net.TCPConn) { io.Copy(c, c) }

// dialReset connects from src, writes a request and reads until an error, which
// it returns. A reset can come so fast that the dial itself reports it.
func (h *harness) dialReset(t *testing.T, src string, within time.Duration) error {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", h.addr)
	if err != nil {
		return err
	}
	defer c.Close()
	c.Write([]byte("GET / HTTP/1.0\r\n\r\n"))
	c.SetReadDeadline(time.Now().Add(within))
	_, err = io.Copy(io.Discard, c)
	return err
}

func isConnReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || (err != nil && strings.Contains(err.Error(), "connection reset"))
}

// deadPort returns a loopback address nobody listens on.
func deadPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := ln.Addr().String()
	ln.Close()
	return a
}

func slogJSON(w io.Writer) *slog.Logger {
	return slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}
