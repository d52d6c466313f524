package collector

import (
	"bytes"
	"context"
	"encoding/binary"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.opentelemetry.io/collector/pdata/ptrace"
	"go.opentelemetry.io/collector/pdata/ptrace/ptraceotlp"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/nodeagent/nodeagent/agent/health"
)

func TestRelayGRPCAndHTTPToUpstream(t *testing.T) {
	up := newSink()
	up.start(t, "127.0.0.1:0")
	tr := startRelay(t, testOptions(t, up.addr))
	if res, ok := tr.rec.WaitFor(health.OTLP, 10*time.Second, func(r health.Result) bool { return r.OK }); !ok {
		t.Fatalf("got health %+v; want OK with the upstream up", res)
	}

	var want []uint64
	c := grpcClient(t, tr.grpcAddr)
	td, ids := makeTraces("grpc-svc", 10)
	// A resource that already says which node it is on keeps its value.
	td.ResourceSpans().At(0).Resource().Attributes().PutStr("k8s.node.name", "set-by-workload")
	if err := sendGRPC(c, td, grpc.UseCompressor("gzip")); err != nil {
		t.Fatalf("gRPC export: %v", err)
	}
	want = append(want, ids...)
	preset := map[uint64]bool{}
	for _, id := range ids[:5] { // the first resource's spans
		preset[id] = true
	}

	td, ids = makeTraces("http-proto-svc", 7)
	if r := postHTTP(t, tr.httpAddr, "POST", ctProto, "", protoBody(t, td)); r.code != 200 || r.ct != ctProto {
		t.Fatalf("HTTP proto: got %d %q; want 200 %q", r.code, r.ct, ctProto)
	}
	want = append(want, ids...)

	td, ids = makeTraces("http-json-svc", 5)
	js, _ := ptraceotlp.NewExportRequestFromTraces(td).MarshalJSON()
	r := postHTTP(t, tr.httpAddr, "POST", ctJSON+"; charset=utf-8", "gzip", gz(js))
	resp := ptraceotlp.NewExportResponse()
	if r.code != 200 || r.ct != ctJSON || resp.UnmarshalJSON(r.body) != nil || resp.PartialSuccess().RejectedSpans() != 0 {
		t.Fatalf("HTTP json+gzip: got %d %q %q; want 200 %q with an ExportTraceServiceResponse", r.code, r.ct, r.body, ctJSON)
	}
	want = append(want, ids...)

	td, ids = makeTraces("http-zstd-svc", 3)
	if r := postHTTP(t, tr.httpAddr, "POST", ctProto, "zstd", zst(protoBody(t, td))); r.code != 200 {
		t.Fatalf("HTTP proto+zstd: got %d %s; want 200", r.code, r.body)
	}
	want = append(want, ids...)

	up.waitIDs(t, want, 10*time.Second)
	up.mu.Lock()
	for _, id := range want {
		a := up.attrs[id]
		wantNode := "node-a"
		if preset[id] {
			wantNode = "set-by-workload"
		}
		if a["k8s.node.name"] != wantNode || a["host.name"] != "host-a" {
			t.Errorf("span %d: got resource %v; want k8s.node.name=%s host.name=host-a", id, a, wantNode)
		}
	}
	up.mu.Unlock()
	if got := tr.spans(resAccepted); got != float64(len(want)) {
		t.Errorf("got accepted=%v; want %d", got, len(want))
	}
	waitMetric(t, func() float64 { return tr.spans(resExported) }, float64(len(want)))
}

