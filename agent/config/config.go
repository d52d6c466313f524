// Package config reads nodeagent's YAML configuration: strict decoding (unknown keys
// are errors with file and line), ${VAR} and ${VAR:-default} expansion, defaults for
// every present section, and one Validate that reports every problem at once, each
// under the key path the operator wrote.
package config

// Config is the whole configuration file. A section that is absent (a nil pointer) is
// disabled, except health, which always runs.
type Config struct {
	NodeName      string    `yaml:"node_name"`
	NodeIP        string    `yaml:"node_ip"`
	HostRoot      string    `yaml:"host_root"`
	Log           Log       `yaml:"log"`
	Health        Health    `yaml:"health"`
	ShutdownGrace Duration  `yaml:"shutdown_grace"`
	Hostprep      *Hostprep `yaml:"hostprep"`
	Uplink        *Uplink   `yaml:"uplink"`
	Spire         *Spire    `yaml:"spire"`
	Steering      *Steering `yaml:"steering"`
	Proxy         *Proxy    `yaml:"proxy"`
	OTLP          *OTLP     `yaml:"otlp"`

	// File is the path the configuration was read from (not a YAML key).
	File string `yaml:"-"`
	// unset lists ${VAR} references without a default whose variable was not set,
	// so that a validation error can say why a value came out empty.
	unset []string
}

// Log configures log/slog.
type Log struct {
	Format string `yaml:"format"` // json | text
	Level  string `yaml:"level"`  // debug | info | warn | error
}

// Health configures the health endpoint.
type Health struct {
	Listen string `yaml:"listen"`
	// AllowFrom, when set, limits /status and /metrics to clients in these CIDRs
	// (/healthz and /readyz stay open for probes).
	AllowFrom []string `yaml:"allow_from"`
}

// Hostprep configures host preparation for the VPP dataplane.
type Hostprep struct {
	Required     bool      `yaml:"required"`
	Mode         string    `yaml:"mode"` // apply | check
	Hugepages    Hugepages `yaml:"hugepages"`
	Modules      []string  `yaml:"modules"`
	ModulesFile  string    `yaml:"modules_file"`
	AllowNoIOMMU bool      `yaml:"allow_noiommu"`
	BPFFS        string    `yaml:"bpffs"` // the bpffs mount steering needs, mounted if absent
}

// Hugepages configures the 2 MiB hugepage pool.
type Hugepages struct {
	Count       int    `yaml:"count"` // 0: leave the pool alone
	AllowShrink bool   `yaml:"allow_shrink"`
	SysctlFile  string `yaml:"sysctl_file"`
}

// Uplink configures the VPP uplink interface check.
type Uplink struct {
	Interface string `yaml:"interface"`
	Required  bool   `yaml:"required"`
	MinMTU    int    `yaml:"min_mtu"`
}

// Spire configures the SPIRE agent Workload API socket.
type Spire struct {
	Socket   string `yaml:"socket"`
	ExposeAt string `yaml:"expose_at"`
	Required bool   `yaml:"required"`
}

// Steering configures the cgroup eBPF programs.
type Steering struct {
	Required    bool   `yaml:"required"`
	Cgroup      string `yaml:"cgroup"`
	BPFFS       string `yaml:"bpffs"`
	PodRedirect string `yaml:"pod_redirect"`
	// KeepOnExit leaves programs attached and pinned on a graceful stop, so steering
	// continues while the agent restarts; `run --cleanup` always removes them.
	KeepOnExit bool `yaml:"keep_on_exit"`
}

// Proxy configures the address-mapping proxy.
type Proxy struct {
	Required              bool               `yaml:"required"`
	Listen                []string           `yaml:"listen"`
	ConnectTimeout        Duration           `yaml:"connect_timeout"`
	IdleTimeout           Duration           `yaml:"idle_timeout"`
	MaxConnectionDuration Duration           `yaml:"max_connection_duration"`
	MaxConnectAttempts    int                `yaml:"max_connect_attempts"`
	DrainTimeout          Duration           `yaml:"drain_timeout"`
	AccessLog             bool               `yaml:"access_log"`
	AddressMap            map[string]string  `yaml:"address_map"`
	Clusters              map[string]Cluster `yaml:"clusters"`
}

// Cluster is a set of endpoints behind one name.
type Cluster struct {
	Endpoints []string `yaml:"endpoints"`
	LBPolicy  string   `yaml:"lb_policy"` // round_robin | least_conn | random
}

// OTLP configures the trace relay.
type OTLP struct {
	Required           bool              `yaml:"required"`
	GRPCListen         string            `yaml:"grpc_listen"`
	HTTPListen         string            `yaml:"http_listen"`
	Exporter           Exporter          `yaml:"exporter"`
	ResourceAttributes map[string]string `yaml:"resource_attributes"`
	MaxRequestSize     Size              `yaml:"max_request_size"`
	Batch              Batch             `yaml:"batch"`
	Queue              Queue             `yaml:"queue"`
	Retry              Retry             `yaml:"retry"`
	MemoryLimit        Size              `yaml:"memory_limit"`
}

// Exporter configures the upstream the relay sends to.
type Exporter struct {
	Endpoint    string            `yaml:"endpoint"`
	Protocol    string            `yaml:"protocol"` // grpc | http | file
	Path        string            `yaml:"path"`
	Insecure    bool              `yaml:"insecure"`
	CAFile      string            `yaml:"ca_file"`
	CertFile    string            `yaml:"cert_file"` // client certificate (PEM) for mTLS without SPIFFE
	KeyFile     string            `yaml:"key_file"`
	Spiffe      Spiffe            `yaml:"spiffe"`
	Headers     map[string]string `yaml:"headers"`
	Timeout     Duration          `yaml:"timeout"`
	Compression string            `yaml:"compression"` // gzip | none
}

// Spiffe selects mTLS with the node's SVID.
type Spiffe struct {
	ServerID string `yaml:"server_id"`
}

// Batch bounds a batch by spans, bytes and time.
type Batch struct {
	MaxSpans int      `yaml:"max_spans"`
	MaxBytes Size     `yaml:"max_bytes"`
	Timeout  Duration `yaml:"timeout"`
}

// Queue configures the durable queue.
type Queue struct {
	Dir       string `yaml:"dir"`
	MaxBytes  Size   `yaml:"max_bytes"`
	Consumers int    `yaml:"consumers"`
	Fsync     string `yaml:"fsync"` // never | segment | always
}

// Retry configures export retries.
type Retry struct {
	InitialInterval Duration `yaml:"initial_interval"`
	MaxInterval     Duration `yaml:"max_interval"`
}
