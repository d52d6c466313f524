// Package collector is the OTLP trace relay: it receives spans from the node's workloads over
// OTLP/gRPC and OTLP/HTTP, adds the node's resource attributes, acknowledges a request only once
// its spans are in a durable on-disk queue, and exports them in batches to the upstream collector
// with retries, so nothing acknowledged is lost across upstream outages, crashes or restarts.
//
// Data path:
//
//	receiver (gRPC, HTTP) ─decode, enrich, encode─▶ queue (segment files) ─▶ batcher ─▶ N senders ─▶ upstream
//
// Every queued record is one enriched ExportTraceServiceRequest in protobuf encoding. Because
// protobuf concatenation of two such messages is the message with both lists of resource spans,
// the batcher joins records byte-wise: resource and scope grouping is preserved exactly and
// nothing is decoded again on the export path.
package collector

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/nodeagent/nodeagent/collector/queue"
)

// Defaults for Options fields left zero.
const (
	DefaultMaxRequestSize   = 64 << 20
	DefaultBatchMaxSpans    = 8192
	DefaultBatchMaxBytes    = 3 << 20
	DefaultBatchTimeout     = 200 * time.Millisecond
	DefaultQueueMaxBytes    = 512 << 20
	DefaultQueueConsumers   = 4
	DefaultRetryInitial     = time.Second
	DefaultRetryMax         = 30 * time.Second
	DefaultMemoryLimit      = 400 << 20
	DefaultExporterTimeout  = 10 * time.Second
	DefaultShutdownGrace    = 10 * time.Second
	DefaultQueueDir         = "/var/lib/nodeagent/otlp"
	DefaultGRPCListen       = "127.0.0.1:4317"
	DefaultHTTPListen       = "127.0.0.1:4318"
	ListenerNameGRPC        = "otlp-grpc" // systemd FileDescriptorName of a socket-activated gRPC listener
	ListenerNameHTTP        = "otlp-http" // systemd FileDescriptorName of a socket-activated HTTP listener
	queueHighWaterNumerator = 8           // queue above 8/10 of max_bytes makes the check fail
)

// Options mirror the SPEC `otlp.*` keys.
type Options struct {
	// GRPCListen is otlp.grpc_listen: where OTLP/gRPC is served (default 127.0.0.1:4317).
	// The zero value disables the gRPC receiver unless Listeners has "otlp-grpc".
	GRPCListen netip.AddrPort
	// HTTPListen is otlp.http_listen: where OTLP/HTTP (POST /v1/traces) is served (default 127.0.0.1:4318).
	// The zero value disables the HTTP receiver unless Listeners has "otlp-http".
	HTTPListen netip.AddrPort
	// Listeners are pre-opened listeners from systemd socket activation, by FileDescriptorName
	// ("otlp-grpc", "otlp-http"); used instead of binding GRPCListen/HTTPListen. Run does not
	// close them (they belong to the caller and survive a restart of Run).
	Listeners map[string]net.Listener

	Exporter Exporter

	// ResourceAttributes is otlp.resource_attributes: added to every resource that lacks the key;
	// a value the workload set is never overwritten. The lead fills k8s.node.name and host.name.
	ResourceAttributes map[string]string
	// MaxRequestSize is otlp.max_request_size: the largest request accepted, after decompression
	// (default 64 MiB). Bigger requests get HTTP 413 / gRPC ResourceExhausted (not retryable).
	MaxRequestSize int64

	Batch Batch
	Queue Queue
	Retry Retry

	// MemoryLimit is otlp.memory_limit (default 400 MiB). Requests are refused with a retryable
	// error while the Go heap plus the bodies being received exceed the soft limit, which is
	// MemoryLimit minus a quarter (the collector's limit_mib 400 / spike_limit_mib 100).
	MemoryLimit int64
	// SetProcessMemoryLimit makes Run call debug.SetMemoryLimit(MemoryLimit) (GOMEMLIMIT) unless
	// the GOMEMLIMIT environment variable is set. Leave false when the agent sets a process-wide
	// limit itself (use Options.GoMemoryLimit for the relay's share).
	SetProcessMemoryLimit bool
	// ShutdownGrace is the top-level shutdown_grace: after Run's context is cancelled, how long the
	// relay keeps exporting what is queued before it leaves the rest on disk (default 10s).
	ShutdownGrace time.Duration
}

// Exporter is otlp.exporter.
type Exporter struct {
	// Endpoint is otlp.exporter.endpoint: host:port for grpc; host:port or a full URL for http
	// (default path /v1/traces; scheme https unless Insecure).
	Endpoint string
	// Protocol is otlp.exporter.protocol: "grpc" (default), "http" or "file".
	Protocol string
	// Path is otlp.exporter.path: for protocol file, the JSON-lines file (one ExportTraceServiceRequest per line).
	Path string
	// Insecure is otlp.exporter.insecure: plaintext instead of TLS (default false: TLS).
	Insecure bool
	// CAFile is otlp.exporter.ca_file: PEM roots to verify the upstream (default: system roots).
	CAFile string
	// CertFile and KeyFile are an optional client certificate (PEM) for mTLS.
	CertFile, KeyFile string
	// TLSConfig, when set, supplies the client TLS configuration for every new connection (SPIFFE
	// mTLS from otlp.exporter.spiffe: the agent passes a provider built with go-spiffe). It takes
	// precedence over CAFile/CertFile/KeyFile. It must return a fresh or shareable *tls.Config.
	TLSConfig func() (*tls.Config, error)
	// Headers is otlp.exporter.headers: sent with every export (gRPC metadata or HTTP headers).
	Headers map[string]string
	// Timeout is otlp.exporter.timeout: per export attempt (default 10s).
	Timeout time.Duration
	// Compression is "gzip" (default) or "none".
	Compression string
}

