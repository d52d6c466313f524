package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// OriginalDst tells the proxy where an accepted connection was originally headed.
// It is keyed by the accepted socket's remote address: the client's ip:port as the
// proxy sees it. The steering layer (package ebpf) implements it; tests use a map.
// ok is false when the connection is unknown (for example it dialled the proxy port
// directly), and the proxy then refuses it.
type OriginalDst interface {
	OriginalDst(client netip.AddrPort) (dst netip.AddrPort, ok bool)
}

// OriginalDstFunc adapts a function to OriginalDst.
type OriginalDstFunc func(client netip.AddrPort) (netip.AddrPort, bool)

// OriginalDst calls f(client).
func (f OriginalDstFunc) OriginalDst(client netip.AddrPort) (netip.AddrPort, bool) { return f(client) }

// Resolver looks up the addresses of a DNS name. *net.Resolver implements it.
type Resolver interface {
	LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error)
}

// LBPolicy chooses among a cluster's endpoints.
type LBPolicy string

// Load-balancing policies (proxy.clusters.NAME.lb_policy).
const (
	RoundRobin LBPolicy = "round_robin" // the default
	LeastConn  LBPolicy = "least_conn"  // fewest active connections, ties rotated
	Random     LBPolicy = "random"
)

// RelayMode selects how bytes are moved between the two sockets of a connection.
type RelayMode string

// Relay modes. See relay.go and the package documentation for the measurements
// behind the default.
const (
	// RelaySplice waits for readability without holding anything, then moves the
	// data with splice(2) through a pipe pair taken from a small pool and returned as
	// soon as the socket has nothing more to read. Zero-copy when busy; an idle
	// connection holds only its two sockets. The default.
	RelaySplice RelayMode = "splice"
	// RelayCopy waits for readability the same way, then copies through a pooled
	// 64 KiB buffer returned as soon as the socket has nothing more to read.
	RelayCopy RelayMode = "copy"
)

// Cluster is a named set of endpoints (proxy.clusters.NAME).
type Cluster struct {
	// Endpoints are "host:port"; host is an IP literal or a DNS name (resolved in
	// the background, like DNS targets).
	Endpoints []string
	// LBPolicy is round_robin (default when empty), least_conn or random.
	LBPolicy LBPolicy
}

// Options configures the proxy. The agent's config package fills it from the
// `proxy` section of the configuration; DefaultOptions gives the SPEC defaults.
// Zero values mean what the SPEC says for the key (0 timeouts are "none") except
// where a field says otherwise.
type Options struct {
	// Listen are the addresses to accept on (proxy.listen), bound with SO_REUSEPORT
	// so an old and a new agent can overlap during a rolling update.
	// Default 127.0.0.1:15001. Ignored when Listeners is set.
	Listen []netip.AddrPort
	// Listeners, when set, are used instead of binding Listen: the agent passes the
	// systemd socket-activation listeners named "proxy" (LISTEN_FDS). Run never closes
	// them (a restarted Run accepts on them again); it interrupts Accept with a past
	// deadline, so they must implement SetDeadline (as *net.TCPListener does).
	Listeners []net.Listener

	// ConnectTimeout bounds each upstream connect attempt (proxy.connect_timeout).
	// 0 means the default, 5s.
	ConnectTimeout time.Duration
	// IdleTimeout closes a connection when no byte moved in either direction for
	// this long (proxy.idle_timeout). Default 1h; 0: none.
	IdleTimeout time.Duration
	// MaxConnectionDuration closes a connection this long after it was accepted
	// (proxy.max_connection_duration). 0: none (the default).
	MaxConnectionDuration time.Duration
	// MaxConnectAttempts is how many endpoints are tried per connection before the
	// client is reset (proxy.max_connect_attempts). 0 means the default, 3.
	MaxConnectAttempts int
	// DrainTimeout is how long connections of a mapping removed (or re-targeted) by
	// Update may keep running (proxy.drain_timeout). Default 30s; 0: closed at once.
	DrainTimeout time.Duration
	// ShutdownGrace is how long Run lets connections finish after its context is
	// cancelled before it closes them (top-level shutdown_grace). 0: closed at once.
	ShutdownGrace time.Duration
	// DNSRefresh is how often DNS names in targets and endpoints are re-resolved.
	// The Go resolver does not expose record TTLs, so this interval stands in for
	// them. 0 means the default, 30s.
	DNSRefresh time.Duration

	// AddressMap maps an original destination to a target (proxy.address_map).
	// Keys: "IP" (any port) or "IP:port" ("[v6]:port"); IP:port wins over IP.
	// Targets: a cluster name (a key of Clusters), "host:port", or "host" (the
	// original port is kept). See ParseKey and ParseTarget.
	AddressMap map[string]string
	// Clusters are the named endpoint sets targets may refer to (proxy.clusters).
	Clusters map[string]Cluster

	// AccessLog turns on one structured log line (at Info, message "connection")
	// per connection when it closes (proxy.access_log).
	AccessLog bool
	// AccessLogSample is the fraction of connections logged when AccessLog is on,
	// in (0, 1]; 0 means 1 (every connection). Refused connections are always
	// logged (at a bounded rate) when AccessLog is on.
	AccessLogSample float64

	// Relay picks the relay implementation; empty means RelaySplice.
	Relay RelayMode

	// Injected hooks; Update ignores them (they are fixed by New).

	// OriginalDst is the steering layer's record of original destinations.
	// Required by Run.
	OriginalDst OriginalDst
	// DialControl, when set, runs on every upstream socket before connect
	// (net.Dialer.Control); the steering layer uses it to set SO_MARK so the
	// proxy's own connections are not steered back to it.
	DialControl func(network, address string, c syscall.RawConn) error
	// Resolver resolves DNS names; nil means net.DefaultResolver.
	Resolver Resolver
}

