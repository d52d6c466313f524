package peers

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// Otelcol is an OpenTelemetry Collector (test/tools/otelcol: otlp receiver → batch →
// otlp_grpc or debug exporter) listening only on 127.0.0.1 ports chosen for this test.
type Otelcol struct {
	OTLPGRPCAddr string // host:port of the OTLP/gRPC receiver
	OTLPHTTPAddr string // host:port of the OTLP/HTTP receiver
	Upstream     string // host:port it exports to over OTLP/gRPC; "" means the debug exporter (drops)
	Config       string
	Log          string

	proc *process
}

// otelcolConfig: %[1]s grpc, %[2]s http, %[3]s exporter name, %[4]s exporter config.
// The collector's own metrics endpoint is turned off.
const otelcolConfig = `receivers:
  otlp:
    protocols:
      grpc:
        endpoint: %[1]s
      http:
        endpoint: %[2]s
processors:
  batch:
exporters:
  %[3]s:
%[4]s
service:
  telemetry:
    metrics:
      level: none
    logs:
      level: info
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [%[3]s]
    metrics:
      receivers: [otlp]
      processors: [batch]
      exporters: [%[3]s]
    logs:
      receivers: [otlp]
      processors: [batch]
      exporters: [%[3]s]
`

// StartOtelcol starts the collector for t, exporting to upstream (an OTLP/gRPC
// host:port, e.g. Jaeger.OTLPGRPCAddr) or, when upstream is "", to the debug exporter
// at basic verbosity. It is stopped when t ends.
func StartOtelcol(t testing.TB, upstream string) *Otelcol {
	t.Helper()
	bin := Path(t, "otelcol")
	dir := t.TempDir()
	exporter, exporterConf := "debug", "    verbosity: basic"
	if upstream != "" {
		exporter = "otlp_grpc"
		exporterConf = fmt.Sprintf("    endpoint: %s\n    tls:\n      insecure: true", upstream)
	}
	var lastErr error
	for attempt := range 3 {
		ports, err := freePorts(2)
		if err != nil {
			t.Fatal(err)
		}
		c := &Otelcol{
			OTLPGRPCAddr: loopback(ports[0]),
			OTLPHTTPAddr: loopback(ports[1]),
			Upstream:     upstream,
			Config:       filepath.Join(dir, fmt.Sprintf("otelcol-%d.yaml", attempt)),
			Log:          filepath.Join(dir, fmt.Sprintf("otelcol-%d.log", attempt)),
		}
		cfg := fmt.Sprintf(otelcolConfig, c.OTLPGRPCAddr, c.OTLPHTTPAddr, exporter, exporterConf)
		if err := os.WriteFile(c.Config, []byte(cfg), 0o644); err != nil {
			t.Fatalf("write otelcol config: %v", err)
		}
		if c.proc, err = startProcess("otelcol", c.Log, bin, "--config", c.Config); err != nil {
			t.Fatal(err)
		}
		err = c.proc.waitReady(60*time.Second, func(ctx context.Context) error {
			if err := dialTCP(ctx, c.OTLPGRPCAddr); err != nil {
				return err
			}
			return dialTCP(ctx, c.OTLPHTTPAddr)
		})
		if err == nil {
			t.Cleanup(func() { c.proc.stop(10 * time.Second) })
			return c
		}
		c.proc.stop(5 * time.Second)
		lastErr = fmt.Errorf("%w\n--- %s ---\n%s", err, c.Log, c.proc.logTail(30))
		if !errors.Is(err, errExited) {
			break
		}
	}
	t.Fatalf("start otelcol: %v", lastErr)
	return nil
}

// Stop stops the collector now (it is also stopped when the test ends).
func (c *Otelcol) Stop() { c.proc.stop(10 * time.Second) }