func waitMetric(t *testing.T, get func() float64, want float64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for get() != want {
		if time.Now().After(deadline) {
			t.Fatalf("got metric %v; want %v", get(), want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestBatchingAcrossRequests(t *testing.T) {
	up := newSink()
	up.start(t, "127.0.0.1:0")
	opts := testOptions(t, up.addr)
	opts.Batch = Batch{MaxSpans: 100, Timeout: time.Hour}
	opts.Queue.Consumers = 1
	tr := startRelay(t, opts)
	c := grpcClient(t, tr.grpcAddr)
	var want []uint64
	for i := 0; i < 20; i++ { // 20 requests of 10 spans: 2 batches of 100 (the timeout never fires)
		td, ids := makeTraces("batch-svc", 10)
		if err := sendGRPC(c, td); err != nil {
			t.Fatal(err)
		}
		want = append(want, ids...)
	}
	up.waitIDs(t, want, 10*time.Second)
	if _, calls := up.count(); calls != 2 {
		t.Fatalf("got %d upstream calls for 200 spans with max_spans 100; want 2", calls)
	}
}

func TestUpstreamDownThenUp(t *testing.T) {
	addr := freeAddr(t)
	tr := startRelay(t, testOptions(t, addr))
	if res, ok := tr.rec.WaitFor(health.OTLP, 10*time.Second, func(r health.Result) bool {
		return !r.OK && strings.Contains(r.Detail, "upstream unreachable")
	}); !ok {
		t.Fatalf("got health %+v; want not OK, upstream unreachable", res)
	}
	c := grpcClient(t, tr.grpcAddr)
	var want []uint64
	for i := 0; i < 30; i++ {
		td, ids := makeTraces("down-svc", 20)
		if i%2 == 0 {
			if err := sendGRPC(c, td); err != nil {
				t.Fatalf("request %d: %v", i, err)
			}
		} else if r := postHTTP(t, tr.httpAddr, "POST", ctProto, "", protoBody(t, td)); r.code != 200 {
			t.Fatalf("request %d: HTTP %d", i, r.code)
		}
		want = append(want, ids...)
	}
	time.Sleep(300 * time.Millisecond) // several failed attempts
	if tr.spans(resRetried) == 0 {
		t.Errorf("got retried=0 with the upstream down; want > 0")
	}
	if got := testutil.ToFloat64(tr.m.queueBytes); got == 0 {
		t.Errorf("got queue_bytes 0 with 600 spans waiting; want > 0")
	}
	up := newSink()
	up.start(t, addr)
	up.waitIDs(t, want, 15*time.Second)
	if res, ok := tr.rec.WaitFor(health.OTLP, 10*time.Second, func(r health.Result) bool { return r.OK }); !ok {
		t.Fatalf("got health %+v after the upstream came back; want OK", res)
	}
	waitMetric(t, func() float64 { return testutil.ToFloat64(tr.m.queueBytes) }, 0)
}

func TestRetryableUpstreamErrorsThenSuccess(t *testing.T) {
	up := newSink()
	up.start(t, "127.0.0.1:0")
	tests := []struct {
		name      string
		err       error
		retryable bool
	}{
		{"unavailable", errUnavailable, true},
		{"resource exhausted with retry info", withRetryInfo(codes.ResourceExhausted, 30*time.Millisecond), true},
		{"resource exhausted without retry info", status.Error(codes.ResourceExhausted, "too big"), false},
		{"invalid argument", status.Error(codes.InvalidArgument, "bad"), false},
		{"unauthenticated", status.Error(codes.Unauthenticated, "who are you"), false},
	}
	tr := startRelay(t, testOptions(t, up.addr))
	c := grpcClient(t, tr.grpcAddr)
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, calls0 := up.count()
			rejected0, retried0 := tr.spans(resRejected), tr.spans(resRetried)
			up.fail(tc.err)
			td, ids := makeTraces("retry-svc", 5)
			if err := sendGRPC(c, td); err != nil {
				t.Fatal(err)
			}
			if !tc.retryable {
				waitMetric(t, func() float64 { return tr.spans(resRejected) }, rejected0+5)
				time.Sleep(150 * time.Millisecond)
				if _, calls := up.count(); calls != calls0+1 {
					t.Fatalf("got %d attempts; want 1 (permanent)", calls-calls0)
				}
				return
			}
			waitMetric(t, func() float64 {
				if tr.spans(resRetried) >= retried0+10 {
					return 1
				}
				return 0
			}, 1)
			up.fail(nil)
			up.waitIDs(t, ids, 10*time.Second)
		})
	}
}

func withRetryInfo(c codes.Code, d time.Duration) error {
	st, _ := status.New(c, "slow down").WithDetails(&errdetails.RetryInfo{RetryDelay: durationpb.New(d)})
	return st.Err()
}

func TestPermanentRejectionAndPartialSuccess(t *testing.T) {
	up := newSink()
	up.start(t, "127.0.0.1:0")
	up.fail(status.Error(codes.InvalidArgument, "bad data"))
	tr := startRelay(t, testOptions(t, up.addr))
	c := grpcClient(t, tr.grpcAddr)
	td, _ := makeTraces("reject-svc", 4)
	if err := sendGRPC(c, td); err != nil {
		t.Fatal(err)
	}
	waitMetric(t, func() float64 { return tr.spans(resRejected) }, 4)
	time.Sleep(100 * time.Millisecond)
	if _, calls := up.count(); calls != 1 {
		t.Fatalf("got %d attempts for a permanent rejection; want 1", calls)
	}
	if tr.spans(resRetried) != 0 {
		t.Fatalf("got retried=%v for a permanent rejection; want 0", tr.spans(resRetried))
	}

	up.fail(nil)
	up.partial.Store(3)
	td, ids := makeTraces("partial-svc", 10)
	if err := sendGRPC(c, td); err != nil {
		t.Fatal(err)
	}
	up.waitIDs(t, ids, 10*time.Second)
	waitMetric(t, func() float64 { return tr.spans(resRejected) }, 7)
	waitMetric(t, func() float64 { return tr.spans(resExported) }, 7)
	if _, calls := up.count(); calls != 2 {
		t.Fatalf("got %d attempts; want 2 (a partial success is not retried)", calls)
	}
	waitMetric(t, func() float64 { return testutil.ToFloat64(tr.m.queueBytes) }, 0)
}

func TestQueueFullIsRetryable(t *testing.T) {
	addr := freeAddr(t)
	opts := testOptions(t, addr)
	opts.MaxRequestSize = 16 << 10
	opts.Queue.MaxBytes = 40 << 10
	tr := startRelay(t, opts)
	c := grpcClient(t, tr.grpcAddr)
	var acked []uint64
	var grpcRefused, httpRefused bool
	for i := 0; i < 200 && (!grpcRefused || !httpRefused); i++ {
		td, ids := makeTraces("full-svc", 20)
		if i%2 == 0 {
			err := sendGRPC(c, td)
			switch codeOf(err) {
			case codes.OK:
				acked = append(acked, ids...)
			case codes.Unavailable:
				grpcRefused = true
				if !hasRetryInfo(err) {
					t.Fatalf("got %v without RetryInfo; want Unavailable with RetryInfo", err)
				}
			default:
				t.Fatalf("got %v; want OK or Unavailable", err)
			}
			continue
		}
		r := postHTTP(t, tr.httpAddr, "POST", ctProto, "", protoBody(t, td))
		switch r.code {
		case 200:
			acked = append(acked, ids...)
		case 503:
			httpRefused = true
			if r.hdr.Get("Retry-After") == "" {
				t.Fatalf("got 503 without Retry-After")
			}
		default:
			t.Fatalf("got HTTP %d; want 200 or 503", r.code)
		}
	}
	if !grpcRefused || !httpRefused {
		t.Fatalf("got grpc refused %v, http refused %v; want both refused with a full queue", grpcRefused, httpRefused)
	}
	if tr.spans(resRefused) == 0 {
		t.Fatalf("got refused=0; want the refused spans counted")
	}
	if res, _ := tr.rec.WaitFor(health.OTLP, 3*time.Second, func(r health.Result) bool { return strings.Contains(r.Detail, "high-water") }); !strings.Contains(res.Detail, "high-water") {
		t.Errorf("got health %+v; want the queue above its high-water mark", res)
	}
	up := newSink()
	up.start(t, addr)
	up.waitIDs(t, acked, 15*time.Second)
	// With room again, requests are accepted.
	td, ids := makeTraces("full-svc", 5)
	if err := sendGRPC(c, td); err != nil {
		t.Fatalf("after the queue drained: %v", err)
	}
	up.waitIDs(t, ids, 10*time.Second)
}

func hasRetryInfo(err error) bool {
	for _, d := range status.Convert(err).Details() {
		if _, ok := d.(*errdetails.RetryInfo); ok {
			return true
		}
	}
	return false
}

func TestMemoryLimitIsRetryable(t *testing.T) {
	up := newSink()
	up.start(t, "127.0.0.1:0")
	opts := testOptions(t, up.addr)
	opts.MemoryLimit = 1 // any heap is over
	tr := startRelay(t, opts)
	td, _ := makeTraces("mem-svc", 3)
	err := sendGRPC(grpcClient(t, tr.grpcAddr), td)
	if codeOf(err) != codes.Unavailable || !hasRetryInfo(err) {
		t.Fatalf("got %v; want Unavailable with RetryInfo", err)
	}
	r := postHTTP(t, tr.httpAddr, "POST", ctProto, "", protoBody(t, td))
	if r.code != 503 || r.hdr.Get("Retry-After") == "" {
		t.Fatalf("got HTTP %d Retry-After=%q; want 503 with Retry-After", r.code, r.hdr.Get("Retry-After"))
	}
	// The limit applies live.
	opts.MemoryLimit = 1 << 40
	if err := tr.Update(opts); err != nil {
		t.Fatalf("Update of the memory limit: got %v; want nil (live)", err)
	}
	td, ids := makeTraces("mem-svc", 3)
	if err := sendGRPC(grpcClient(t, tr.grpcAddr), td); err != nil {
		t.Fatalf("after raising the limit: %v", err)
	}
	up.waitIDs(t, ids, 10*time.Second)
}

func TestHTTPBadInputsKeepServing(t *testing.T) {
	up := newSink()
	up.start(t, "127.0.0.1:0")
	opts := testOptions(t, up.addr)
	opts.MaxRequestSize = 64 << 10
	tr := startRelay(t, opts)
	td, _ := makeTraces("bad-svc", 4)
	valid := protoBody(t, td)
	big, _ := makeTraces("big-svc", 2000)
	zeros := make([]byte, 50<<20) // 50 MiB of zeros: ~50 KiB gzipped, a decompression bomb for a 64 KiB limit

	tests := []struct {
		name, method, ct, enc string
		body                  []byte
		want                  int
	}{
		{"get", "GET", ctProto, "", nil, 405},
		{"put", "PUT", ctProto, "", valid, 405},
		{"text plain", "POST", "text/plain", "", valid, 415},
		{"no content type", "POST", "", "", valid, 415},
		{"unknown encoding", "POST", ctProto, "br", valid, 415},
		{"garbage proto", "POST", ctProto, "", []byte("\xff\xff\xff\xff not protobuf"), 400},
		{"truncated proto", "POST", ctProto, "", valid[:len(valid)-3], 400},
		{"garbage json", "POST", ctJSON, "", []byte(`{"resourceSpans": [`), 400},
		{"bad gzip", "POST", ctProto, "gzip", []byte("not gzip at all"), 400},
		{"truncated gzip", "POST", ctProto, "gzip", gz(valid)[:20], 400},
		{"oversized", "POST", ctProto, "", protoBody(t, big), 413},
		{"gzip bomb", "POST", ctProto, "gzip", gz(zeros), 413},
		{"zstd bomb", "POST", ctProto, "zstd", zst(zeros), 413},
		{"empty proto", "POST", ctProto, "", nil, 200},
		{"empty json", "POST", ctJSON, "", []byte(`{}`), 200},
		{"valid", "POST", ctProto, "", valid, 200},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := postHTTP(t, tr.httpAddr, tc.method, tc.ct, tc.enc, tc.body)
			if r.code != tc.want {
				t.Fatalf("got %d %s; want %d", r.code, r.body, tc.want)
			}
			if tc.want != 200 && tc.ct == ctProto && r.ct != ctProto {
				t.Errorf("got error body content type %q; want %q", r.ct, ctProto)
			}
		})
	}
	// Still serving after all that.
	td, ids := makeTraces("after-bad", 3)
	if r := postHTTP(t, tr.httpAddr, "POST", ctProto, "", protoBody(t, td)); r.code != 200 {
		t.Fatalf("valid request after bad ones: got %d", r.code)
	}
	up.waitIDs(t, ids, 10*time.Second)
}

