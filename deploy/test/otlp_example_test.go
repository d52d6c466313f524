package deploytest

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
)

// The OTLP workload example, run for real: telemetrygen with the pod's own arguments
// (NODE_IP being this machine, the port the relay got, two seconds instead of an hour)
// sends to nodeagent's relay, which adds the ConfigMap's resource attributes and
// exports the spans (to a file here).
func TestOTLPWorkloadExampleReachesTheRelay(t *testing.T) {
	t.Parallel()
	tg := peerPath(t, "telemetrygen")
	bin := nodeagentBinary(t)
	b := loadK8s(t)
	var pod *corev1.Pod
	for _, o := range loadManifests(t, deployPath(t, "examples"), "local.yaml") {
		if p, ok := o.obj.(*corev1.Pod); ok && p.Name == "otlp-workload" {
			pod = p
		}
	}
	if pod == nil {
		t.Fatal("no otlp-workload pod in deploy/examples")
	}
	attrs, ok := b.cfg.get("otlp.resource_attributes")
	if !ok {
		t.Fatal("the ConfigMap's config has no otlp.resource_attributes")
	}

	dir := t.TempDir()
	addrs := freeAddrs(t, "health", "otlp-grpc", "otlp-http")
	spans := filepath.Join(dir, "spans.jsonl")
	var attrYAML strings.Builder
	for k, v := range attrs.(map[string]any) {
		attrYAML.WriteString("    " + k + ": \"" + v.(string) + "\"\n")
	}
	cfg := filepath.Join(dir, "config.yaml")
	os.WriteFile(cfg, []byte(`node_name: `+testNodeName+`
health: { listen: "`+addrs["health"]+`" }
otlp:
  grpc_listen: "`+addrs["otlp-grpc"]+`"
  http_listen: "`+addrs["otlp-http"]+`"
  exporter: { protocol: file, path: `+spans+` }
  resource_attributes:
`+attrYAML.String()+`  batch: { max_spans: 8192, timeout: 100ms }
  max_request_size: 4MiB
  queue: { dir: `+filepath.Join(dir, "queue")+`, max_bytes: 16MiB }
`), 0o644)
	notify := newNotifySocket(t)
	agent := startAgent(t, bin, cfg, nil, notify, 0)
	if _, err := notify.waitFor(agent.pid, "READY=1", 60*time.Second, agent.exited); err != nil {
		t.Fatalf("%v\n%s", err, agent.output())
	}

	// The pod's arguments, with what the kubelet and the node would give them.
	var args []string
	endpoint, duration := false, false
	for _, a := range pod.Spec.Containers[0].Args {
		switch a {
		case "--otlp-endpoint=$(NODE_IP):4317":
			a, endpoint = "--otlp-endpoint="+addrs["otlp-grpc"], true
		case "--duration=1h":
			a, duration = "--duration=2s", true
		}
		args = append(args, a)
	}
	if !endpoint || !duration {
		t.Fatalf("the example's args %q lack --otlp-endpoint=$(NODE_IP):4317 or --duration=1h", pod.Spec.Containers[0].Args)
	}
	out, err := exec.Command(tg, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("telemetrygen %q: %v\n%s", args, err, out)
	}

	var data []byte
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		data, _ = os.ReadFile(spans)
		if strings.Contains(string(data), "otlp-workload") && strings.Contains(string(data), testNodeName) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	for _, want := range []string{"otlp-workload", "k8s.node.name", testNodeName} {
		if !strings.Contains(string(data), want) {
			t.Errorf("exported spans lack %q (service name from the example, node attribute from the ConfigMap); got %d bytes:\n%.2000s", want, len(data), data)
		}
	}
	agent.cmd.Process.Signal(syscall.SIGTERM)
	agent.wait(t, 15*time.Second)
}
