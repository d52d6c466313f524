package ebpf

import (
	"errors"
	"fmt"
	"net/netip"
)

// Options configure steering. The agent's config package fills them from the
// steering section (and the proxy's listeners and address map).
type Options struct {
	// HostRoot is the host's / as this process sees it; /proc/mounts is read
	// under it. Default "/".
	HostRoot string
	// Cgroup is the cgroup v2 directory the programs attach to (steering.cgroup);
	// every process below it is steered. Empty: the cgroup v2 root found in
	// /proc/mounts. A relative path is taken relative to that root.
	Cgroup string
	// BPFFS is the directory for pins (steering.bpffs), default
	// /sys/fs/bpf/nodeagent; it must be on a bpf filesystem. When it is under
	// /sys/fs/bpf and nothing is mounted there, Run mounts one there (as
	// systemd does on most hosts).
	BPFFS string
	// HostNetns is the network namespace whose sockets are sent to the proxy's
	// loopback listener (a path such as /proc/1/ns/net). Empty: the agent's own.
	HostNetns string
	// ProxyAddr4 is the proxy's IPv4 loopback listener, 127.0.0.1:15001 by
	// default (the first IPv4 entry of proxy.listen). Host sockets dialling an
	// IPv4 (or IPv4-mapped) destination are sent there.
	ProxyAddr4 netip.AddrPort
	// ProxyAddr6 is the proxy's IPv6 listener ([::1]:15001), may be zero: host
	// sockets dialling a real IPv6 destination then go to ProxyAddr4 as an
	// IPv4-mapped address.
	ProxyAddr6 netip.AddrPort
	// PodRedirect is where sockets of other network namespaces are sent
	// (steering.pod_redirect, normally ${NODE_IP}:15001). Zero: pod sockets are
	// not steered and are counted in nodeagent_steering_pod_unsteered_total.
	PodRedirect netip.AddrPort
	// Intercepts are the destinations to steer: the keys of proxy.address_map.
	Intercepts []Intercept
	// KeepOnExit keeps programs attached and pinned when Run returns, so that
	// mapped destinations stay steered across a restart. Default false: Run
	// detaches and unpins everything on the way out.
	KeepOnExit bool
}

// DefaultBPFFS is the default pin directory.
const DefaultBPFFS = "/sys/fs/bpf/nodeagent"

func (o Options) withDefaults() Options {
	if o.HostRoot == "" {
		o.HostRoot = "/"
	}
	if o.BPFFS == "" {
		o.BPFFS = DefaultBPFFS
	}
	return o
}

// Intercept is one steered destination: Port 0 means any port of Addr.
type Intercept struct {
	Addr netip.Addr
	Port uint16
}

// ParseIntercept parses a proxy.address_map key: an IP ("169.254.1.2",
// "fd00::2") for any port, or IP:port ("169.254.1.4:443", "[fd00::2]:80").
func ParseIntercept(s string) (Intercept, error) {
	if a, err := netip.ParseAddr(s); err == nil {
		if a.Zone() != "" {
			return Intercept{}, fmt.Errorf("intercept %q: zones are not supported", s)
		}
		return Intercept{Addr: a.Unmap()}, nil
	}
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return Intercept{}, fmt.Errorf("intercept %q: want IP or IP:port", s)
	}
	if ap.Port() == 0 {
		return Intercept{}, fmt.Errorf("intercept %q: port 0 (omit the port to match any port)", s)
	}
	if ap.Addr().Zone() != "" {
		return Intercept{}, fmt.Errorf("intercept %q: zones are not supported", s)
	}
	return Intercept{Addr: ap.Addr().Unmap(), Port: ap.Port()}, nil
}

// String returns the address_map spelling of i.
func (i Intercept) String() string {
	if i.Port == 0 {
		return i.Addr.String()
	}
	return netip.AddrPortFrom(i.Addr, i.Port).String()
}

// Matches reports whether a connection to dst would be steered by i.
func (i Intercept) Matches(dst netip.AddrPort) bool {
	return i.Addr == dst.Addr().Unmap() && (i.Port == 0 || i.Port == dst.Port())
}

var errInvalidOptions = errors.New("invalid steering options")

// validate checks what the BPF programs rely on.
func (o Options) validate() error {
	var errs []error
	if o.ProxyAddr4.IsValid() && !o.ProxyAddr4.Addr().Unmap().Is4() {
		errs = append(errs, fmt.Errorf("proxy address %s: want IPv4", o.ProxyAddr4))
	}
	if o.ProxyAddr6.IsValid() && (!o.ProxyAddr6.Addr().Is6() || o.ProxyAddr6.Addr().Is4In6()) {
		errs = append(errs, fmt.Errorf("proxy address %s: want IPv6", o.ProxyAddr6))
	}
	if !o.ProxyAddr4.IsValid() && !o.ProxyAddr6.IsValid() {
		errs = append(errs, errors.New("no proxy address"))
	}
	for _, t := range []netip.AddrPort{o.ProxyAddr4, o.ProxyAddr6, o.PodRedirect} {
		if !t.IsValid() {
			continue
		}
		if t.Port() == 0 {
			errs = append(errs, fmt.Errorf("target %s: port 0", t))
		}
		for _, i := range o.Intercepts {
			if i.Matches(t) {
				errs = append(errs, fmt.Errorf("target %s is itself intercepted by %s", t, i))
			}
		}
	}
	for _, i := range o.Intercepts {
		if !i.Addr.IsValid() {
			errs = append(errs, errors.New("intercept with no address"))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("%w: %w", errInvalidOptions, err)
	}
	return nil
}
