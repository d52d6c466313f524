package collector

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.opentelemetry.io/collector/pdata/pcommon"
	"go.opentelemetry.io/collector/pdata/ptrace"
	"go.opentelemetry.io/collector/pdata/ptrace/ptraceotlp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/nodeagent/nodeagent/agent/health"
)

// sink is an in-process OTLP/gRPC upstream that counts spans by span id.
type sink struct {
	ptraceotlp.UnimplementedGRPCServer

	mu       sync.Mutex
	spans    map[uint64]int               // span id → times received
	attrs    map[uint64]map[string]string // span id → its resource attributes
	calls    int
	failWith atomic.Pointer[error] // when set, every Export returns it
	partial  atomic.Int64          // when >0, report this many rejected spans
	changed  chan struct{}

	addr string
	srv  *grpc.Server
	md   metadata.MD // of the last call
}

func newSink() *sink {
	return &sink{spans: map[uint64]int{}, attrs: map[uint64]map[string]string{}, changed: make(chan struct{})}
}

// startSink serves s on addr ("127.0.0.1:0" for any port) until stop or the test ends.
func (s *sink) start(t testing.TB, addr string) {
	t.Helper()
	var l net.Listener
	var err error
	for i := 0; i < 50; i++ { // the port of a stopped sink can take a moment to be free
		if l, err = net.Listen("tcp", addr); err == nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("sink listen: %v", err)
	}
	s.addr = l.Addr().String()
	s.srv = grpc.NewServer()
	ptraceotlp.RegisterGRPCServer(s.srv, s)
	go s.srv.Serve(l)
	t.Cleanup(s.stop)
}

func (s *sink) stop() {
	if s.srv != nil {
		s.srv.Stop()
	}
}

func (s *sink) Export(ctx context.Context, req ptraceotlp.ExportRequest) (ptraceotlp.ExportResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.calls++
	s.md, _ = metadata.FromIncomingContext(ctx)
	if e := s.failWith.Load(); e != nil {
		return ptraceotlp.NewExportResponse(), *e
	}
	rss := req.Traces().ResourceSpans()
	for i := 0; i < rss.Len(); i++ {
		attrs := map[string]string{}
		rss.At(i).Resource().Attributes().Range(func(k string, v pcommon.Value) bool {
			attrs[k] = v.AsString()
			return true
		})
		sss := rss.At(i).ScopeSpans()
		for j := 0; j < sss.Len(); j++ {
			spans := sss.At(j).Spans()
			for k := 0; k < spans.Len(); k++ {
				id := spans.At(k).SpanID()
				n := binary.BigEndian.Uint64(id[:])
				s.spans[n]++
				s.attrs[n] = attrs
			}
		}
	}
	close(s.changed)
	s.changed = make(chan struct{})
	resp := ptraceotlp.NewExportResponse()
	if p := s.partial.Load(); p > 0 {
		resp.PartialSuccess().SetRejectedSpans(p)
		resp.PartialSuccess().SetErrorMessage("test rejects some")
	}
	return resp, nil
}

func (s *sink) fail(err error) {
	if err == nil {
		s.failWith.Store(nil)
		return
	}
	s.failWith.Store(&err)
}

// waitIDs waits until every id in want was received at least once.
func (s *sink) waitIDs(t testing.TB, want []uint64, timeout time.Duration) {
	t.Helper()
	deadline := time.After(timeout)
	for {
		s.mu.Lock()
		missing := 0
		for _, id := range want {
			if s.spans[id] == 0 {
				missing++
			}
		}
		ch := s.changed
		s.mu.Unlock()
		if missing == 0 {
			return
		}
		select {
		case <-ch:
		case <-deadline:
			t.Fatalf("sink: %d of %d acknowledged spans missing after %v", missing, len(want), timeout)
		}
	}
}

func (s *sink) count() (spans, calls int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.spans), s.calls
}

// ids hands out unique span ids.
var nextID atomic.Uint64

// makeTraces builds n spans under two resources and scopes, with fresh ids, returned in ids.
func makeTraces(service string, n int) (ptrace.Traces, []uint64) {
	td := ptrace.NewTraces()
	var ids []uint64
	for r := 0; r < 2 && len(ids) < n; r++ {
		rs := td.ResourceSpans().AppendEmpty()
		rs.Resource().Attributes().PutStr("service.name", service)
		ss := rs.ScopeSpans().AppendEmpty()
		ss.Scope().SetName("test-scope")
		per := (n + 1) / 2
		for i := 0; i < per && len(ids) < n; i++ {
			id := nextID.Add(1)
			sp := ss.Spans().AppendEmpty()
			var sid pcommon.SpanID
			binary.BigEndian.PutUint64(sid[:], id)
			sp.SetSpanID(sid)
			var tid pcommon.TraceID
			binary.BigEndian.PutUint64(tid[8:], id)
			tid[0] = 1
			sp.SetTraceID(tid)
			sp.SetName("op")
			sp.SetKind(ptrace.SpanKindServer)
			now := time.Now()
			sp.SetStartTimestamp(pcommon.NewTimestampFromTime(now.Add(-time.Millisecond)))
			sp.SetEndTimestamp(pcommon.NewTimestampFromTime(now))
			sp.Attributes().PutStr("http.route", "/items/{id}")
			sp.Attributes().PutInt("http.status_code", 200)
			ids = append(ids, id)
		}
	}
	return td, ids
}

