package collector

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/klauspost/compress/gzip"
	"go.opentelemetry.io/collector/pdata/ptrace"
	"go.opentelemetry.io/collector/pdata/ptrace/ptraceotlp"

	"github.com/nodeagent/nodeagent/agent/health"
)

// httpSink is an OTLP/HTTP upstream; it answers the statuses in script first, then 200.
type httpSink struct {
	mu      sync.Mutex
	script  []int
	spans   map[uint64]bool
	headers []http.Header
	calls   atomic.Int64
}

func (s *httpSink) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.calls.Add(1)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.headers = append(s.headers, r.Header.Clone())
	if len(s.script) > 0 {
		code := s.script[0]
		s.script = s.script[1:]
		if code == http.StatusServiceUnavailable {
			w.Header().Set("Retry-After", "0")
		}
		http.Error(w, "scripted", code)
		return
	}
	var body io.Reader = r.Body
	if r.Header.Get("Content-Encoding") == "gzip" {
		zr, err := gzip.NewReader(r.Body)
		if err != nil {
			http.Error(w, err.Error(), 400)
			return
		}
		body = zr
	}
	b, _ := io.ReadAll(body)
	req := ptraceotlp.NewExportRequest()
	if err := req.UnmarshalProto(b); err != nil || r.Header.Get("Content-Type") != ctProto {
		http.Error(w, "bad request", 400)
		return
	}
	forEachSpan(req.Traces(), func(_ ptrace.ResourceSpans, sp ptrace.Span) {
		id := sp.SpanID()
		s.spans[binary.BigEndian.Uint64(id[:])] = true
	})
	out, _ := ptraceotlp.NewExportResponse().MarshalProto()
	w.Header().Set("Content-Type", ctProto)
	w.Write(out)
}

func (s *httpSink) has(ids []uint64) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, id := range ids {
		if !s.spans[id] {
			return false
		}
	}
	return true
}

func TestHTTPExporter(t *testing.T) {
	tests := []struct {
		name      string
		script    []int
		delivered bool
		rejected  bool
	}{
		{"ok", nil, true, false},
		{"503 then ok", []int{503, 503}, true, false},
		{"429 502 504 then ok", []int{429, 502, 504}, true, false},
		{"400 permanent", []int{400}, false, true},
		{"401 permanent", []int{401}, false, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := &httpSink{script: tc.script, spans: map[uint64]bool{}}
			srv := httptest.NewServer(s)
			defer srv.Close()
			opts := testOptions(t, strings.TrimPrefix(srv.URL, "http://"))
			opts.Exporter.Protocol = "http"
			opts.Exporter.Headers = map[string]string{"Authorization": "Bearer t0ken"}
			tr := startRelay(t, opts)
			td, ids := makeTraces("http-exp", 8)
			if err := sendGRPC(grpcClient(t, tr.grpcAddr), td); err != nil {
				t.Fatal(err)
			}
			if tc.delivered {
				deadline := time.Now().Add(10 * time.Second)
				for !s.has(ids) {
					if time.Now().After(deadline) {
						t.Fatalf("spans not delivered over OTLP/HTTP")
					}
					time.Sleep(10 * time.Millisecond)
				}
				s.mu.Lock()
				if got := s.headers[len(s.headers)-1].Get("Authorization"); got != "Bearer t0ken" {
					t.Errorf("got Authorization %q; want the configured header", got)
				}
				s.mu.Unlock()
				if got, want := s.calls.Load(), int64(len(tc.script)+1); got != want {
					t.Errorf("got %d calls; want %d", got, want)
				}
			}
			if tc.rejected {
				waitMetric(t, func() float64 { return tr.spans(resRejected) }, 8)
				time.Sleep(100 * time.Millisecond)
				if got := s.calls.Load(); got != 1 {
					t.Errorf("got %d calls for a permanent error; want 1", got)
				}
			}
		})
	}
}

