package config

import (
	"os"
	"time"
)

// Defaults. A present section starts from these; what the file says overrides them.
func defaultConfig() Config {
	return Config{
		HostRoot:      "/",
		Log:           Log{Format: "json", Level: "info"},
		Health:        Health{Listen: "127.0.0.1:9874"},
		ShutdownGrace: Duration(10 * time.Second),
	}
}

func defaultHostprep() *Hostprep {
	return &Hostprep{
		Required:    true,
		Mode:        "apply",
		Hugepages:   Hugepages{Count: 512, SysctlFile: "/etc/sysctl.d/calico.conf"},
		Modules:     []string{"vfio-pci"},
		ModulesFile: "/etc/modules-load.d/calico-vfio-pci.conf",
		BPFFS:       "/sys/fs/bpf",
	}
}

func defaultUplink() *Uplink {
	return &Uplink{Interface: "eth1", Required: true, MinMTU: 1500}
}

func defaultSpire() *Spire {
	return &Spire{Socket: "/run/spire/agent-sockets/api.sock"}
}

func defaultSteering() *Steering {
	return &Steering{Required: true, BPFFS: "/sys/fs/bpf/nodeagent"}
}

func defaultProxy() *Proxy {
	return &Proxy{
		Required:           true,
		Listen:             []string{"127.0.0.1:15001"},
		ConnectTimeout:     Duration(5 * time.Second),
		IdleTimeout:        Duration(time.Hour),
		MaxConnectAttempts: 3,
		DrainTimeout:       Duration(30 * time.Second),
		AccessLog:          true,
	}
}

func defaultOTLP() *OTLP {
	return &OTLP{
		Required:   true,
		GRPCListen: "127.0.0.1:4317",
		HTTPListen: "127.0.0.1:4318",
		Exporter: Exporter{
			Protocol:    "grpc",
			Timeout:     Duration(10 * time.Second),
			Compression: "gzip",
		},
		MaxRequestSize: 64 << 20,
		Batch:          Batch{MaxSpans: 8192, MaxBytes: 3 << 20, Timeout: Duration(200 * time.Millisecond)},
		Queue:          Queue{Dir: "/var/lib/nodeagent/otlp", MaxBytes: 512 << 20, Consumers: 4, Fsync: "segment"},
		Retry:          Retry{InitialInterval: Duration(time.Second), MaxInterval: Duration(30 * time.Second)},
		MemoryLimit:    400 << 20,
	}
}

// fillDerived sets the defaults that depend on other values or on the environment.
func (c *Config) fillDerived() {
	if c.NodeName == "" {
		c.NodeName = os.Getenv("NODE_NAME")
	}
	if c.NodeName == "" {
		c.NodeName, _ = os.Hostname()
	}
	if c.NodeIP == "" {
		c.NodeIP = os.Getenv("NODE_IP")
	}
	if c.OTLP != nil && c.OTLP.ResourceAttributes == nil {
		host, _ := os.Hostname()
		c.OTLP.ResourceAttributes = map[string]string{"k8s.node.name": c.NodeName, "host.name": host}
	}
}