func protoBody(t testing.TB, td ptrace.Traces) []byte {
	b, err := ptraceotlp.NewExportRequestFromTraces(td).MarshalProto()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

type testRelay struct {
	*Relay
	reg      *prometheus.Registry
	rec      *health.Recorder
	cancel   context.CancelFunc
	done     chan error
	grpcAddr string
	httpAddr string
}

func testOptions(t testing.TB, upstream string) Options {
	return Options{
		GRPCListen:         netip.MustParseAddrPort("127.0.0.1:0"),
		HTTPListen:         netip.MustParseAddrPort("127.0.0.1:0"),
		Exporter:           Exporter{Endpoint: upstream, Insecure: true, Timeout: 2 * time.Second},
		ResourceAttributes: map[string]string{"k8s.node.name": "node-a", "host.name": "host-a"},
		Batch:              Batch{Timeout: 20 * time.Millisecond},
		Queue:              Queue{Dir: t.TempDir()},
		Retry:              Retry{InitialInterval: 20 * time.Millisecond, MaxInterval: 200 * time.Millisecond},
		ShutdownGrace:      2 * time.Second,
	}
}

func testLogger(t testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// startRelay runs a relay with opts until the test ends (or stop).
func startRelay(t testing.TB, opts Options) *testRelay {
	t.Helper()
	reg := prometheus.NewRegistry()
	rec := health.NewRecorder()
	r, err := New(opts, testLogger(t), reg, rec)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	tr := &testRelay{Relay: r, reg: reg, rec: rec, cancel: cancel, done: make(chan error, 1)}
	go func() { tr.done <- r.Run(ctx) }()
	if _, ok := rec.WaitFor(health.OTLP, 10*time.Second, func(health.Result) bool { return true }); !ok {
		t.Fatalf("relay reported no health within 10s")
	}
	if a := r.Addr(ListenerNameGRPC); a != nil {
		tr.grpcAddr = a.String()
	}
	if a := r.Addr(ListenerNameHTTP); a != nil {
		tr.httpAddr = a.String()
	}
	t.Cleanup(func() { tr.stop(t) })
	return tr
}

func (tr *testRelay) stop(t testing.TB) {
	t.Helper()
	if tr.cancel == nil {
		return
	}
	tr.cancel()
	tr.cancel = nil
	select {
	case err := <-tr.done:
		if err != nil {
			t.Errorf("Run returned %v; want nil on cancellation", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("Run did not return within 30s of cancellation")
	}
}

func (tr *testRelay) spans(result string) float64 {
	return testutil.ToFloat64(tr.m.spans.WithLabelValues(result))
}

func grpcClient(t testing.TB, addr string) ptraceotlp.GRPCClient {
	t.Helper()
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return ptraceotlp.NewGRPCClient(cc)
}

func sendGRPC(c ptraceotlp.GRPCClient, td ptrace.Traces, opts ...grpc.CallOption) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := c.Export(ctx, ptraceotlp.NewExportRequestFromTraces(td), opts...)
	return err
}

type httpResult struct {
	code int
	ct   string
	hdr  http.Header
	body []byte
}

func postHTTP(t testing.TB, addr, method, ct, enc string, body []byte) httpResult {
	t.Helper()
	req, err := http.NewRequest(method, "http://"+addr+TracesPath, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if ct != "" {
		req.Header.Set("Content-Type", ct)
	}
	if enc != "" {
		req.Header.Set("Content-Encoding", enc)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, req.URL, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return httpResult{code: resp.StatusCode, ct: resp.Header.Get("Content-Type"), hdr: resp.Header, body: b}
}

func codeOf(err error) codes.Code { return status.Code(err) }

// freeAddr returns a loopback address nothing listens on (for an upstream that is down).
func freeAddr(t testing.TB) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

var errUnavailable = status.Error(codes.Unavailable, "sink is pretending to be down")

func insecureCreds() credentials.TransportCredentials { return insecure.NewCredentials() }

func nilRegistry() *prometheus.Registry { return prometheus.NewRegistry() }

func gz(b []byte) []byte {
	var buf bytes.Buffer
	w := gzip.NewWriter(&buf)
	w.Write(b)
	w.Close()
	return buf.Bytes()
}

func zst(b []byte) []byte {
	enc, _ := zstd.NewWriter(nil)
	defer enc.Close()
	return enc.EncodeAll(b, nil)
}

func netipOf(a net.Addr) netip.AddrPort {
	return a.(*net.TCPAddr).AddrPort()
}