func TestGRPCBadInputs(t *testing.T) {
	up := newSink()
	up.start(t, "127.0.0.1:0")
	opts := testOptions(t, up.addr)
	opts.MaxRequestSize = 64 << 10
	tr := startRelay(t, opts)
	cc, err := grpc.NewClient(tr.grpcAddr, grpc.WithTransportCredentials(insecureCreds()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	td, _ := makeTraces("bad-grpc", 4)
	valid := protoBody(t, td)
	tests := []struct {
		name string
		body []byte
		opts []grpc.CallOption
		want codes.Code
	}{
		{"garbage", []byte("\xff\xff\xff\xff not protobuf"), nil, codes.InvalidArgument},
		{"truncated", valid[:len(valid)-3], nil, codes.InvalidArgument},
		{"oversized", make([]byte, 100<<10), nil, codes.ResourceExhausted},
		{"gzip bomb", make([]byte, 10<<20), []grpc.CallOption{grpc.UseCompressor("gzip")}, codes.ResourceExhausted},
		{"empty", nil, nil, codes.OK},
		{"valid gzip", valid, []grpc.CallOption{grpc.UseCompressor("gzip")}, codes.OK},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var out rawMsg
			opts := append([]grpc.CallOption{grpc.ForceCodecV2(rawCodec{})}, tc.opts...)
			err := cc.Invoke(context.Background(), exportMethod, &rawMsg{b: tc.body}, &out, opts...)
			if got := codeOf(err); got != tc.want {
				t.Fatalf("got %v (%v); want %v", got, err, tc.want)
			}
			if tc.want == codes.ResourceExhausted && hasRetryInfo(err) {
				t.Fatalf("got RetryInfo on an oversized request; want none (not retryable)")
			}
		})
	}
}

