package ebpf

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
)

func TestParseIntercept(t *testing.T) {
	tests := []struct {
		in      string
		want    Intercept
		wantErr string
	}{
		{"169.254.1.2", Intercept{Addr: mustAddr("169.254.1.2")}, ""},
		{"169.254.1.4:443", Intercept{Addr: mustAddr("169.254.1.4"), Port: 443}, ""},
		{"fd00::2", Intercept{Addr: mustAddr("fd00::2")}, ""},
		{"[fd00::2]:80", Intercept{Addr: mustAddr("fd00::2"), Port: 80}, ""},
		{"::ffff:169.254.1.2", Intercept{Addr: mustAddr("169.254.1.2")}, ""},
		{"[::ffff:169.254.1.2]:80", Intercept{Addr: mustAddr("169.254.1.2"), Port: 80}, ""},
		{"169.254.1.2:0", Intercept{}, "port 0"},
		{"fe80::1%eth0", Intercept{}, "zones"},
		{"db.internal:5432", Intercept{}, "want IP or IP:port"},
		{"", Intercept{}, "want IP or IP:port"},
	}
	for _, tc := range tests {
		got, err := ParseIntercept(tc.in)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("ParseIntercept(%q): got error %v; want one containing %q", tc.in, err, tc.wantErr)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("ParseIntercept(%q): got %v, %v; want %v", tc.in, got, err, tc.want)
		}
	}
}

func TestInterceptMatchesAndString(t *testing.T) {
	tests := []struct {
		i      Intercept
		dst    string
		want   bool
		wantTo string
	}{
		{Intercept{Addr: mustAddr("169.254.1.2")}, "169.254.1.2:80", true, "169.254.1.2"},
		{Intercept{Addr: mustAddr("169.254.1.2")}, "[::ffff:169.254.1.2]:9", true, "169.254.1.2"},
		{Intercept{Addr: mustAddr("169.254.1.4"), Port: 443}, "169.254.1.4:443", true, "169.254.1.4:443"},
		{Intercept{Addr: mustAddr("169.254.1.4"), Port: 443}, "169.254.1.4:80", false, "169.254.1.4:443"},
		{Intercept{Addr: mustAddr("fd00::2"), Port: 80}, "[fd00::2]:80", true, "[fd00::2]:80"},
		{Intercept{Addr: mustAddr("fd00::2")}, "[fd00::3]:80", false, "fd00::2"},
	}
	for _, tc := range tests {
		if got := tc.i.Matches(netip.MustParseAddrPort(tc.dst)); got != tc.want {
			t.Errorf("%v.Matches(%s): got %v; want %v", tc.i, tc.dst, got, tc.want)
		}
		if got := tc.i.String(); got != tc.wantTo {
			t.Errorf("String: got %q; want %q", got, tc.wantTo)
		}
	}
}

func TestValidate(t *testing.T) {
	valid := func() Options {
		return Options{
			ProxyAddr4:  netip.MustParseAddrPort("127.0.0.1:15001"),
			ProxyAddr6:  netip.MustParseAddrPort("[::1]:15001"),
			PodRedirect: netip.MustParseAddrPort("10.0.0.5:15001"),
			Intercepts:  []Intercept{{Addr: mustAddr("169.254.1.2")}, {Addr: mustAddr("169.254.1.4"), Port: 443}},
		}
	}
	if err := valid().validate(); err != nil {
		t.Fatalf("valid options: got %v; want nil", err)
	}
	tests := []struct {
		name    string
		mutate  func(*Options)
		wantErr string
	}{
		{"no proxy", func(o *Options) { o.ProxyAddr4, o.ProxyAddr6 = netip.AddrPort{}, netip.AddrPort{} }, "no proxy address"},
		{"ipv6 as proxy4", func(o *Options) { o.ProxyAddr4 = netip.MustParseAddrPort("[::1]:1") }, "want IPv4"},
		{"ipv4 as proxy6", func(o *Options) { o.ProxyAddr6 = netip.MustParseAddrPort("127.0.0.1:1") }, "want IPv6"},
		{"port 0", func(o *Options) { o.PodRedirect = netip.MustParseAddrPort("10.0.0.5:0") }, "port 0"},
		{"target intercepted by ip", func(o *Options) { o.PodRedirect = netip.MustParseAddrPort("169.254.1.2:15001") }, "itself intercepted by 169.254.1.2"},
		{"target intercepted by ip:port", func(o *Options) { o.ProxyAddr4 = netip.MustParseAddrPort("169.254.1.4:443") }, "itself intercepted by 169.254.1.4:443"},
		{"intercept without address", func(o *Options) { o.Intercepts = append(o.Intercepts, Intercept{Port: 1}) }, "no address"},
	}
	for _, tc := range tests {
		o := valid()
		tc.mutate(&o)
		err := o.validate()
		if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !errors.Is(err, errInvalidOptions) {
			t.Errorf("%s: got %v; want an invalid-options error containing %q", tc.name, err, tc.wantErr)
		}
	}
}

func TestKeys(t *testing.T) {
	for _, s := range []string{"169.254.1.2:80", "[fd00::2]:443", "[::ffff:10.0.0.1]:1"} {
		ap := netip.MustParseAddrPort(s)
		k := clientKey(ap)
		if got := netip.AddrPortFrom(wordsAddr(k.Addr), k.Port); got.Addr().Unmap() != ap.Addr().Unmap() || got.Port() != ap.Port() {
			t.Errorf("key round trip of %s: got %s", s, got)
		}
	}
	// Both spellings of an IPv4 client find the same entry.
	if a, b := clientKey(netip.MustParseAddrPort("127.0.0.1:5")), clientKey(netip.MustParseAddrPort("[::ffff:127.0.0.1]:5")); a != b {
		t.Errorf("IPv4 and IPv4-mapped keys differ: %v and %v", a, b)
	}
	// The map stores network byte order: ::ffff:127.0.0.1 has bytes ff ff 7f 00 00 01.
	k := clientKey(netip.MustParseAddrPort("127.0.0.1:5"))
	var b [4]byte
	b[0], b[1], b[2], b[3] = byte(k.Addr[3]), byte(k.Addr[3]>>8), byte(k.Addr[3]>>16), byte(k.Addr[3]>>24)
	if b != [4]byte{127, 0, 0, 1} {
		t.Errorf("last address word in memory: got %v; want 127.0.0.1", b)
	}
	for _, tc := range []struct {
		o    steerOrigDst
		want string
	}{
		{steerOrigDst{Addr: addrWords(mustAddr("169.254.1.2")), Port: 80, Family: 4}, "169.254.1.2:80"},
		{steerOrigDst{Addr: addrWords(mustAddr("fd00::2")), Port: 80, Family: 6}, "[fd00::2]:80"},
	} {
		if got := origAddr(tc.o).String(); got != tc.want {
			t.Errorf("origAddr: got %s; want %s", got, tc.want)
		}
	}
}
