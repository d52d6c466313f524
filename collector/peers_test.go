package collector

import (
	"context"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nodeagent/nodeagent/test/peers"
)

// Real peers: otel-cli and telemetrygen as workloads, Jaeger all-in-one as the upstream.

func runPeer(t *testing.T, bin string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", bin, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func TestPeersOtelCLIThroughRelayToJaeger(t *testing.T) {
	otelCLI := peers.Path(t, "otel-cli")
	j := peers.StartJaeger(t)
	for _, exporter := range []struct{ protocol, endpoint string }{
		{"grpc", j.OTLPGRPCAddr},
		{"http", j.OTLPHTTPAddr},
	} {
		t.Run("exporter "+exporter.protocol, func(t *testing.T) {
			opts := testOptions(t, exporter.endpoint)
			opts.Exporter.Protocol = exporter.protocol
			tr := startRelay(t, opts)
			tests := []struct {
				name string
				args []string
			}{
				{"grpc", []string{"--protocol", "grpc", "--endpoint", tr.grpcAddr}},
				{"http", []string{"--protocol", "http/protobuf", "--endpoint", "http://" + tr.httpAddr}},
			}
			for i, tc := range tests {
				t.Run("client "+tc.name, func(t *testing.T) {
					service := fmt.Sprintf("otel-cli-%s-%s-%d", exporter.protocol, tc.name, time.Now().UnixNano())
					spanID := fmt.Sprintf("%016x", uint64(time.Now().UnixNano())+uint64(i))
					args := append([]string{"span", "--insecure", "--fail", "--verbose", "--timeout", "10s",
						"--service", service, "--name", "relay-" + tc.name, "--force-span-id", spanID,
						"--attrs", "k8s.node.name=must-not-change-the-resource"}, tc.args...)
					runPeer(t, otelCLI, args...)
					traces := j.WaitTraces(t, service, 1, 30*time.Second)
					sp := traces[0].Spans[0]
					if sp.SpanID != spanID || sp.OperationName != "relay-"+tc.name {
						t.Fatalf("got span %s %q; want %s %q", sp.SpanID, sp.OperationName, spanID, "relay-"+tc.name)
					}
					proc := traces[0].Processes[sp.ProcessID]
					tags := map[string]string{}
					for _, kv := range proc.Tags {
						tags[kv.Key] = fmt.Sprint(kv.Value)
					}
					if tags["k8s.node.name"] != "node-a" || tags["host.name"] != "host-a" {
						t.Fatalf("got process tags %v; want k8s.node.name=node-a host.name=host-a added by the relay", tags)
					}
				})
			}
		})
	}
}

func TestPeersTelemetrygenLoadThroughRelayToJaeger(t *testing.T) {
	tg := peers.Path(t, "telemetrygen")
	j := peers.StartJaeger(t)
	opts := testOptions(t, j.OTLPGRPCAddr)
	tr := startRelay(t, opts)
	const workers, perWorker = 2, 200 // traces of 2 spans (parent and one child)
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"grpc", []string{"--otlp-endpoint", tr.grpcAddr}},
		{"http", []string{"--otlp-endpoint", tr.httpAddr, "--otlp-http"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			service := fmt.Sprintf("telemetrygen-%s-%d", tc.name, time.Now().UnixNano())
			exported0 := tr.spans(resExported)
			args := append([]string{"traces", "--otlp-insecure", "--rate", "0", "--workers", strconv.Itoa(workers),
				"--traces", strconv.Itoa(perWorker), "--service", service}, tc.args...)
			runPeer(t, tg, args...)
			want := workers * perWorker
			traces := j.WaitTraces(t, service, want, 60*time.Second)
			spans := 0
			for _, tr := range traces {
				spans += len(tr.Spans)
			}
			if len(traces) != want || spans != 2*want {
				t.Fatalf("got %d traces with %d spans in jaeger; want %d with %d", len(traces), spans, want, 2*want)
			}
			waitMetric(t, func() float64 { return tr.spans(resExported) - exported0 }, float64(2*want))
		})
	}
	if r := tr.spans(resRefused); r != 0 {
		t.Fatalf("got refused=%v under telemetrygen load; want 0", r)
	}
}
