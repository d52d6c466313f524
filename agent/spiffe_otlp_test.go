package agent

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/collector/pdata/pcommon"
	"go.opentelemetry.io/collector/pdata/ptrace"
	"go.opentelemetry.io/collector/pdata/ptrace/ptraceotlp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/nodeagent/nodeagent/agent/config"
	"github.com/nodeagent/nodeagent/agent/health"
	"github.com/nodeagent/nodeagent/collector"
	"github.com/nodeagent/nodeagent/test/peers"
	"github.com/nodeagent/nodeagent/test/privtest"
)

const (
	soNodeID      = "spiffe://example.org/nodeagent" // this test process (uid 0, gid 0)
	soCollectorID = "spiffe://example.org/collector" // the upstream helper (gid soServerGID)
	soWrongID     = "spiffe://example.org/not-the-collector"
	soOtherID     = "spiffe://example.org/someone-else" // the only client the "refuse" listener takes
	soServerGID   = 4243
)

// TestSpiffeOTLPRelay runs the agent's OTLP relay, built from configuration as the
// agent builds it (otlpOptions → collector.New), against real SPIRE: it exports over
// gRPC with mTLS using the node's real X509-SVID to an upstream OTLP server (a child
// process with its own real SVID) that authorises only the node's SPIFFE ID.
//
//   - delivered: server_id is the upstream's ID and the upstream authorises the node;
//     the spans arrive, sent by spiffe://example.org/nodeagent.
//   - wrong server: server_id names another ID; the relay refuses the upstream's SVID,
//     the spans stay queued and are retried.
//   - client refused: the upstream authorises another ID; it refuses the node's SVID,
//     the spans stay queued and are retried.
func TestSpiffeOTLPRelay(t *testing.T) {
	privtest.Root(t) // the upstream runs with another gid to get another identity
	start := time.Now()
	sp := peers.StartSpire(t, "")
	t.Logf("spire up in %v", time.Since(start).Round(time.Millisecond))

	// Identities: this process by uid and gid 0 (the helper has gid soServerGID, so it
	// does not match), the helper by its gid alone.
	sp.CreateEntry(t, soNodeID, "unix:uid:"+strconv.Itoa(os.Getuid()), "unix:gid:"+strconv.Itoa(os.Getgid()))
	sp.CreateEntry(t, soCollectorID, "unix:gid:"+strconv.Itoa(soServerGID))
	up := startSpiffeOTLPServer(t, sp.AgentSocket, map[string]string{"ok": soNodeID, "refuse": soOtherID})
	sp.WaitSVID(t, soNodeID, 30*time.Second)
	up.waitReady(t, 60*time.Second)
	t.Logf("identities issued, upstream serving, %v after start", time.Since(start).Round(time.Millisecond))

	// Run sets the process memory limit from otlp.memory_limit, as in the agent;
	// give the test binary its own back afterwards (cleanups run after the relays stop).
	prevLimit := debug.SetMemoryLimit(-1)
	t.Cleanup(func() { debug.SetMemoryLimit(prevLimit) })

	good := startSpiffeRelay(t, sp.AgentSocket, up.addr("ok"), soCollectorID)
	wrongServer := startSpiffeRelay(t, sp.AgentSocket, up.addr("ok"), soWrongID)
	refused := startSpiffeRelay(t, sp.AgentSocket, up.addr("refuse"), soCollectorID)

	goodIDs := good.send(t, 5)
	wrongIDs := wrongServer.send(t, 4)
	refusedIDs := refused.send(t, 3)

	t.Run("delivered", func(t *testing.T) {
		up.waitSpans(t, "ok", goodIDs, 30*time.Second)
		for _, id := range goodIDs {
			if got := up.peerOf("ok", id); got != soNodeID {
				t.Errorf("span %s arrived from %q; want %q", id, got, soNodeID)
			}
		}
		good.waitMetric(t, "nodeagent_otlp_spans_total", "exported", func(v float64) bool { return v == float64(len(goodIDs)) }, 10*time.Second)
		res, ok := good.rec.WaitFor(health.OTLP, 10*time.Second, func(r health.Result) bool { return r.OK })
		if !ok {
			t.Errorf("otlp check: got %+v; want ok with the upstream up", res)
		}
	})

	// Each refusal is checked for its reason: a relay failing for another one (no SVID
	// yet, upstream down) would prove nothing about authorisation.
	t.Run("wrong server id", func(t *testing.T) {
		// gRPC quotes the handshake error, so the ID is matched apart from its quotes.
		wrongServer.waitLog(t, 30*time.Second, "authentication handshake failed", "unexpected ID", soCollectorID)
		wrongServer.assertUndelivered(t, up, wrongIDs)
	})
	t.Run("client not authorised", func(t *testing.T) {
		// The upstream saw the node's SVID and refused it for its ID. What the client
		// gets back is racy under TLS 1.3 (its handshake is done before the server's
		// verdict): a "bad certificate" alert, EOF or a broken pipe, all Unavailable.
		up.waitRefused(t, "refuse", `unexpected ID "`+soNodeID+`"`, 30*time.Second)
		refused.waitLog(t, 10*time.Second, "code = Unavailable")
		refused.assertUndelivered(t, up, refusedIDs)
	})
	// Nothing of theirs reached any listener, now that every relay has failed for the
	// right reason at least once.
	for _, ids := range [][]string{wrongIDs, refusedIDs} {
		for _, id := range ids {
			for _, l := range []string{"ok", "refuse"} {
				if p := up.peerOf(l, id); p != "" {
					t.Errorf("span %s was delivered to listener %s (from %s); want it refused", id, l, p)
				}
			}
		}
	}
	t.Logf("done in %v", time.Since(start).Round(time.Millisecond))
}

