package collector

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"testing"

	"go.opentelemetry.io/collector/pdata/ptrace/ptraceotlp"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/nodeagent/nodeagent/collector/queue"
)

// fuzzRun is a runState with a real queue and no listeners, for driving the decoders directly.
func fuzzRun(f *testing.F) *runState {
	opts := testOptions(f, "127.0.0.1:1")
	opts.MaxRequestSize = 1 << 20
	opts.Queue.MaxBytes = 1 << 40 // never full: the fuzzer appends a lot
	r, err := New(opts, testLogger(f), nilRegistry(), nil)
	if err != nil {
		f.Fatal(err)
	}
	q, err := queue.Open(queue.Options{Dir: opts.Queue.Dir, MaxBytes: opts.Queue.MaxBytes, Fsync: queue.FsyncNever}, queue.Events{})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { q.Close() })
	return &runState{t: r, q: q}
}

func fuzzSeeds(f *testing.F) [][]byte {
	td, _ := makeTraces("fuzz-svc", 3)
	pb := protoBody(f, td)
	js, _ := ptraceotlp.NewExportRequestFromTraces(td).MarshalJSON()
	return [][]byte{pb, js, nil, []byte("{}"), pb[:len(pb)/2], gz(pb), zst(pb), gz(js),
		[]byte(`{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"zz","spanId":"01"}]}]}]}`),
		{0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f}}
}

// FuzzHTTPTraces drives POST /v1/traces with arbitrary bodies, content types and encodings:
// the handler must answer 200, 400, 413 or 415 and never panic.
func FuzzHTTPTraces(f *testing.F) {
	rn := fuzzRun(f)
	for _, s := range fuzzSeeds(f) {
		for kind := uint8(0); kind < 6; kind++ {
			f.Add(kind, s)
		}
	}
	h := rn.httpHandler()
	cts := []string{ctProto, ctJSON}
	encs := []string{"", "gzip", "zstd"}
	f.Fuzz(func(t *testing.T, kind uint8, body []byte) {
		req := httptest.NewRequest(http.MethodPost, TracesPath, bytes.NewReader(body))
		req.Header.Set("Content-Type", cts[int(kind)%2])
		if e := encs[int(kind/2)%3]; e != "" {
			req.Header.Set("Content-Encoding", e)
		}
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		switch w.Code {
		case 200, 400, 413, 415:
		default:
			t.Fatalf("got HTTP %d %s; want 200, 400, 413 or 415", w.Code, w.Body)
		}
		if w.Code != 200 && w.Header().Get("Content-Type") != cts[int(kind)%2] {
			t.Fatalf("got error content type %q; want the request's %q", w.Header().Get("Content-Type"), cts[int(kind)%2])
		}
	})
}

// FuzzGRPCTraces drives the gRPC Export handler with arbitrary request bytes: it must
// answer OK or InvalidArgument and never panic.
func FuzzGRPCTraces(f *testing.F) {
	rn := fuzzRun(f)
	for _, s := range fuzzSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		_, err := rn.exportGRPC(context.Background(), body)
		if c := status.Code(err); c != codes.OK && c != codes.InvalidArgument {
			t.Fatalf("got %v; want OK or InvalidArgument", err)
		}
	})
}

var fuzzAttrs = map[string]string{"k8s.node.name": "node-f", "host.name": "host-f"}

// FuzzFastPathMatchesPdata checks that the fast path never accepts what pdata rejects, and
// that what it produces decodes to exactly what pdata's decode-and-enrich produces.
func FuzzFastPathMatchesPdata(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s)
	}
	td, _ := makeTraces("preset", 4)
	td.ResourceSpans().At(0).Resource().Attributes().PutStr("k8s.node.name", "mine")
	sp := td.ResourceSpans().At(0).ScopeSpans().At(0).Spans().At(0)
	sp.Events().AppendEmpty().Attributes().PutEmptySlice("list").AppendEmpty().SetEmptyMap().PutDouble("d", 1.5)
	sp.Links().AppendEmpty().SetTraceID(sp.TraceID())
	sp.Status().SetMessage("oops")
	td.ResourceSpans().AppendEmpty().ScopeSpans().AppendEmpty().Spans().AppendEmpty().SetName("no resource attributes")
	f.Add(protoBody(f, td))
	attrs := encodeAttrs(fuzzAttrs)
	f.Fuzz(func(t *testing.T, data []byte) {
		out, n, ok := fastRewrite(nil, data, attrs)
		if !ok {
			return
		}
		want := ptraceotlp.NewExportRequest()
		if err := want.UnmarshalProto(data); err != nil {
			t.Fatalf("fast path accepted what pdata rejects: %v", err)
		}
		if c := want.Traces().SpanCount(); c != n {
			t.Fatalf("got %d spans from the fast path; pdata counts %d", n, c)
		}
		enrich(want.Traces(), fuzzAttrs)
		got := ptraceotlp.NewExportRequest()
		if err := got.UnmarshalProto(out); err != nil {
			t.Fatalf("fast path output does not decode: %v", err)
		}
		gj, _ := got.MarshalJSON()
		wj, _ := want.MarshalJSON()
		if !bytes.Equal(gj, wj) {
			t.Fatalf("fast path output differs from pdata's:\n got %s\nwant %s", gj, wj)
		}
	})
}