// DefaultOptions returns the SPEC defaults of the proxy section.
func DefaultOptions() Options {
	return Options{
		Listen:             []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:15001")},
		ConnectTimeout:     5 * time.Second,
		IdleTimeout:        time.Hour,
		MaxConnectAttempts: 3,
		DrainTimeout:       30 * time.Second,
		DNSRefresh:         30 * time.Second,
		AccessLog:          true,
		Relay:              RelaySplice,
	}
}

// withDefaults fills the fields whose zero value means "default".
func (o Options) withDefaults() Options {
	if len(o.Listen) == 0 && len(o.Listeners) == 0 {
		o.Listen = []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:15001")}
	}
	if o.ConnectTimeout <= 0 {
		o.ConnectTimeout = 5 * time.Second
	}
	if o.MaxConnectAttempts <= 0 {
		o.MaxConnectAttempts = 3
	}
	if o.DNSRefresh <= 0 {
		o.DNSRefresh = 30 * time.Second
	}
	if o.AccessLogSample <= 0 || o.AccessLogSample > 1 {
		o.AccessLogSample = 1
	}
	if o.Relay == "" {
		o.Relay = RelaySplice
	}
	if o.Resolver == nil {
		o.Resolver = net.DefaultResolver
	}
	return o
}

// Key is a parsed address_map key: an IP, and a port unless the key matches any port.
type Key struct {
	Addr netip.Addr
	Port uint16 // 0: any port
}

// String formats k as it would be written in the configuration.
func (k Key) String() string {
	if k.Port == 0 {
		return k.Addr.String()
	}
	return netip.AddrPortFrom(k.Addr, k.Port).String()
}

// ParseKey parses an address_map key: "IP" or "IP:port" ("[v6]:port").
// IPv4-mapped IPv6 addresses are unmapped; zones are rejected.
func ParseKey(s string) (Key, error) {
	if a, err := netip.ParseAddr(s); err == nil {
		if a.Zone() != "" {
			return Key{}, fmt.Errorf("address %q: zones are not supported", s)
		}
		return Key{Addr: a.Unmap()}, nil
	}
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return Key{}, fmt.Errorf("%q is neither an IP nor an IP:port", s)
	}
	if ap.Addr().Zone() != "" {
		return Key{}, fmt.Errorf("address %q: zones are not supported", s)
	}
	if ap.Port() == 0 {
		return Key{}, fmt.Errorf("address %q: port 0", s)
	}
	return Key{Addr: ap.Addr().Unmap(), Port: ap.Port()}, nil
}

// Target is a parsed address_map value.
type Target struct {
	// Cluster is set when the target names a cluster; Host and Port are then empty.
	Cluster string
	// Host is an IP literal or a DNS name (lowercase, no trailing dot).
	Host string
	// Port is the target port; 0 keeps the original destination's port.
	Port uint16
}

// IsCluster reports whether t names a cluster.
func (t Target) IsCluster() bool { return t.Cluster != "" }

// ErrUnknownCluster is wrapped by ParseTarget when a bare name is not a defined cluster.
var ErrUnknownCluster = errors.New("no such cluster")

// ParseTarget parses an address_map value against the defined clusters:
//   - a key of clusters is that cluster;
//   - "host:port" or "[v6]:port";
//   - "host" with at least one dot, or an IP literal: the original port is kept.
//
// A bare word (no dot, no colon, not an IP) that is not a defined cluster is an
// error wrapping ErrUnknownCluster: it is almost always a typo of a cluster name.
func ParseTarget(s string, clusters map[string]Cluster) (Target, error) {
	if s == "" {
		return Target{}, errors.New("empty target")
	}
	if _, ok := clusters[s]; ok {
		return Target{Cluster: s}, nil
	}
	if a, err := netip.ParseAddr(s); err == nil {
		if a.Zone() != "" {
			return Target{}, fmt.Errorf("target %q: zones are not supported", s)
		}
		return Target{Host: a.Unmap().String()}, nil
	}
	if strings.Contains(s, ":") {
		host, port, err := ParseHostPort(s)
		if err != nil {
			return Target{}, fmt.Errorf("target %q: %w", s, err)
		}
		return Target{Host: host, Port: port}, nil
	}
	if !strings.Contains(s, ".") {
		return Target{}, fmt.Errorf("target %q: %w (and not a host name with a dot, an IP or host:port)", s, ErrUnknownCluster)
	}
	host, err := normalizeHost(s)
	if err != nil {
		return Target{}, fmt.Errorf("target %q: %w", s, err)
	}
	return Target{Host: host}, nil
}