// Batch is otlp.batch.
type Batch struct {
	MaxSpans int           // otlp.batch.max_spans: send when this many spans are gathered (default 8192)
	MaxBytes int64         // largest batch encoding (default 3 MiB, under gRPC's usual 4 MiB receive limit); bigger requests are split on receipt
	Timeout  time.Duration // otlp.batch.timeout: send a non-full batch this long after its first span (default 200ms)
}

// Queue is otlp.queue.
type Queue struct {
	Dir       string      // otlp.queue.dir (default /var/lib/nodeagent/otlp)
	MaxBytes  int64       // otlp.queue.max_bytes (default 512 MiB): full means backpressure
	Consumers int         // otlp.queue.consumers: concurrent senders (default 4)
	Fsync     queue.Fsync // otlp.queue.fsync: never | segment (default) | always; see package queue
}

// Retry is otlp.retry.
type Retry struct {
	InitialInterval time.Duration // default 1s; doubles per attempt with ±50% jitter
	MaxInterval     time.Duration // default 30s
}

// DefaultOptions returns the SPEC defaults (no exporter endpoint; protocol grpc).
func DefaultOptions() Options {
	var o Options
	o.GRPCListen = netip.MustParseAddrPort(DefaultGRPCListen)
	o.HTTPListen = netip.MustParseAddrPort(DefaultHTTPListen)
	return o.withDefaults()
}

// withDefaults fills zero fields.
func (o Options) withDefaults() Options {
	setDef := func(p *int64, d int64) {
		if *p <= 0 {
			*p = d
		}
	}
	setDef(&o.MaxRequestSize, DefaultMaxRequestSize)
	setDef(&o.Batch.MaxBytes, DefaultBatchMaxBytes)
	setDef(&o.Queue.MaxBytes, DefaultQueueMaxBytes)
	setDef(&o.MemoryLimit, DefaultMemoryLimit)
	if o.Batch.MaxSpans <= 0 {
		o.Batch.MaxSpans = DefaultBatchMaxSpans
	}
	if o.Batch.Timeout <= 0 {
		o.Batch.Timeout = DefaultBatchTimeout
	}
	if o.Queue.Consumers <= 0 {
		o.Queue.Consumers = DefaultQueueConsumers
	}
	if o.Queue.Dir == "" {
		o.Queue.Dir = DefaultQueueDir
	}
	if o.Queue.Fsync == "" {
		o.Queue.Fsync = queue.FsyncSegment
	}
	if o.Retry.InitialInterval <= 0 {
		o.Retry.InitialInterval = DefaultRetryInitial
	}
	if o.Retry.MaxInterval <= 0 {
		o.Retry.MaxInterval = DefaultRetryMax
	}
	if o.Exporter.Protocol == "" {
		o.Exporter.Protocol = "grpc"
	}
	if o.Exporter.Timeout <= 0 {
		o.Exporter.Timeout = DefaultExporterTimeout
	}
	if o.Exporter.Compression == "" {
		o.Exporter.Compression = "gzip"
	}
	if o.ShutdownGrace <= 0 {
		o.ShutdownGrace = DefaultShutdownGrace
	}
	return o
}

// Validate reports every problem with o (after defaults), naming the SPEC key.
func (o Options) Validate() error {
	o = o.withDefaults()
	var errs []error
	switch o.Exporter.Protocol {
	case "grpc", "http":
		if o.Exporter.Endpoint == "" {
			errs = append(errs, errors.New("otlp.exporter.endpoint: required for protocol "+o.Exporter.Protocol))
		}
	case "file":
		if o.Exporter.Path == "" {
			errs = append(errs, errors.New("otlp.exporter.path: required for protocol file"))
		}
	default:
		errs = append(errs, fmt.Errorf("otlp.exporter.protocol: %q is not grpc, http or file", o.Exporter.Protocol))
	}
	switch strings.ToLower(o.Exporter.Compression) {
	case "gzip", "none":
	default:
		errs = append(errs, fmt.Errorf("otlp.exporter.compression: %q is not gzip or none", o.Exporter.Compression))
	}
	if (o.Exporter.CertFile == "") != (o.Exporter.KeyFile == "") {
		errs = append(errs, errors.New("otlp.exporter: cert_file and key_file go together"))
	}
	if !o.Queue.Fsync.Valid() {
		errs = append(errs, fmt.Errorf("otlp.queue.fsync: %q is not never, segment or always", o.Queue.Fsync))
	}
	if o.Queue.MaxBytes < o.MaxRequestSize+64 {
		errs = append(errs, fmt.Errorf("otlp.queue.max_bytes: %d must exceed max_request_size %d", o.Queue.MaxBytes, o.MaxRequestSize))
	}
	if o.Retry.MaxInterval < o.Retry.InitialInterval {
		errs = append(errs, errors.New("otlp.retry.max_interval: below initial_interval"))
	}
	if o.GRPCListen.IsValid() && o.GRPCListen.Port() != 0 && o.GRPCListen == o.HTTPListen {
		errs = append(errs, errors.New("otlp.http_listen: same address as grpc_listen"))
	}
	return errors.Join(errs...)
}

// GoMemoryLimit is the soft memory limit (GOMEMLIMIT) the relay wants for its process: MemoryLimit.
func (o Options) GoMemoryLimit() int64 { return o.withDefaults().MemoryLimit }

// softLimit is the memory level above which requests are refused.
func (o Options) softLimit() int64 { return o.MemoryLimit - o.MemoryLimit/4 }
