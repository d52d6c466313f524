package netcfg

import (
	"io"
	"log/slog"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/nodeagent/nodeagent/agent/health"
)

func TestOptionsValidate(t *testing.T) {
	tests := []struct {
		name string
		mut  func(*Options)
		want []string // substrings of the error; none: valid
	}{
		{"defaults", func(*Options) {}, nil},
		{"explicit", func(o *Options) { o.Interface = "ens1f0np0"; o.MinMTU = 9000 }, nil},
		{"15-character name", func(o *Options) { o.Interface = "enp129s0f1np1xy" }, nil},
		{"16-character name", func(o *Options) { o.Interface = "enp129s0f1np1xyz" }, []string{"uplink.interface"}},
		{"slash", func(o *Options) { o.Interface = "../eth0" }, []string{"uplink.interface"}},
		{"space", func(o *Options) { o.Interface = "eth 0" }, []string{"uplink.interface"}},
		{"dot", func(o *Options) { o.Interface = "." }, []string{"uplink.interface"}},
		{"mtu too small", func(o *Options) { o.MinMTU = 67 }, []string{"uplink.min_mtu"}},
		{"mtu too large", func(o *Options) { o.MinMTU = 65536 }, []string{"uplink.min_mtu"}},
		{"both", func(o *Options) { o.Interface = "a/b"; o.MinMTU = -1 }, []string{"uplink.interface", "uplink.min_mtu"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var o Options
			tt.mut(&o)
			err := o.Validate()
			if len(tt.want) == 0 {
				if err != nil {
					t.Errorf("got %v; want valid", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("got valid; want errors naming %v", tt.want)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("got %q; want it to name %s", err, w)
				}
			}
		})
	}
}

func TestNewAndUpdateRefuseInvalidOptions(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if _, err := New(Options{MinMTU: 1}, log, prometheus.NewRegistry(), health.Discard); err == nil {
		t.Errorf("New(min_mtu 1) got no error; want one")
	}
	u, err := New(Options{}, log, prometheus.NewRegistry(), health.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if got := u.options(); got.Interface != DefaultInterface || got.MinMTU != DefaultMinMTU || got.HostRoot != "/" {
		t.Errorf("defaults got %+v; want interface %s, min_mtu %d, host_root /", got, DefaultInterface, DefaultMinMTU)
	}
	if err := u.Update(Options{Interface: "bad/name"}); err == nil {
		t.Errorf("Update(bad name) got no error; want one")
	}
	if got := u.options().Interface; got != DefaultInterface {
		t.Errorf("after a refused Update got interface %q; want %q kept", got, DefaultInterface)
	}
	// Metrics are registered once, on New's registry.
	reg := prometheus.NewRegistry()
	if _, err := New(Options{}, log, reg, health.Discard); err != nil {
		t.Fatal(err)
	}
	if _, err := New(Options{}, log, reg, health.Discard); err == nil {
		t.Errorf("second New on the same registry got no error; want a registration error")
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, mf := range mfs {
		names = append(names, mf.GetName())
	}
	if want := "nodeagent_uplink_changes_total nodeagent_uplink_mtu_bytes nodeagent_uplink_up"; strings.Join(names, " ") != want {
		t.Errorf("got metrics %v; want %s, initialised to 0", names, want)
	}
}