func TestDrainFlushesAndLeavesRest(t *testing.T) {
	up := newSink()
	up.start(t, "127.0.0.1:0")
	opts := testOptions(t, up.addr)
	opts.Batch.Timeout = time.Hour // only the drain flushes
	tr := startRelay(t, opts)
	td, ids := makeTraces("drain-svc", 6)
	if err := sendGRPC(grpcClient(t, tr.grpcAddr), td); err != nil {
		t.Fatal(err)
	}
	tr.stop(t)
	up.waitIDs(t, ids, time.Second) // already there: Run flushed before returning

	// Upstream down: Run returns after the grace period and the spans stay queued.
	addr := freeAddr(t)
	opts = testOptions(t, addr)
	opts.ShutdownGrace = 300 * time.Millisecond
	tr = startRelay(t, opts)
	td, ids = makeTraces("drain-svc", 6)
	if err := sendGRPC(grpcClient(t, tr.grpcAddr), td); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	tr.stop(t)
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("drain took %v with a 300ms grace; want about the grace", d)
	}
	up2 := newSink()
	up2.start(t, addr)
	// A restart of Run on the same relay (as the supervisor does) exports them.
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- tr.Run(ctx) }()
	up2.waitIDs(t, ids, 10*time.Second)
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("second Run: %v", err)
	}
}