// ---- the upstream (child process) ----

type spiffeOTLPServer struct {
	cmd    *exec.Cmd
	stderr *lockedBuf

	mu      sync.Mutex
	changed chan struct{}
	addrs   map[string]string
	ready   string                       // its SPIFFE ID, once READY
	spans   map[string]map[string]string // listener → span id → client SPIFFE ID
	refusal map[string][]string          // listener → handshake errors
	exited  bool
}

// startSpiffeOTLPServer re-executes the test binary as TestSpiffeOTLPServerHelper with
// gid soServerGID, serving one listener per entry of authorise (name → the only client
// SPIFFE ID it accepts).
func startSpiffeOTLPServer(t *testing.T, socket string, authorise map[string]string) *spiffeOTLPServer {
	t.Helper()
	var specs []string
	for name, id := range authorise {
		specs = append(specs, name+"="+id)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestSpiffeOTLPServerHelper$", "-test.count=1")
	cmd.Env = append(os.Environ(), spiffeOTLPHelperEnv+"=1", spiffeOTLPSocketEnv+"="+socket,
		spiffeOTLPListenersEnv+"="+strings.Join(specs, ","))
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 0, Gid: soServerGID}, Pdeathsig: syscall.SIGKILL}
	s := &spiffeOTLPServer{cmd: cmd, stderr: &lockedBuf{}, changed: make(chan struct{}),
		addrs: map[string]string{}, spans: map[string]map[string]string{}, refusal: map[string][]string{}}
	cmd.Stderr = s.stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start upstream helper: %v", err)
	}
	waited := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			s.line(sc.Text())
		}
		_ = cmd.Wait()
		s.update(func() { s.exited = true })
		close(waited)
	}()
	t.Cleanup(func() {
		_ = stdin.Close() // the helper exits on EOF
		select {
		case <-waited:
		case <-time.After(5 * time.Second):
			_ = cmd.Process.Kill()
			<-waited
		}
		if t.Failed() {
			t.Logf("upstream helper stderr:\n%s", s.stderr.String())
		}
	})
	return s
}

func (s *spiffeOTLPServer) update(fn func()) {
	s.mu.Lock()
	defer s.mu.Unlock()
	fn()
	close(s.changed)
	s.changed = make(chan struct{})
}

