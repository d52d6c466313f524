package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// valid is a full configuration that passes Validate; each bad case mutates it once.
const valid = `
node_name: worker-1
node_ip: 10.0.0.7
host_root: /
log: { format: json, level: info }
health: { listen: 127.0.0.1:9874 }
shutdown_grace: 10s
hostprep:
  mode: apply
  hugepages: { count: 512, allow_shrink: false, sysctl_file: /etc/sysctl.d/calico.conf }
  modules: [vfio-pci]
  modules_file: /etc/modules-load.d/calico-vfio-pci.conf
uplink: { interface: eth1, required: true, min_mtu: 1500 }
spire: { socket: /run/spire/agent-sockets/api.sock }
steering:
  bpffs: /sys/fs/bpf/nodeagent
  pod_redirect: 10.0.0.7:15001
proxy:
  listen: [127.0.0.1:15001, 10.0.0.7:15001]
  connect_timeout: 250ms
  address_map:
    "169.254.1.2": cluster_1
    "169.254.1.4:443": db.internal:5432
  clusters:
    cluster_1:
      endpoints: [10.0.0.5:22, 10.0.0.6:22]
      lb_policy: round_robin
otlp:
  exporter: { endpoint: collector.example:4317, protocol: grpc }
  batch: { max_spans: 100 }
`