func TestFileExporter(t *testing.T) {
	opts := testOptions(t, "")
	path := filepath.Join(t.TempDir(), "out", "spans.jsonl")
	opts.Exporter = Exporter{Protocol: "file", Path: path}
	tr := startRelay(t, opts)
	if res, ok := tr.rec.WaitFor(health.OTLP, 5*time.Second, func(r health.Result) bool { return r.OK }); !ok {
		t.Fatalf("got health %+v; want OK (the file's directory can be created)", res)
	}
	var want []uint64
	for i := 0; i < 3; i++ {
		td, ids := makeTraces("file-svc", 4)
		if err := sendGRPC(grpcClient(t, tr.grpcAddr), td); err != nil {
			t.Fatal(err)
		}
		want = append(want, ids...)
	}
	tr.stop(t)
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	got := map[uint64]bool{}
	for _, line := range bytes.Split(bytes.TrimSpace(b), []byte("\n")) {
		var u ptrace.JSONUnmarshaler
		td, err := u.UnmarshalTraces(line)
		if err != nil {
			t.Fatalf("line %q: %v", line, err)
		}
		forEachSpan(td, func(rs ptrace.ResourceSpans, sp ptrace.Span) {
			id := sp.SpanID()
			got[binary.BigEndian.Uint64(id[:])] = true
			if v, _ := rs.Resource().Attributes().Get("k8s.node.name"); v.AsString() != "node-a" {
				t.Errorf("got k8s.node.name %q; want node-a", v.AsString())
			}
		})
	}
	for _, id := range want {
		if !got[id] {
			t.Fatalf("span %d missing from %s", id, path)
		}
	}
}