func (s *spiffeOTLPServer) line(l string) {
	f := strings.Fields(l)
	if len(f) < 2 {
		return
	}
	s.update(func() {
		switch {
		case f[0] == "ADDR" && len(f) == 3:
			s.addrs[f[1]] = f[2]
		case f[0] == "READY":
			s.ready = f[1]
		case f[0] == "SPANS" && len(f) >= 3:
			if s.spans[f[1]] == nil {
				s.spans[f[1]] = map[string]string{}
			}
			for _, id := range f[3:] {
				s.spans[f[1]][id] = f[2]
			}
		case f[0] == "REFUSED":
			s.refusal[f[1]] = append(s.refusal[f[1]], strings.Join(f[2:], " "))
		}
	})
}

// wait blocks until cond (called under the lock) holds, the helper exits, or timeout.
func (s *spiffeOTLPServer) wait(t *testing.T, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.After(timeout)
	for {
		s.mu.Lock()
		ok, exited, ch := cond(), s.exited, s.changed
		s.mu.Unlock()
		if ok {
			return
		}
		if exited {
			t.Fatalf("upstream helper exited while waiting for %s; stderr:\n%s", what, s.stderr.String())
		}
		select {
		case <-ch:
		case <-deadline:
			t.Fatalf("upstream helper: no %s within %v", what, timeout)
		}
	}
}

func (s *spiffeOTLPServer) waitReady(t *testing.T, timeout time.Duration) {
	t.Helper()
	s.wait(t, "READY", timeout, func() bool { return s.ready != "" })
	if s.ready != soCollectorID {
		t.Fatalf("upstream serves as %s; want %s", s.ready, soCollectorID)
	}
}

func (s *spiffeOTLPServer) addr(name string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.addrs[name]
}

func (s *spiffeOTLPServer) peerOf(listener, spanID string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.spans[listener][spanID]
}

func (s *spiffeOTLPServer) waitSpans(t *testing.T, listener string, ids []string, timeout time.Duration) {
	t.Helper()
	s.wait(t, fmt.Sprintf("%d spans on %s", len(ids), listener), timeout, func() bool {
		for _, id := range ids {
			if _, ok := s.spans[listener][id]; !ok {
				return false
			}
		}
		return true
	})
}

func (s *spiffeOTLPServer) waitRefused(t *testing.T, listener, want string, timeout time.Duration) {
	t.Helper()
	s.wait(t, fmt.Sprintf("refusal %q on %s", want, listener), timeout, func() bool {
		for _, r := range s.refusal[listener] {
			if strings.Contains(r, want) {
				return true
			}
		}
		return false
	})
}

// ---- the relay, as the agent builds it ----

type spiffeRelay struct {
	reg      *prometheus.Registry
	rec      *health.Recorder
	logs     *recordingHandler
	grpcAddr string
}