// ParseHostPort parses "host:port" (a cluster endpoint, or a target naming a port):
// host is an IP literal or a DNS name, port 1-65535.
func ParseHostPort(s string) (host string, port uint16, err error) {
	h, p, err := net.SplitHostPort(s)
	if err != nil {
		return "", 0, fmt.Errorf("not host:port: %w", err)
	}
	n, err := strconv.ParseUint(p, 10, 16)
	if err != nil || n == 0 {
		return "", 0, fmt.Errorf("bad port %q", p)
	}
	if a, err := netip.ParseAddr(h); err == nil {
		if a.Zone() != "" {
			return "", 0, fmt.Errorf("zones are not supported")
		}
		return a.Unmap().String(), uint16(n), nil
	}
	host, err = normalizeHost(h)
	if err != nil {
		return "", 0, err
	}
	return host, uint16(n), nil
}

// normalizeHost checks that h is a DNS name and returns it in lowercase without
// a trailing dot.
func normalizeHost(h string) (string, error) {
	h = strings.TrimSuffix(strings.ToLower(h), ".")
	if h == "" || len(h) > 253 {
		return "", fmt.Errorf("bad host name %q", h)
	}
	for _, label := range strings.Split(h, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return "", fmt.Errorf("bad host name %q", h)
		}
		for _, r := range label {
			allowed := r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' || r == '_'
			if !allowed {
				return "", fmt.Errorf("bad host name %q", h)
			}
		}
	}
	return h, nil
}

// Validate checks the mapping and clusters the way New and Update do and returns
// every problem joined, each naming its key path under `proxy.` as the operator
// wrote it. The agent's config Validate can call it instead of duplicating rules.
func (o Options) Validate() error {
	var errs []error
	names := make([]string, 0, len(o.Clusters))
	for name := range o.Clusters {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		c := o.Clusters[name]
		if name == "" {
			errs = append(errs, errors.New("proxy.clusters: empty cluster name"))
		}
		if len(c.Endpoints) == 0 {
			errs = append(errs, fmt.Errorf("proxy.clusters.%s.endpoints: no endpoints", name))
		}
		for i, ep := range c.Endpoints {
			if _, _, err := ParseHostPort(ep); err != nil {
				errs = append(errs, fmt.Errorf("proxy.clusters.%s.endpoints[%d]: %q: %w", name, i, ep, err))
			}
		}
		switch c.LBPolicy {
		case "", RoundRobin, LeastConn, Random:
		default:
			errs = append(errs, fmt.Errorf("proxy.clusters.%s.lb_policy: %q is not round_robin, least_conn or random", name, c.LBPolicy))
		}
	}
	keys := make([]string, 0, len(o.AddressMap))
	for k := range o.AddressMap {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	mapped := map[Key]string{}
	for _, k := range keys {
		key, err := ParseKey(k)
		if err != nil {
			errs = append(errs, fmt.Errorf("proxy.address_map[%q]: %w", k, err))
			continue
		}
		if prev, dup := mapped[key]; dup {
			errs = append(errs, fmt.Errorf("proxy.address_map[%q]: same address as %q", k, prev))
		}
		mapped[key] = k
	}
	for _, k := range keys {
		v := o.AddressMap[k]
		t, err := ParseTarget(v, o.Clusters)
		if err != nil {
			errs = append(errs, fmt.Errorf("proxy.address_map[%q]: %w", k, err))
			continue
		}
		// A target that is itself a mapped address would only loop back (or, with
		// the proxy's dials exempt from steering, go to an address nobody serves).
		if a, err := netip.ParseAddr(t.Host); err == nil {
			for key, name := range mapped {
				if key.Addr == a && (key.Port == 0 || t.Port == 0 || key.Port == t.Port) {
					errs = append(errs, fmt.Errorf("proxy.address_map[%q]: target %q is itself mapped by %q", k, v, name))
					break
				}
			}
		}
	}
	for i, ap := range o.Listen {
		if !ap.IsValid() || ap.Port() == 0 {
			errs = append(errs, fmt.Errorf("proxy.listen[%d]: %q needs an IP and a port", i, ap))
		}
	}
	if o.MaxConnectAttempts < 0 {
		errs = append(errs, errors.New("proxy.max_connect_attempts: must not be negative"))
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{
		{"connect_timeout", o.ConnectTimeout}, {"idle_timeout", o.IdleTimeout},
		{"max_connection_duration", o.MaxConnectionDuration}, {"drain_timeout", o.DrainTimeout},
	} {
		if d.v < 0 {
			errs = append(errs, fmt.Errorf("proxy.%s: must not be negative", d.name))
		}
	}
	switch o.Relay {
	case "", RelaySplice, RelayCopy:
	default:
		errs = append(errs, fmt.Errorf("proxy relay mode %q is not splice or copy", o.Relay))
	}
	return errors.Join(errs...)
}