func TestParseRetryAfter(t *testing.T) {
	future := time.Now().Add(time.Hour).UTC().Format(http.TimeFormat)
	tests := []struct {
		in       string
		min, max time.Duration
	}{
		{"", 0, 0},
		{"7", 7 * time.Second, 7 * time.Second},
		{"-1", 0, 0},
		{"soon", 0, 0},
		{future, 59 * time.Minute, time.Hour},
	}
	for _, tc := range tests {
		if got := parseRetryAfter(tc.in); got < tc.min || got > tc.max {
			t.Errorf("parseRetryAfter(%q) = %v; want in [%v, %v]", tc.in, got, tc.min, tc.max)
		}
	}
}

func TestBackoff(t *testing.T) {
	r := Retry{InitialInterval: time.Second, MaxInterval: 30 * time.Second}
	tests := []struct {
		attempt  int
		min, max time.Duration
	}{
		{0, 500 * time.Millisecond, 1500 * time.Millisecond},
		{1, time.Second, 3 * time.Second},
		{3, 4 * time.Second, 12 * time.Second},
		{20, 15 * time.Second, 45 * time.Second},
	}
	for _, tc := range tests {
		for i := 0; i < 50; i++ {
			if got := backoff(r, tc.attempt); got < tc.min || got > tc.max {
				t.Fatalf("backoff(attempt %d) = %v; want in [%v, %v]", tc.attempt, got, tc.min, tc.max)
			}
		}
	}
}

func TestSocketActivatedListeners(t *testing.T) {
	up := newSink()
	up.start(t, "127.0.0.1:0")
	gl, _ := net.Listen("tcp", "127.0.0.1:0")
	hl, _ := net.Listen("tcp", "127.0.0.1:0")
	defer gl.Close()
	defer hl.Close()
	opts := testOptions(t, up.addr)
	opts.Listeners = map[string]net.Listener{ListenerNameGRPC: gl, ListenerNameHTTP: hl}
	for round := 0; round < 2; round++ { // the passed listeners survive a restart of Run
		tr := startRelay(t, opts)
		td, ids := makeTraces("activated", 4)
		if err := sendGRPC(grpcClient(t, gl.Addr().String()), td); err != nil {
			t.Fatalf("round %d: gRPC on the passed listener: %v", round, err)
		}
		td, ids2 := makeTraces("activated", 4)
		if r := postHTTP(t, hl.Addr().String(), "POST", ctProto, "", protoBody(t, td)); r.code != 200 {
			t.Fatalf("round %d: HTTP on the passed listener: %d", round, r.code)
		}
		up.waitIDs(t, append(ids, ids2...), 10*time.Second)
		tr.stop(t)
	}
}

func TestCheck(t *testing.T) {
	up := newSink()
	up.start(t, "127.0.0.1:0")
	busy, _ := net.Listen("tcp", "127.0.0.1:0")
	defer busy.Close()
	tests := []struct {
		name   string
		mutate func(*Options)
		ok     bool
		detail string
	}{
		{"healthy", func(*Options) {}, true, "upstream reachable"},
		{"upstream down", func(o *Options) { o.Exporter.Endpoint = freeAddr(t) }, false, "upstream"},
		{"port taken", func(o *Options) { o.GRPCListen = netipOf(busy.Addr()) }, false, "cannot listen"},
		{"queue dir is a file", func(o *Options) { o.Queue.Dir = "/proc/self/status/x" }, false, "queue dir"},
		{"bad protocol", func(o *Options) { o.Exporter.Protocol = "smtp" }, false, "otlp.exporter.protocol"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			o := testOptions(t, up.addr)
			tc.mutate(&o)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			res := Check(ctx, o)
			if len(res) != 1 || res[0].Name != health.OTLP {
				t.Fatalf("got %+v; want one otlp result", res)
			}
			if res[0].OK != tc.ok || !strings.Contains(res[0].Detail, tc.detail) {
				t.Fatalf("got %+v; want OK=%v with %q in the detail", res[0], tc.ok, tc.detail)
			}
		})
	}
}