// startSpiffeRelay builds the relay from a configuration file's text the way the agent
// does (config.Parse, Validate, otlpOptions with the agent's wiring, collector.New) and
// runs it until t ends. Its listeners are handed over pre-opened, as by systemd socket
// activation, so the configured addresses are free loopback ports.
func startSpiffeRelay(t *testing.T, socket, upstream, serverID string) *spiffeRelay {
	t.Helper()
	var lis [2]net.Listener
	for i := range lis {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = l.Close() })
		lis[i] = l
	}
	yaml := fmt.Sprintf(`node_name: spiffe-otlp-test
shutdown_grace: 300ms
spire:
  socket: %s
otlp:
  grpc_listen: %s
  http_listen: %s
  exporter:
    endpoint: %s
    timeout: 2s
    spiffe:
      server_id: %s
  batch:
    timeout: 20ms
  queue:
    dir: %s
  retry:
    initial_interval: 50ms
    max_interval: 500ms
`, socket, lis[0].Addr(), lis[1].Addr(), upstream, serverID, filepath.Join(t.TempDir(), "queue"))
	cfg, err := config.Parse([]byte(yaml))
	if err != nil {
		t.Fatalf("parse config: %v\n%s", err, yaml)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatalf("validate config: %v\n%s", err, yaml)
	}

	ctx, cancel := context.WithCancel(context.Background())
	logs := newRecordingHandler()
	log := slog.New(logs)
	w := &wiring{ctx: ctx, log: log, listeners: map[string][]net.Listener{
		ListenerOTLPGRPC: {lis[0]}, ListenerOTLPHTTP: {lis[1]},
	}}
	opts := otlpOptions(cfg, w)
	if opts.Exporter.TLSConfig == nil {
		t.Fatalf("otlpOptions: no exporter TLS config for otlp.exporter.spiffe.server_id %s", serverID)
	}
	reg := prometheus.NewRegistry()
	rec := health.NewRecorder()
	r, err := collector.New(opts, log, reg, rec)
	if err != nil {
		t.Fatalf("collector.New: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("relay Run returned %v; want nil on cancellation", err)
			}
		case <-time.After(15 * time.Second):
			t.Errorf("relay Run did not return within 15s of cancellation")
		}
		if t.Failed() {
			t.Logf("relay (server_id %s → %s) log:\n%s", serverID, upstream, strings.Join(logs.lines(), "\n"))
		}
	})
	sr := &spiffeRelay{reg: reg, rec: rec, logs: logs, grpcAddr: lis[0].Addr().String()}
	// Run asks for the TLS config when it starts, which opens the X.509 source; until
	// it has the node's SVID, handshakes fail with "no x509-svid" rather than for the
	// reasons under test, so no spans are sent before.
	sr.waitLine(t, 30*time.Second, "x509 source for mtls ready")
	return sr
}

// send posts n spans with fresh random IDs to the relay over OTLP/gRPC and returns
// their IDs in hex; the relay acknowledges them once they are queued.
func (r *spiffeRelay) send(t *testing.T, n int) []string {
	t.Helper()
	td := ptrace.NewTraces()
	rs := td.ResourceSpans().AppendEmpty()
	rs.Resource().Attributes().PutStr("service.name", "spiffe-otlp-test")
	spans := rs.ScopeSpans().AppendEmpty().Spans()
	var ids []string
	for range n {
		var sid pcommon.SpanID
		var tid pcommon.TraceID
		_, _ = rand.Read(sid[:])
		_, _ = rand.Read(tid[:])
		sp := spans.AppendEmpty()
		sp.SetSpanID(sid)
		sp.SetTraceID(tid)
		sp.SetName("op")
		now := time.Now()
		sp.SetStartTimestamp(pcommon.NewTimestampFromTime(now.Add(-time.Millisecond)))
		sp.SetEndTimestamp(pcommon.NewTimestampFromTime(now))
		ids = append(ids, hex.EncodeToString(sid[:]))
	}
	cc, err := grpc.NewClient(r.grpcAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cc.Close() }()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := ptraceotlp.NewGRPCClient(cc).Export(ctx, ptraceotlp.NewExportRequestFromTraces(td)); err != nil {
		t.Fatalf("send %d spans to the relay at %s: %v", n, r.grpcAddr, err)
	}
	return ids
}

// metric returns the value of the series of name whose only label value is label
// ("" for an unlabelled series), and whether it exists.
func (r *spiffeRelay) metric(t *testing.T, name, label string) (float64, bool) {
	t.Helper()
	mfs, err := r.reg.Gather()
	if err != nil {
		t.Fatalf("gather metrics: %v", err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if (label == "" && len(m.GetLabel()) == 0) || (len(m.GetLabel()) == 1 && m.GetLabel()[0].GetValue() == label) {
				switch {
				case m.GetCounter() != nil:
					return m.GetCounter().GetValue(), true
				case m.GetGauge() != nil:
					return m.GetGauge().GetValue(), true
				}
			}
		}
	}
	return 0, false
}