func forEachSpan(td ptrace.Traces, f func(ptrace.ResourceSpans, ptrace.Span)) {
	rss := td.ResourceSpans()
	for i := 0; i < rss.Len(); i++ {
		sss := rss.At(i).ScopeSpans()
		for j := 0; j < sss.Len(); j++ {
			spans := sss.At(j).Spans()
			for k := 0; k < spans.Len(); k++ {
				f(rss.At(i), spans.At(k))
			}
		}
	}
}

func TestSplitKeepsGrouping(t *testing.T) {
	td, ids := makeTraces("split-svc", 101)
	parts := split(td, 4)
	if len(parts) != 4 {
		t.Fatalf("got %d parts; want 4", len(parts))
	}
	seen := 0
	for _, p := range parts {
		forEachSpan(p, func(rs ptrace.ResourceSpans, sp ptrace.Span) {
			seen++
			if v, _ := rs.Resource().Attributes().Get("service.name"); v.AsString() != "split-svc" {
				t.Errorf("span lost its resource")
			}
		})
		if p.ResourceSpans().At(0).ScopeSpans().At(0).Scope().Name() != "test-scope" {
			t.Errorf("part lost its scope")
		}
	}
	if seen != len(ids) {
		t.Fatalf("got %d spans after split; want %d", seen, len(ids))
	}
}

func TestLargeRequestIsSplitIntoBatches(t *testing.T) {
	up := newSink()
	up.start(t, "127.0.0.1:0")
	opts := testOptions(t, up.addr)
	opts.Batch.MaxBytes = 16 << 10
	tr := startRelay(t, opts)
	td, ids := makeTraces("large-svc", 1000) // ~100 KiB
	if err := sendGRPC(grpcClient(t, tr.grpcAddr), td); err != nil {
		t.Fatal(err)
	}
	up.waitIDs(t, ids, 10*time.Second)
	if _, calls := up.count(); calls < 5 {
		t.Fatalf("got %d upstream calls; want the request split into batches of <= 16 KiB", calls)
	}
}

func TestUpdate(t *testing.T) {
	base := testOptions(t, "127.0.0.1:1")
	r, err := New(base, testLogger(t), nilRegistry(), nil)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		mutate  func(*Options)
		restart bool
	}{
		{"same", func(*Options) {}, false},
		{"resource attributes", func(o *Options) { o.ResourceAttributes = map[string]string{"a": "b"} }, false},
		{"batch", func(o *Options) { o.Batch.MaxSpans = 5 }, false},
		{"retry", func(o *Options) { o.Retry.MaxInterval = time.Minute }, false},
		{"timeout", func(o *Options) { o.Exporter.Timeout = time.Minute }, false},
		{"headers", func(o *Options) { o.Exporter.Headers = map[string]string{"x": "y"} }, true},
		{"max request size", func(o *Options) { o.MaxRequestSize = 1 << 20 }, true},
		{"endpoint", func(o *Options) { o.Exporter.Endpoint = "127.0.0.1:2" }, true},
		{"queue dir", func(o *Options) { o.Queue.Dir = t.TempDir() }, true},
		{"grpc listen", func(o *Options) { o.GRPCListen = netip.MustParseAddrPort("127.0.0.1:4999") }, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			o := base
			tc.mutate(&o)
			err := r.Update(o)
			if got := err == health.ErrNeedsRestart; got != tc.restart {
				t.Fatalf("got %v; want restart=%v", err, tc.restart)
			}
			r.Update(base)
		})
	}
	bad := base
	bad.Exporter.Protocol = "carrier-pigeon"
	if err := r.Update(bad); err == nil || !strings.Contains(err.Error(), "otlp.exporter.protocol") {
		t.Fatalf("got %v; want an error naming otlp.exporter.protocol", err)
	}
}

