package proxy

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
)

func TestParseKey(t *testing.T) {
	tests := []struct {
		in      string
		want    Key
		wantErr bool
	}{
		{"169.254.1.2", Key{Addr: netip.MustParseAddr("169.254.1.2")}, false},
		{"169.254.1.4:443", Key{Addr: netip.MustParseAddr("169.254.1.4"), Port: 443}, false},
		{"fd00::1", Key{Addr: netip.MustParseAddr("fd00::1")}, false},
		{"[fd00::1]:80", Key{Addr: netip.MustParseAddr("fd00::1"), Port: 80}, false},
		{"::ffff:10.0.0.1", Key{Addr: netip.MustParseAddr("10.0.0.1")}, false},
		{"10.0.0.1:0", Key{}, true},
		{"10.0.0.1:99999", Key{}, true},
		{"example.com", Key{}, true},
		{"fe80::1%eth0", Key{}, true},
		{"", Key{}, true},
	}
	for _, tt := range tests {
		got, err := ParseKey(tt.in)
		if (err != nil) != tt.wantErr {
			t.Errorf("ParseKey(%q): got error %v; want error %v", tt.in, err, tt.wantErr)
			continue
		}
		if got != tt.want {
			t.Errorf("ParseKey(%q): got %+v; want %+v", tt.in, got, tt.want)
		}
		if err == nil {
			if back, _ := ParseKey(got.String()); back != got {
				t.Errorf("ParseKey(%q).String() = %q does not parse back to the same key", tt.in, got.String())
			}
		}
	}
}

func TestParseTarget(t *testing.T) {
	clusters := map[string]Cluster{"cluster_1": {Endpoints: []string{"10.0.0.5:22"}}}
	tests := []struct {
		in      string
		want    Target
		wantErr string
	}{
		{"cluster_1", Target{Cluster: "cluster_1"}, ""},
		{"db.internal:5432", Target{Host: "db.internal", Port: 5432}, ""},
		{"DB.Internal.", Target{Host: "db.internal"}, ""},
		{"10.0.0.9", Target{Host: "10.0.0.9"}, ""},
		{"10.0.0.9:8080", Target{Host: "10.0.0.9", Port: 8080}, ""},
		{"[fd00::9]:8080", Target{Host: "fd00::9", Port: 8080}, ""},
		{"localhost:8080", Target{Host: "localhost", Port: 8080}, ""},
		{"cluster_2", Target{}, "no such cluster"},
		{"db.internal:0", Target{}, "bad port"},
		{"db..internal", Target{}, "bad host name"},
		{"", Target{}, "empty"},
	}
	for _, tt := range tests {
		got, err := ParseTarget(tt.in, clusters)
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("ParseTarget(%q): got error %v; want one containing %q", tt.in, err, tt.wantErr)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("ParseTarget(%q): got %+v, %v; want %+v", tt.in, got, err, tt.want)
		}
	}
	if _, err := ParseTarget("cluster_2", clusters); !errors.Is(err, ErrUnknownCluster) {
		t.Errorf("ParseTarget(undefined cluster): got %v; want ErrUnknownCluster", err)
	}
}

func TestValidate(t *testing.T) {
	valid := func() Options {
		o := DefaultOptions()
		o.AddressMap = map[string]string{
			"169.254.1.2":     "cluster_1",
			"169.254.1.4:443": "db.internal:5432",
		}
		o.Clusters = map[string]Cluster{"cluster_1": {Endpoints: []string{"10.0.0.5:22", "10.0.0.6:22"}, LBPolicy: RoundRobin}}
		return o
	}
	if err := valid().Validate(); err != nil {
		t.Fatalf("valid options: got %v; want nil", err)
	}
	tests := []struct {
		name   string
		mutate func(*Options)
		want   string
	}{
		{"bad key", func(o *Options) { o.AddressMap["nope"] = "cluster_1" }, `proxy.address_map["nope"]`},
		{"undefined cluster", func(o *Options) { o.AddressMap["169.254.1.3"] = "cluster_2" }, `proxy.address_map["169.254.1.3"]: target "cluster_2": no such cluster`},
		{"target is mapped", func(o *Options) { o.AddressMap["169.254.1.5"] = "169.254.1.2:80" }, `is itself mapped by "169.254.1.2"`},
		{"duplicate key", func(o *Options) { o.AddressMap["::ffff:169.254.1.2"] = "cluster_1" }, "same address as"},
		{"no endpoints", func(o *Options) { o.Clusters["empty"] = Cluster{} }, "proxy.clusters.empty.endpoints: no endpoints"},
		{"bad endpoint", func(o *Options) {
			o.Clusters["cluster_1"] = Cluster{Endpoints: []string{"10.0.0.5:22", "10.0.0.6"}}
		}, "proxy.clusters.cluster_1.endpoints[1]"},
		{"bad policy", func(o *Options) {
			o.Clusters["cluster_1"] = Cluster{Endpoints: []string{"10.0.0.5:22"}, LBPolicy: "weighted"}
		}, "proxy.clusters.cluster_1.lb_policy"},
		{"listen without port", func(o *Options) { o.Listen = []netip.AddrPort{netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), 0)} }, "proxy.listen[0]"},
		{"negative timeout", func(o *Options) { o.IdleTimeout = -1 }, "proxy.idle_timeout"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := valid()
			tt.mutate(&o)
			err := o.Validate()
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("got %v; want an error containing %q", err, tt.want)
			}
		})
	}
}

func TestLookupMostSpecific(t *testing.T) {
	o := DefaultOptions()
	o.AddressMap = map[string]string{
		"10.1.1.1":        "a.example:1",
		"10.1.1.1:443":    "b.example:2",
		"fd00::1":         "c.example",
		"[fd00::1]:80":    "d.example",
		"::ffff:10.2.2.2": "e.example:5",
		"10.3.3.3:8080":   "f.example:6",
	}
	tab, err := compile(o.withDefaults(), newEndpointRegistry())
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct{ dst, want string }{
		{"10.1.1.1:443", "b.example:2"},
		{"10.1.1.1:444", "a.example:1"},
		{"[::ffff:10.1.1.1]:443", "b.example:2"},
		{"[fd00::1]:80", "d.example"},
		{"[fd00::1]:81", "c.example"},
		{"10.2.2.2:9", "e.example:5"},
		{"10.3.3.3:8080", "f.example:6"},
		{"10.3.3.3:8081", ""},
		{"10.9.9.9:80", ""},
	}
	for _, tt := range tests {
		r := tab.lookup(netip.MustParseAddrPort(tt.dst))
		got := ""
		if r != nil {
			got = r.target
		}
		if got != tt.want {
			t.Errorf("lookup(%s): got %q; want %q", tt.dst, got, tt.want)
		}
	}
}
