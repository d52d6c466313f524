package peers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// Jaeger is a Jaeger v2 all-in-one (`jaeger --config FILE`) with in-memory storage,
// listening only on 127.0.0.1 ports chosen for this test.
type Jaeger struct {
	OTLPGRPCAddr string // host:port of the OTLP/gRPC receiver
	OTLPHTTPAddr string // host:port of the OTLP/HTTP receiver (POST http://ADDR/v1/traces)
	QueryURL     string // http://host:port of the query service (GET /api/services, /api/traces)
	Config       string // path of the config file it runs with
	Log          string // path of its log

	proc *process
}

// jaegerConfig is a minimal all-in-one: OTLP in, batch, in-memory store, query API.
// The collector's own metrics endpoint (default :8888) is turned off.
const jaegerConfig = `service:
  extensions: [jaeger_storage, jaeger_query, healthcheckv2]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: info
extensions:
  healthcheckv2:
    use_v2: true
    http:
      endpoint: %[4]s
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: %[3]s
    grpc:
      endpoint: %[5]s
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 100000
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: %[1]s
      http:
        endpoint: %[2]s
processors:
  batch:
    timeout: 100ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
`

// StartJaeger starts Jaeger for t and stops it when t ends. It returns once the OTLP
// receivers accept connections and the query API answers, or fails t (within ~1 min).
func StartJaeger(t testing.TB) *Jaeger {
	t.Helper()
	bin := Path(t, "jaeger")
	dir := t.TempDir()
	var lastErr error
	for attempt := range 3 { // a port found free may be taken before Jaeger binds it
		ports, err := freePorts(5)
		if err != nil {
			t.Fatal(err)
		}
		j := &Jaeger{
			OTLPGRPCAddr: loopback(ports[0]),
			OTLPHTTPAddr: loopback(ports[1]),
			QueryURL:     "http://" + loopback(ports[2]),
			Config:       filepath.Join(dir, fmt.Sprintf("jaeger-%d.yaml", attempt)),
			Log:          filepath.Join(dir, fmt.Sprintf("jaeger-%d.log", attempt)),
		}
		cfg := fmt.Sprintf(jaegerConfig, j.OTLPGRPCAddr, j.OTLPHTTPAddr, loopback(ports[2]), loopback(ports[3]), loopback(ports[4]))
		if err := os.WriteFile(j.Config, []byte(cfg), 0o644); err != nil {
			t.Fatalf("write jaeger config: %v", err)
		}
		j.proc, err = startProcess("jaeger", j.Log, bin, "--config", j.Config)
		if err != nil {
			t.Fatal(err)
		}
		err = j.proc.waitReady(60*time.Second, j.ready)
		if err == nil {
			t.Cleanup(func() { j.proc.stop(10 * time.Second) })
			return j
		}
		j.proc.stop(5 * time.Second)
		lastErr = fmt.Errorf("%w\n--- %s ---\n%s", err, j.Log, j.proc.logTail(30))
		if !errors.Is(err, errExited) {
			break
		}
	}
	t.Fatalf("start jaeger: %v", lastErr)
	return nil
}

func (j *Jaeger) ready(ctx context.Context) error {
	for _, a := range []string{j.OTLPGRPCAddr, j.OTLPHTTPAddr} {
		if err := dialTCP(ctx, a); err != nil {
			return err
		}
	}
	_, err := j.Services(ctx)
	return err
}

// Stop stops Jaeger now (it is also stopped when the test ends).
func (j *Jaeger) Stop() { j.proc.stop(10 * time.Second) }

// JaegerTrace is one trace as the query API returns it (/api/traces).
type JaegerTrace struct {
	TraceID   string                   `json:"traceID"`
	Spans     []JaegerSpan             `json:"spans"`
	Processes map[string]JaegerProcess `json:"processes"`
}

// JaegerSpan is one span of a JaegerTrace. StartTime is in microseconds since the
// epoch, Duration in microseconds.
type JaegerSpan struct {
	TraceID       string            `json:"traceID"`
	SpanID        string            `json:"spanID"`
	OperationName string            `json:"operationName"`
	References    []JaegerReference `json:"references"`
	StartTime     int64             `json:"startTime"`
	Duration      int64             `json:"duration"`
	Tags          []JaegerKV        `json:"tags"`
	ProcessID     string            `json:"processID"`
}

// JaegerReference links a span to its parent (RefType "CHILD_OF").
type JaegerReference struct {
	RefType string `json:"refType"`
	TraceID string `json:"traceID"`
	SpanID  string `json:"spanID"`
}

// JaegerKV is a span tag or process tag.
type JaegerKV struct {
	Key   string `json:"key"`
	Type  string `json:"type"`
	Value any    `json:"value"`
}

// JaegerProcess is the emitting service of spans (OTLP resource).
type JaegerProcess struct {
	ServiceName string     `json:"serviceName"`
	Tags        []JaegerKV `json:"tags"`
}

// Tag returns the value of the span tag key.
func (s JaegerSpan) Tag(key string) (any, bool) {
	for _, kv := range s.Tags {
		if kv.Key == key {
			return kv.Value, true
		}
	}
	return nil, false
}

func (j *Jaeger) get(ctx context.Context, path string, q url.Values, out any) error {
	u := j.QueryURL + path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", u, resp.Status)
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("decode GET %s: %w", u, err)
	}
	return nil
}

// Services returns the service names Jaeger has spans for (GET /api/services).
func (j *Jaeger) Services(ctx context.Context) ([]string, error) {
	var r struct {
		Data []string `json:"data"`
	}
	if err := j.get(ctx, "/api/services", nil, &r); err != nil {
		return nil, err
	}
	return r.Data, nil
}

// Traces returns up to 1000 traces of service (GET /api/traces?service=...).
func (j *Jaeger) Traces(ctx context.Context, service string) ([]JaegerTrace, error) {
	var r struct {
		Data []JaegerTrace `json:"data"`
	}
	q := url.Values{"service": {service}, "limit": {strconv.Itoa(1000)}, "lookback": {"1h"}}
	if err := j.get(ctx, "/api/traces", q, &r); err != nil {
		return nil, err
	}
	return r.Data, nil
}

// WaitTraces polls until Jaeger holds at least n traces of service and returns them,
// or fails t after timeout.
func (j *Jaeger) WaitTraces(t testing.TB, service string, n int, timeout time.Duration) []JaegerTrace {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var (
		got []JaegerTrace
		err error
	)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		got, err = j.Traces(ctx, service)
		cancel()
		if err == nil && len(got) >= n {
			return got
		}
		if time.Now().After(deadline) {
			t.Fatalf("jaeger: got %d traces of service %q (last error %v); want >= %d within %v\n--- %s ---\n%s",
				len(got), service, err, n, timeout, j.Log, j.proc.logTail(20))
		}
		time.Sleep(200 * time.Millisecond)
	}
}