func (r *spiffeRelay) waitMetric(t *testing.T, name, label string, cond func(float64) bool, timeout time.Duration) float64 {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		v, ok := r.metric(t, name, label)
		if ok && cond(v) {
			return v
		}
		if time.Now().After(deadline) {
			t.Fatalf("metric %s{%s}: got %v (present %v) after %v", name, label, v, ok, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitLog waits until an export attempt failed with an error containing all of want.
// The relay logs the first failure of a batch and every tenth after it.
func (r *spiffeRelay) waitLog(t *testing.T, timeout time.Duration, want ...string) {
	t.Helper()
	r.waitLine(t, timeout, append([]string{"export failed"}, want...)...)
}

// waitLine waits until the relay logged a line containing all of want.
func (r *spiffeRelay) waitLine(t *testing.T, timeout time.Duration, want ...string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
	lines:
		for _, l := range r.logs.lines() {
			for _, w := range want {
				if !strings.Contains(l, w) {
					continue lines
				}
			}
			t.Logf("relay: %s", l)
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("relay logged no line with %q within %v", want, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// assertUndelivered: the relay keeps the spans queued and retries them, its upstream
// is down in metrics and health, and the upstream got none of them.
func (r *spiffeRelay) assertUndelivered(t *testing.T, up *spiffeOTLPServer, ids []string) {
	t.Helper()
	n := float64(len(ids))
	// Two failed attempts at least, the last of them known to be for the right reason.
	r.waitMetric(t, "nodeagent_otlp_spans_total", "retried", func(v float64) bool { return v >= 2*n }, 10*time.Second)
	r.waitMetric(t, "nodeagent_otlp_upstream_up", "", func(v float64) bool { return v == 0 }, 5*time.Second)
	r.waitMetric(t, "nodeagent_otlp_queue_bytes", "", func(v float64) bool { return v > 0 }, 5*time.Second)
	if v, _ := r.metric(t, "nodeagent_otlp_spans_total", "accepted"); v != n {
		t.Errorf("spans accepted: got %v; want %v", v, n)
	}
	for _, res := range []string{"exported", "rejected"} {
		if v, _ := r.metric(t, "nodeagent_otlp_spans_total", res); v != 0 {
			t.Errorf("spans %s: got %v; want 0", res, v)
		}
	}
	res, ok := r.rec.WaitFor(health.OTLP, 5*time.Second, func(r health.Result) bool {
		return !r.OK && strings.Contains(r.Detail, "upstream unreachable")
	})
	if !ok {
		t.Errorf("otlp check: got %+v; want failing with upstream unreachable", res)
	}
	for _, id := range ids {
		for _, l := range []string{"ok", "refuse"} {
			if p := up.peerOf(l, id); p != "" {
				t.Errorf("span %s was delivered to listener %s (from %s); want it refused", id, l, p)
			}
		}
	}
}

// ---- small helpers ----

// recordingHandler is a slog.Handler that keeps every record as one text line.
type recordingHandler struct {
	mu    *sync.Mutex
	all   *[]string
	attrs []slog.Attr
}

func newRecordingHandler() *recordingHandler {
	return &recordingHandler{mu: &sync.Mutex{}, all: &[]string{}}
}

func (h *recordingHandler) Enabled(context.Context, slog.Level) bool { return true }

func (h *recordingHandler) Handle(_ context.Context, r slog.Record) error {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s", r.Level, r.Message)
	add := func(a slog.Attr) bool {
		fmt.Fprintf(&b, " %s=%s", a.Key, a.Value)
		return true
	}
	for _, a := range h.attrs {
		add(a)
	}
	r.Attrs(add)
	h.mu.Lock()
	defer h.mu.Unlock()
	*h.all = append(*h.all, b.String())
	return nil
}

func (h *recordingHandler) WithAttrs(as []slog.Attr) slog.Handler {
	c := *h
	c.attrs = append(append([]slog.Attr(nil), h.attrs...), as...)
	return &c
}

func (h *recordingHandler) WithGroup(string) slog.Handler { return h }

func (h *recordingHandler) lines() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]string(nil), *h.all...)
}

// lockedBuf is a strings.Builder safe for a process's output and a reader.
type lockedBuf struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
