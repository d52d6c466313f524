package peers

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"testing"
	"time"
)

// otlpJSONTrace is one span in OTLP/JSON (ids are hex in OTLP/JSON).
func otlpJSONTrace(service, name, traceID, spanID string) []byte {
	now := time.Now().UnixNano()
	return fmt.Appendf(nil, `{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":%q}}]},
"scopeSpans":[{"scope":{"name":"peers-test"},"spans":[{"traceId":%q,"spanId":%q,"name":%q,"kind":1,
"startTimeUnixNano":"%d","endTimeUnixNano":"%d","attributes":[{"key":"test.attr","value":{"stringValue":"yes"}}]}]}]}]}`,
		service, traceID, spanID, name, now-int64(time.Millisecond), now)
}

func randHex(t *testing.T, n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

func TestStartJaeger(t *testing.T) {
	t.Parallel()
	j := StartJaeger(t)

	// OTLP/HTTP with JSON, straight from the test.
	traceID, spanID := randHex(t, 16), randHex(t, 8)
	resp, err := http.Post("http://"+j.OTLPHTTPAddr+"/v1/traces", "application/json",
		bytes.NewReader(otlpJSONTrace("peers-http", "op-http", traceID, spanID)))
	if err != nil {
		t.Fatalf("POST OTLP/HTTP: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("POST OTLP/HTTP: got %s; want 200 OK", resp.Status)
	}
	traces := j.WaitTraces(t, "peers-http", 1, 30*time.Second)
	if len(traces) != 1 || traces[0].TraceID != traceID || len(traces[0].Spans) != 1 {
		t.Fatalf("got traces %+v; want one trace %s with one span", traces, traceID)
	}
	sp := traces[0].Spans[0]
	if sp.SpanID != spanID || sp.OperationName != "op-http" {
		t.Errorf("got span %s %q; want %s %q", sp.SpanID, sp.OperationName, spanID, "op-http")
	}
	if v, ok := sp.Tag("test.attr"); !ok || v != "yes" {
		t.Errorf("got tag test.attr = %v, %v; want yes, true", v, ok)
	}

	// OTLP/gRPC with telemetrygen, when it is built.
	t.Run("telemetrygen-grpc", func(t *testing.T) {
		bin := Path(t, "telemetrygen")
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		out, err := exec.CommandContext(ctx, bin, "traces", "--otlp-endpoint", j.OTLPGRPCAddr, "--otlp-insecure",
			"--traces", "3", "--service", "peers-grpc").CombinedOutput()
		if err != nil {
			t.Fatalf("telemetrygen: %v\n%s", err, out)
		}
		j.WaitTraces(t, "peers-grpc", 3, 30*time.Second)
	})

	// OTLP/HTTP with otel-cli, when it is built.
	t.Run("otel-cli-http", func(t *testing.T) {
		bin := Path(t, "otel-cli")
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		out, err := exec.CommandContext(ctx, bin, "span", "--endpoint", "http://"+j.OTLPHTTPAddr,
			"--protocol", "http/protobuf", "--service", "peers-otel-cli", "--name", "cli-span", "--fail", "--verbose").CombinedOutput()
		if err != nil {
			t.Fatalf("otel-cli: %v\n%s", err, out)
		}
		got := j.WaitTraces(t, "peers-otel-cli", 1, 30*time.Second)
		if got[0].Spans[0].OperationName != "cli-span" {
			t.Errorf("got operation %q; want cli-span", got[0].Spans[0].OperationName)
		}
	})

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	services, err := j.Services(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(services, "peers-http") {
		t.Errorf("got services %v; want peers-http among them", services)
	}
}

func TestStartSpire(t *testing.T) {
	t.Parallel()
	s := StartSpire(t, "")
	uid := os.Getuid()
	id := "spiffe://example.org/peers-test/uid-" + strconv.Itoa(uid)
	entry := s.CreateUIDEntry(t, id, uid)
	s.WaitSVID(t, id, 30*time.Second)

	// The agent comes back with its stored identity (the join token is spent).
	s.RestartAgent(t)
	s.WaitSVID(t, id, 30*time.Second)

	// With the server down the agent keeps serving; the server comes back.
	s.StopServer(t)
	s.WaitSVID(t, id, 10*time.Second)
	s.StartServer(t)

	id2 := "spiffe://example.org/peers-test/second"
	s.CreateEntry(t, id2, "unix:uid:"+strconv.Itoa(uid))
	s.WaitSVID(t, id2, 30*time.Second)
	s.DeleteEntry(t, entry)

	if !s.AgentRunning() {
		t.Errorf("agent not running at the end")
	}
	// A second agent could attest with a fresh token.
	if tok := s.JoinToken(t, ""); len(tok) < 10 {
		t.Errorf("got join token %q; want a token", tok)
	}
}

func TestStartOtelcol(t *testing.T) {
	t.Parallel()
	j := StartJaeger(t)
	c := StartOtelcol(t, j.OTLPGRPCAddr)
	traceID, spanID := randHex(t, 16), randHex(t, 8)
	resp, err := http.Post("http://"+c.OTLPHTTPAddr+"/v1/traces", "application/json",
		bytes.NewReader(otlpJSONTrace("peers-via-otelcol", "op", traceID, spanID)))
	if err != nil {
		t.Fatalf("POST OTLP/HTTP to otelcol: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("POST OTLP/HTTP to otelcol: got %s; want 200 OK", resp.Status)
	}
	got := j.WaitTraces(t, "peers-via-otelcol", 1, 30*time.Second)
	if got[0].TraceID != traceID {
		t.Errorf("got trace %s; want %s", got[0].TraceID, traceID)
	}

	// The debug exporter (no upstream) accepts and drops.
	d := StartOtelcol(t, "")
	resp, err = http.Post("http://"+d.OTLPHTTPAddr+"/v1/traces", "application/json",
		bytes.NewReader(otlpJSONTrace("dropped", "op", randHex(t, 16), randHex(t, 8))))
	if err != nil {
		t.Fatalf("POST OTLP/HTTP to debug otelcol: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("POST OTLP/HTTP to debug otelcol: got %s; want 200 OK", resp.Status)
	}
}