func TestGzipCompressorIsOurs(t *testing.T) {
	if _, ok := encoding.GetCompressor("gzip").(*gzipCompressor); !ok {
		t.Fatalf("got gRPC gzip compressor %T; want the relay's *gzipCompressor", encoding.GetCompressor("gzip"))
	}
}

func TestGRPCExporterHeadersAndNoCompression(t *testing.T) {
	up := newSink()
	up.start(t, "127.0.0.1:0")
	opts := testOptions(t, up.addr)
	opts.Exporter.Headers = map[string]string{"authorization": "Bearer t0ken", "x-tenant": "blue"}
	opts.Exporter.Compression = "none"
	tr := startRelay(t, opts)
	td, ids := makeTraces("headers", 2)
	if err := sendGRPC(grpcClient(t, tr.grpcAddr), td); err != nil {
		t.Fatal(err)
	}
	up.waitIDs(t, ids, 10*time.Second)
	up.mu.Lock()
	defer up.mu.Unlock()
	for k, want := range opts.Exporter.Headers {
		if got := up.md.Get(k); len(got) != 1 || got[0] != want {
			t.Errorf("got metadata %s=%v; want %q", k, got, want)
		}
	}
	if got := up.md.Get("grpc-encoding"); len(got) != 0 {
		t.Errorf("got grpc-encoding %v with compression none; want none", got)
	}
}

func TestCorruptQueueSegmentIsReportedNotFatal(t *testing.T) {
	addr := freeAddr(t)
	opts := testOptions(t, addr)
	// First run: queue spans with the upstream down, then stop.
	tr := startRelay(t, opts)
	td, _ := makeTraces("corrupt", 5)
	if err := sendGRPC(grpcClient(t, tr.grpcAddr), td); err != nil {
		t.Fatal(err)
	}
	tr.stop(t)
	segs, _ := filepath.Glob(filepath.Join(opts.Queue.Dir, "*.seg"))
	corrupted := false
	for _, s := range segs {
		b, _ := os.ReadFile(s)
		if len(b) > 20 {
			b[12] ^= 0xff
			os.WriteFile(s, b, 0o600)
			corrupted = true
		}
	}
	if !corrupted {
		t.Fatalf("no queued data to corrupt in %v", segs)
	}
	// Second run: the segment is quarantined and reported; new spans still flow.
	up := newSink()
	up.start(t, addr)
	tr = startRelay(t, opts)
	res, ok := tr.rec.WaitFor(health.OTLP, 10*time.Second, func(r health.Result) bool { return strings.Contains(r.Detail, "corrupt") })
	if !ok {
		t.Fatalf("got health %+v; want the quarantined segment reported", res)
	}
	if got := testutil.ToFloat64(tr.m.corrupt); got != 1 {
		t.Fatalf("got corrupt segments %v; want 1", got)
	}
	q, _ := filepath.Glob(filepath.Join(opts.Queue.Dir, "*.corrupt"))
	if len(q) != 1 {
		t.Fatalf("got quarantined files %v; want 1", q)
	}
	td, ids := makeTraces("after-corrupt", 3)
	if err := sendGRPC(grpcClient(t, tr.grpcAddr), td); err != nil {
		t.Fatal(err)
	}
	up.waitIDs(t, ids, 10*time.Second)
}