func writeConfig(t *testing.T, body string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestValidConfigAndDefaults(t *testing.T) {
	cfg, err := Load(writeConfig(t, valid))
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if got, want := cfg.Proxy.ConnectTimeout.D(), 250*time.Millisecond; got != want {
		t.Errorf("connect_timeout = %v; want %v", got, want)
	}
	if got, want := cfg.Proxy.IdleTimeout.D(), time.Hour; got != want {
		t.Errorf("idle_timeout default = %v; want %v", got, want)
	}
	if got, want := cfg.OTLP.Batch.MaxSpans, 100; got != want {
		t.Errorf("batch.max_spans = %d; want %d", got, want)
	}
	if got, want := cfg.OTLP.Batch.Timeout.D(), 200*time.Millisecond; got != want {
		t.Errorf("batch.timeout default kept beside a set max_spans = %v; want %v", got, want)
	}
	if got, want := cfg.OTLP.Queue.MaxBytes, Size(512<<20); got != want {
		t.Errorf("queue.max_bytes default = %v; want %v", got, want)
	}
	if got, want := cfg.OTLP.ResourceAttributes["k8s.node.name"], "worker-1"; got != want {
		t.Errorf("resource_attributes[k8s.node.name] = %q; want %q", got, want)
	}
	if cfg.Spire == nil || cfg.Spire.Required {
		t.Errorf("spire = %+v; want present and not required by default", cfg.Spire)
	}
	if got, want := cfg.Health.Listen, "127.0.0.1:9874"; got != want {
		t.Errorf("health.listen = %q; want %q", got, want)
	}
}

func TestAbsentSectionsAreDisabled(t *testing.T) {
	cfg, err := Load(writeConfig(t, "node_name: n\n"))
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if cfg.Hostprep != nil || cfg.Uplink != nil || cfg.Spire != nil || cfg.Steering != nil || cfg.Proxy != nil || cfg.OTLP != nil {
		t.Errorf("absent sections enabled: %+v", cfg)
	}
	if cfg.Health.Listen == "" {
		t.Error("health is always on, got no listen address")
	}
}

func TestEnvExpansion(t *testing.T) {
	t.Setenv("NA_TEST_IP", "10.1.2.3")
	t.Setenv("NA_TEST_PAGES", "64")
	t.Setenv("NA_TEST_EMPTY", "")
	cfg, err := Load(writeConfig(t, `
node_name: ${NA_TEST_NAME:-fallback}   # a comment with ${NA_TEST_OTHER} in it
node_ip: ${NA_TEST_IP}
hostprep:
  hugepages:
    count: ${NA_TEST_PAGES}
otlp:
  exporter: { protocol: file, path: /tmp/x }
  resource_attributes: { k8s.node.name: ${NA_TEST_IP} }
uplink:
  interface: ${NA_TEST_EMPTY:-eth0}
`))
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if cfg.NodeName != "fallback" || cfg.NodeIP != "10.1.2.3" || cfg.Hostprep.Hugepages.Count != 64 || cfg.Uplink.Interface != "eth0" {
		t.Errorf("got name=%q ip=%q count=%d iface=%q; want fallback 10.1.2.3 64 eth0",
			cfg.NodeName, cfg.NodeIP, cfg.Hostprep.Hugepages.Count, cfg.Uplink.Interface)
	}
}

func TestSizes(t *testing.T) {
	for in, want := range map[string]Size{"64MiB": 64 << 20, "1GiB": 1 << 30, "512": 512, "4KiB": 4096} {
		got, err := ParseSize(in)
		if err != nil || got != want {
			t.Errorf("ParseSize(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"64MB", "lots", "-1GiBx", ""} {
		if _, err := ParseSize(in); err == nil {
			t.Errorf("ParseSize(%q) succeeded; want an error", in)
		}
	}
}

func TestBadConfigs(t *testing.T) {
	t.Setenv("NA_UNSET_IP", "")
	os.Unsetenv("NA_UNSET_IP")
	tests := []struct {
		name string
		old  string // replaced in valid; "" means body is the whole file
		new  string
		want []string // substrings of the error
	}{
		{"unknown key", "shutdown_grace: 10s", "shutdown_grace: 10s\nshutdown_grac: 5s", []string{"config.yaml:8: shutdown_grac: unknown key"}},
		{"unknown nested key", "mode: apply", "mode: apply\n  hugepage: {count: 1}", []string{":10: hostprep.hugepage: unknown key", "did you mean \"hugepages\""}},
		{"wrong type", "max_spans: 100", "max_spans: lots", []string{"otlp.batch", "cannot unmarshal !!str `lots` into int"}},
		{"list instead of scalar", "bpffs: /sys/fs/bpf/nodeagent", "bpffs: [/sys/fs/bpf/nodeagent]", []string{"steering.bpffs", "cannot unmarshal"}},
		{"bad node ip", "node_ip: 10.0.0.7", "node_ip: 10.0.0.300", []string{`node_ip: "10.0.0.300" is not an IP address`}},
		{"bad CIDR", "health: { listen: 127.0.0.1:9874 }", "health: { listen: 127.0.0.1:9874, allow_from: [10.0.0.0/33] }", []string{`health.allow_from[0]: "10.0.0.0/33" is not a CIDR`}},
		{"bad duration", "connect_timeout: 250ms", "connect_timeout: 250", []string{"proxy.connect_timeout", `"250" is not a duration`}},
		{"negative count", "count: 512", "count: -4", []string{"hostprep.hugepages.count: -4: must not be negative"}},
		{"absurd count", "count: 512", "count: 999999999", []string{"hostprep.hugepages.count", "more memory than any node has"}},
		{"undefined cluster", `"169.254.1.2": cluster_1`, `"169.254.1.2": cluster_9`, []string{`proxy.address_map["169.254.1.2"]: "cluster_9" names no defined cluster`}},
		{"target is mapped", `db.internal:5432`, `169.254.1.2:80`, []string{`proxy.address_map["169.254.1.4:443"]: target "169.254.1.2:80" is itself a mapped address`}},
		{"endpoint is mapped", "[10.0.0.5:22, 10.0.0.6:22]", "[10.0.0.5:22, 169.254.1.4:443]", []string{"proxy.clusters.cluster_1.endpoints[1]", "itself a mapped address"}},
		{"endpoint without port", "[10.0.0.5:22, 10.0.0.6:22]", "[10.0.0.5:22, 10.0.0.5]", []string{`proxy.clusters.cluster_1.endpoints[1]: "10.0.0.5" has no port`}},
		{"duplicate listeners", "listen: [127.0.0.1:15001, 10.0.0.7:15001]", "listen: [127.0.0.1:15001, 127.0.0.1:15001, 10.0.0.7:15001]", []string{`proxy.listen[1]: "127.0.0.1:15001" is already used by proxy.listen[0]`}},
		{"listener clash across sections", "protocol: grpc }", "protocol: grpc }\n  grpc_listen: 127.0.0.1:9874", []string{`otlp.grpc_listen: "127.0.0.1:9874" is already used by health.listen`}},
		{"bad lb policy", "lb_policy: round_robin", "lb_policy: fastest", []string{`proxy.clusters.cluster_1.lb_policy: "fastest"`}},
		{"bad map key", `"169.254.1.2": cluster_1`, `"169.254.1.2/32": cluster_1`, []string{`proxy.address_map["169.254.1.2/32"]: a prefix is not a key`}},
		{"map key port 0", `"169.254.1.4:443"`, `"169.254.1.4:0"`, []string{`proxy.address_map["169.254.1.4:0"]: port 0`}},
		{"attempts zero", "connect_timeout: 250ms", "connect_timeout: 250ms\n  max_connect_attempts: 0", []string{"proxy.max_connect_attempts: 0: want at least 1"}},
		{"bad log format", "format: json", "format: xml", []string{`log.format: "xml": want json or text`}},
		{"bad log level", "level: info", "level: chatty", []string{"log.level"}},
		{"bad mode", "mode: apply", "mode: yolo", []string{`hostprep.mode: "yolo": want apply or check`}},
		{"sysctl file outside sysctl.d", "sysctl_file: /etc/sysctl.d/calico.conf", "sysctl_file: /etc/calico.conf", []string{"hostprep.hugepages.sysctl_file", "/etc/sysctl.d/*.conf"}},
		{"bad module name", "modules: [vfio-pci]", "modules: [vfio-pci, \"vfio pci\"]", []string{`hostprep.modules[1]: "vfio pci" is not a kernel module name`}},
		{"interface too long", "interface: eth1", "interface: averyveryverylongname0", []string{"uplink.interface", "not a valid interface name"}},
		{"pod_redirect without node ip", "pod_redirect: 10.0.0.7:15001", "pod_redirect: ${NA_UNSET_IP}:15001", []string{`steering.pod_redirect: ":15001" is not an IP:port`, "NA_UNSET_IP"}},
		{"pod_redirect not a listener", "pod_redirect: 10.0.0.7:15001", "pod_redirect: 10.0.0.8:15001", []string{"steering.pod_redirect", "not among proxy.listen"}},
		{"bad exporter protocol", "protocol: grpc }", "protocol: carrier-pigeon }", []string{`otlp.exporter.protocol: "carrier-pigeon"`}},
		{"file exporter without path", "{ endpoint: collector.example:4317, protocol: grpc }", "{ protocol: file }", []string{"otlp.exporter.path: empty"}},
		{"bad size", "batch: { max_spans: 100 }", "batch: { max_spans: 100 }\n  memory_limit: 400MB", []string{"otlp.memory_limit", `"400MB" is not a size`}},
		{"bad spiffe id", "protocol: grpc }", "protocol: grpc, spiffe: { server_id: collector } }", []string{`otlp.exporter.spiffe.server_id: "collector" is not a SPIFFE ID`}},
		{"relative socket", "socket: /run/spire/agent-sockets/api.sock", "socket: api.sock", []string{`spire.socket: "api.sock" must be an absolute path`}},
		{"steering without proxy", "", "node_name: n\nsteering: {}\n", []string{"steering: needs a proxy section"}},
		{"empty file", "", "", []string{"empty file"}},
		{"only comments", "", "# nothing here\n", []string{"empty file"}},
		{"not a mapping", "", "- a\n- b\n", []string{"want a YAML mapping"}},
		{"broken yaml", "", "proxy: [\n", []string{"config.yaml:"}},
		{"several problems at once", "uplink: { interface: eth1, required: true, min_mtu: 1500 }", "uplink:\n  min_mtu: 10\n  interface: \"\"", []string{"uplink.min_mtu: 10", "uplink.interface"}},
		{"unknown key and a bad value together", "mode: apply", "mode: yolo\n  hugepage: {count: 1}", []string{"hostprep.hugepage: unknown key", `hostprep.mode: "yolo"`}},
		{"flow line names the shared path", "min_mtu: 1500", "min_mtu: [1]", []string{":13: uplink: cannot unmarshal"}},
	}
	if len(tests) < 25 {
		t.Fatalf("only %d bad configs", len(tests))
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			body := tt.new
			if tt.old != "" {
				if !strings.Contains(valid, tt.old) {
					t.Fatalf("test is broken: %q not in the valid config", tt.old)
				}
				body = strings.Replace(valid, tt.old, tt.new, 1)
			}
			_, err := Load(writeConfig(t, body))
			if err == nil {
				t.Fatalf("Load succeeded; want an error containing %q", tt.want)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error:\n%v\nwant it to contain %q", err, w)
				}
			}
		})
	}
}

func TestFileErrors(t *testing.T) {
	dir := t.TempDir()
	if _, err := Load(dir); err == nil || !strings.Contains(err.Error(), "is a directory") {
		t.Errorf("Load(dir) = %v; want 'is a directory'", err)
	}
	if _, err := Load(filepath.Join(dir, "missing.yaml")); err == nil || !strings.Contains(err.Error(), "no such file") {
		t.Errorf("Load(missing) = %v; want 'no such file'", err)
	}
}
