package collector

import (
	"net/netip"
	"strings"
	"testing"
	"time"
)

func TestValidate(t *testing.T) {
	valid := DefaultOptions()
	valid.Exporter.Endpoint = "collector.example:4317"
	if err := valid.Validate(); err != nil {
		t.Fatalf("default options with an endpoint: got %v; want nil", err)
	}
	tests := []struct {
		name   string
		mutate func(*Options)
		want   string // "" means valid
	}{
		{"file protocol with path", func(o *Options) { o.Exporter = Exporter{Protocol: "file", Path: "/tmp/x.jsonl"} }, ""},
		{"http protocol", func(o *Options) { o.Exporter.Protocol = "http" }, ""},
		{"no endpoint", func(o *Options) { o.Exporter.Endpoint = "" }, "otlp.exporter.endpoint"},
		{"file without path", func(o *Options) { o.Exporter.Protocol = "file" }, "otlp.exporter.path"},
		{"unknown protocol", func(o *Options) { o.Exporter.Protocol = "udp" }, "otlp.exporter.protocol"},
		{"unknown compression", func(o *Options) { o.Exporter.Compression = "lz4" }, "otlp.exporter.compression"},
		{"cert without key", func(o *Options) { o.Exporter.CertFile = "c.pem" }, "cert_file and key_file"},
		{"unknown fsync", func(o *Options) { o.Queue.Fsync = "sometimes" }, "otlp.queue.fsync"},
		{"queue smaller than a request", func(o *Options) { o.Queue.MaxBytes = 1 << 20 }, "otlp.queue.max_bytes"},
		{"max interval below initial", func(o *Options) { o.Retry = Retry{InitialInterval: time.Minute, MaxInterval: time.Second} }, "otlp.retry.max_interval"},
		{"same listen address", func(o *Options) { o.HTTPListen = o.GRPCListen }, "otlp.http_listen"},
		{"port 0 twice is fine", func(o *Options) {
			o.GRPCListen, o.HTTPListen = netip.MustParseAddrPort("127.0.0.1:0"), netip.MustParseAddrPort("127.0.0.1:0")
		}, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			o := valid
			tc.mutate(&o)
			err := o.Validate()
			if tc.want == "" {
				if err != nil {
					t.Fatalf("got %v; want nil", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v; want an error naming %q", err, tc.want)
			}
		})
	}
	// Several problems are all reported.
	o := valid
	o.Exporter.Protocol, o.Queue.Fsync = "udp", "sometimes"
	if err := o.Validate(); err == nil || !strings.Contains(err.Error(), "protocol") || !strings.Contains(err.Error(), "fsync") {
		t.Fatalf("got %v; want both problems", err)
	}
}

func TestDefaults(t *testing.T) {
	o := DefaultOptions()
	checks := []struct {
		name      string
		got, want any
	}{
		{"grpc listen", o.GRPCListen.String(), "127.0.0.1:4317"},
		{"http listen", o.HTTPListen.String(), "127.0.0.1:4318"},
		{"max request size", o.MaxRequestSize, int64(64 << 20)},
		{"batch spans", o.Batch.MaxSpans, 8192},
		{"batch timeout", o.Batch.Timeout, 200 * time.Millisecond},
		{"queue max bytes", o.Queue.MaxBytes, int64(512 << 20)},
		{"consumers", o.Queue.Consumers, 4},
		{"retry initial", o.Retry.InitialInterval, time.Second},
		{"retry max", o.Retry.MaxInterval, 30 * time.Second},
		{"memory limit", o.MemoryLimit, int64(400 << 20)},
		{"soft limit", o.softLimit(), int64(300 << 20)},
		{"protocol", o.Exporter.Protocol, "grpc"},
		{"timeout", o.Exporter.Timeout, 10 * time.Second},
		{"go memory limit", o.GoMemoryLimit(), int64(400 << 20)},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s: got %v; want %v", c.name, c.got, c.want)
		}
	}
}
