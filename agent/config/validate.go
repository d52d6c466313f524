package config

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

// Validate reports every problem in c at once (errors.Join), each prefixed with the
// key path the operator wrote.
func (c *Config) Validate() error {
	v := &validator{}
	c.validate(v)
	if len(v.errs) == 0 {
		return nil
	}
	if len(c.unset) > 0 {
		v.errs = append(v.errs, fmt.Errorf("note: referenced but not set in the environment: %s", strings.Join(c.unset, ", ")))
	}
	return errors.Join(v.errs...)
}

type validator struct{ errs []error }

func (v *validator) add(path, format string, args ...any) {
	v.errs = append(v.errs, fmt.Errorf("%s: %s", path, fmt.Sprintf(format, args...)))
}

// listener records where each address is bound, to catch duplicates.
type listeners map[netip.AddrPort]string

func (c *Config) validate(v *validator) {
	if c.NodeName == "" {
		v.add("node_name", "empty, and neither $NODE_NAME nor the hostname gave one")
	}
	if c.NodeIP != "" {
		if _, err := netip.ParseAddr(c.NodeIP); err != nil {
			v.add("node_ip", "%q is not an IP address", c.NodeIP)
		}
	}
	if !filepath.IsAbs(c.HostRoot) {
		v.add("host_root", "%q must be an absolute path", c.HostRoot)
	}
	switch c.Log.Format {
	case "json", "text":
	default:
		v.add("log.format", "%q: want json or text", c.Log.Format)
	}
	if _, err := ParseLevel(c.Log.Level); err != nil {
		v.add("log.level", "%v", err)
	}
	if c.ShutdownGrace < 0 {
		v.add("shutdown_grace", "must not be negative")
	}

	bound := listeners{}
	v.listen(bound, "health.listen", c.Health.Listen)
	for i, cidr := range c.Health.AllowFrom {
		if _, err := netip.ParsePrefix(cidr); err != nil {
			v.add(fmt.Sprintf("health.allow_from[%d]", i), "%q is not a CIDR such as 10.0.0.0/8", cidr)
		}
	}

	if h := c.Hostprep; h != nil {
		h.validate(v)
	}
	if u := c.Uplink; u != nil {
		if !validIfName(u.Interface) {
			v.add("uplink.interface", "%q is not a valid interface name (1-15 characters, no '/', ':' or spaces)", u.Interface)
		}
		if u.MinMTU < 68 || u.MinMTU > 65535 {
			v.add("uplink.min_mtu", "%d: want 68..65535", u.MinMTU)
		}
	}
	if s := c.Spire; s != nil {
		v.absPath("spire.socket", s.Socket)
		if s.ExposeAt != "" {
			v.absPath("spire.expose_at", s.ExposeAt)
			if filepath.Clean(s.ExposeAt) == filepath.Clean(s.Socket) {
				v.add("spire.expose_at", "is the socket itself")
			}
		}
	}
	if p := c.Proxy; p != nil {
		p.validate(v, bound)
	}
	if s := c.Steering; s != nil {
		c.validateSteering(v)
	}
	if o := c.OTLP; o != nil {
		o.validate(v, bound, c.Spire != nil)
	}
}

func (h *Hostprep) validate(v *validator) {
	switch h.Mode {
	case "apply", "check":
	default:
		v.add("hostprep.mode", "%q: want apply or check", h.Mode)
	}
	if h.Hugepages.Count < 0 {
		v.add("hostprep.hugepages.count", "%d: must not be negative (0 leaves the pool alone)", h.Hugepages.Count)
	}
	// 2^24 pages of 2 MiB is 32 TiB: anything above is a typo, not a pool.
	if h.Hugepages.Count > 1<<24 {
		v.add("hostprep.hugepages.count", "%d pages of 2 MiB is more memory than any node has", h.Hugepages.Count)
	}
	v.confFile("hostprep.hugepages.sysctl_file", h.Hugepages.SysctlFile, "/etc/sysctl.d/", ".conf")
	v.confFile("hostprep.modules_file", h.ModulesFile, "/etc/modules-load.d/", ".conf")
	seen := map[string]bool{}
	for i, m := range h.Modules {
		p := fmt.Sprintf("hostprep.modules[%d]", i)
		if !moduleName.MatchString(m) {
			v.add(p, "%q is not a kernel module name", m)
		}
		key := strings.ReplaceAll(m, "-", "_")
		if seen[key] {
			v.add(p, "%q is listed twice", m)
		}
		seen[key] = true
	}
	v.absPath("hostprep.bpffs", h.BPFFS)
}

var moduleName = regexp.MustCompile(`^[A-Za-z0-9_-]{1,55}$`)

func (p *Proxy) validate(v *validator, bound listeners) {
	if len(p.Listen) == 0 {
		v.add("proxy.listen", "empty: the proxy needs at least one listener")
	}
	for i, l := range p.Listen {
		v.listen(bound, fmt.Sprintf("proxy.listen[%d]", i), l)
	}
	if p.ConnectTimeout <= 0 {
		v.add("proxy.connect_timeout", "must be positive")
	}
	if p.IdleTimeout < 0 {
		v.add("proxy.idle_timeout", "must not be negative (0: none)")
	}
	if p.MaxConnectionDuration < 0 {
		v.add("proxy.max_connection_duration", "must not be negative (0: none)")
	}
	if p.DrainTimeout < 0 {
		v.add("proxy.drain_timeout", "must not be negative")
	}
	if p.MaxConnectAttempts < 1 {
		v.add("proxy.max_connect_attempts", "%d: want at least 1", p.MaxConnectAttempts)
	}
	for _, name := range sortedKeys(p.Clusters) {
		cl := p.Clusters[name]
		path := "proxy.clusters." + name
		if !clusterName.MatchString(name) {
			v.add(path, "cluster names are letters, digits, '_' and '-', and not a host name")
		}
		if len(cl.Endpoints) == 0 {
			v.add(path+".endpoints", "empty: a cluster needs at least one endpoint")
		}
		for i, ep := range cl.Endpoints {
			if err := checkHostPort(ep); err != nil {
				v.add(fmt.Sprintf("%s.endpoints[%d]", path, i), "%q %v", ep, err)
			}
		}
		switch cl.LBPolicy {
		case "", "round_robin", "least_conn", "random":
		default:
			v.add(path+".lb_policy", "%q: want round_robin, least_conn or random", cl.LBPolicy)
		}
	}

	keys := map[netip.AddrPort]bool{} // port 0: the IP with any port
	for _, k := range sortedKeys(p.AddressMap) {
		ap, err := ParseMapKey(k)
		if err != nil {
			v.add(fmt.Sprintf("proxy.address_map[%q]", k), "%v", err)
			continue
		}
		if keys[ap] {
			v.add(fmt.Sprintf("proxy.address_map[%q]", k), "the same destination is mapped twice")
		}
		keys[ap] = true
	}
	for _, k := range sortedKeys(p.AddressMap) {
		target := p.AddressMap[k]
		path := fmt.Sprintf("proxy.address_map[%q]", k)
		if _, ok := p.Clusters[target]; ok {
			continue
		}
		host, port, err := splitTarget(target)
		if err != nil {
			v.add(path, "%q %v", target, err)
			continue
		}
		if ip, err := netip.ParseAddr(host); err == nil {
			ip = ip.Unmap()
			if keys[netip.AddrPortFrom(ip, 0)] || (port != 0 && keys[netip.AddrPortFrom(ip, port)]) {
				v.add(path, "target %q is itself a mapped address: connections would loop", target)
			}
		}
	}
	for _, name := range sortedKeys(p.Clusters) {
		for i, ep := range p.Clusters[name].Endpoints {
			host, portStr, err := net.SplitHostPort(ep)
			if err != nil {
				continue
			}
			port, _ := strconv.ParseUint(portStr, 10, 16)
			if ip, err := netip.ParseAddr(host); err == nil {
				ip = ip.Unmap()
				if keys[netip.AddrPortFrom(ip, 0)] || keys[netip.AddrPortFrom(ip, uint16(port))] {
					v.add(fmt.Sprintf("proxy.clusters.%s.endpoints[%d]", name, i), "%q is itself a mapped address: connections would loop", ep)
				}
			}
		}
	}
}

var clusterName = regexp.MustCompile(`^[A-Za-z0-9_-]+$`)

// ParseMapKey parses an address_map key: an IP (any port, returned with port 0) or IP:port.
func ParseMapKey(k string) (netip.AddrPort, error) {
	if ip, err := netip.ParseAddr(k); err == nil {
		if ip.Zone() != "" {
			return netip.AddrPort{}, fmt.Errorf("an IPv6 zone is not allowed")
		}
		return netip.AddrPortFrom(ip.Unmap(), 0), nil
	}
	ap, err := netip.ParseAddrPort(k)
	if err != nil {
		if strings.Contains(k, "/") {
			return netip.AddrPort{}, fmt.Errorf("a prefix is not a key: map single addresses (an IP, or IP:port)")
		}
		return netip.AddrPort{}, fmt.Errorf("not an IP or IP:port (IPv6 with a port is written [fd00::2]:80)")
	}
	if ap.Port() == 0 {
		return netip.AddrPort{}, fmt.Errorf("port 0: leave the port out to map every port")
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
}

// splitTarget splits "host:port" or "host"; port 0 means "keep the original port".
func splitTarget(t string) (host string, port uint16, err error) {
	if t == "" {
		return "", 0, fmt.Errorf("is empty")
	}
	if ip, err := netip.ParseAddr(t); err == nil {
		return ip.String(), 0, nil
	}
	if h, p, err := net.SplitHostPort(t); err == nil {
		if err := checkHostPort(t); err != nil {
			return "", 0, err
		}
		n, _ := strconv.ParseUint(p, 10, 16)
		return h, uint16(n), nil
	}
	if !strings.Contains(t, ".") {
		return "", 0, fmt.Errorf("names no defined cluster (and a DNS name needs a dot)")
	}
	if !validHost(t) {
		return "", 0, fmt.Errorf("is not a cluster, host:port, IP or DNS name")
	}
	return t, 0, nil
}

func checkHostPort(s string) error {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		if _, err := netip.ParseAddr(s); err == nil || !strings.Contains(s, ":") {
			return fmt.Errorf("has no port")
		}
		return fmt.Errorf("is not host:port")
	}
	n, err := strconv.ParseUint(port, 10, 16)
	if err != nil || n == 0 {
		return fmt.Errorf("has a bad port %q (want 1-65535)", port)
	}
	if _, err := netip.ParseAddr(host); err != nil && !validHost(host) {
		return fmt.Errorf("has a bad host %q", host)
	}
	return nil
}

var hostLabel = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$`)

func validHost(h string) bool {
	h = strings.TrimSuffix(h, ".")
	if h == "" || len(h) > 253 {
		return false
	}
	for _, l := range strings.Split(h, ".") {
		if !hostLabel.MatchString(l) {
			return false
		}
	}
	return true
}

func (c *Config) validateSteering(v *validator) {
	s := c.Steering
	if c.Proxy == nil {
		v.add("steering", "needs a proxy section: steered connections go to the proxy")
	}
	if s.Cgroup != "" {
		v.absPath("steering.cgroup", s.Cgroup)
	}
	v.absPath("steering.bpffs", s.BPFFS)
	if c.Proxy == nil {
		return
	}
	var v4 bool
	for _, l := range c.Proxy.Listen {
		if ap, err := netip.ParseAddrPort(l); err == nil && ap.Addr().IsLoopback() {
			v4 = v4 || ap.Addr().Is4()
		}
	}
	if !v4 {
		v.add("proxy.listen", "steering needs a loopback listener such as 127.0.0.1:15001 for host sockets")
	}
	if s.PodRedirect == "" {
		return
	}
	ap, err := netip.ParseAddrPort(s.PodRedirect)
	if err != nil || ap.Port() == 0 || !ap.Addr().IsValid() || ap.Addr().IsUnspecified() {
		v.add("steering.pod_redirect", "%q is not an IP:port such as 10.0.0.7:15001 (is $NODE_IP set?)", s.PodRedirect)
		return
	}
	for _, l := range c.Proxy.Listen {
		if lp, err := netip.ParseAddrPort(l); err == nil && lp.Port() == ap.Port() &&
			(lp.Addr() == ap.Addr() || lp.Addr().IsUnspecified()) {
			return
		}
	}
	v.add("steering.pod_redirect", "%q is not among proxy.listen: pod connections would be refused", s.PodRedirect)
}

func (o *OTLP) validate(v *validator, bound listeners, haveSpire bool) {
	v.listen(bound, "otlp.grpc_listen", o.GRPCListen)
	v.listen(bound, "otlp.http_listen", o.HTTPListen)
	e := o.Exporter
	switch e.Protocol {
	case "grpc", "http":
		if e.Endpoint == "" {
			v.add("otlp.exporter.endpoint", "empty: protocol %s needs an upstream", e.Protocol)
		} else if e.Protocol == "grpc" {
			if err := checkHostPort(e.Endpoint); err != nil {
				v.add("otlp.exporter.endpoint", "%q %v", e.Endpoint, err)
			}
		} else if !strings.HasPrefix(e.Endpoint, "http://") && !strings.HasPrefix(e.Endpoint, "https://") {
			v.add("otlp.exporter.endpoint", "%q: protocol http wants a URL such as https://collector:4318", e.Endpoint)
		}
	case "file":
		if e.Path == "" {
			v.add("otlp.exporter.path", "empty: protocol file needs a path for the JSON lines")
		} else {
			v.absPath("otlp.exporter.path", e.Path)
		}
	default:
		v.add("otlp.exporter.protocol", "%q: want grpc, http or file", e.Protocol)
	}
	for key, p := range map[string]string{"ca_file": e.CAFile, "cert_file": e.CertFile, "key_file": e.KeyFile} {
		if p != "" {
			v.absPath("otlp.exporter."+key, p)
		}
	}
	if (e.CertFile == "") != (e.KeyFile == "") {
		v.add("otlp.exporter.cert_file", "cert_file and key_file go together")
	}
	if e.Spiffe.ServerID != "" {
		if !strings.HasPrefix(e.Spiffe.ServerID, "spiffe://") || len(e.Spiffe.ServerID) <= len("spiffe://") {
			v.add("otlp.exporter.spiffe.server_id", "%q is not a SPIFFE ID (spiffe://trust-domain/path)", e.Spiffe.ServerID)
		}
		if !haveSpire {
			v.add("otlp.exporter.spiffe", "needs the spire section: the SVID comes from the SPIRE agent socket")
		}
		if e.Insecure {
			v.add("otlp.exporter.insecure", "cannot be true together with spiffe mTLS")
		}
	}
	if e.Timeout <= 0 {
		v.add("otlp.exporter.timeout", "must be positive")
	}
	switch e.Compression {
	case "gzip", "none", "":
	default:
		v.add("otlp.exporter.compression", "%q: want gzip or none", e.Compression)
	}
	if o.MaxRequestSize <= 0 {
		v.add("otlp.max_request_size", "must be positive")
	}
	if o.Batch.MaxSpans < 1 {
		v.add("otlp.batch.max_spans", "%d: want at least 1", o.Batch.MaxSpans)
	}
	if o.Batch.MaxBytes <= 0 {
		v.add("otlp.batch.max_bytes", "must be positive")
	}
	if o.Batch.Timeout <= 0 {
		v.add("otlp.batch.timeout", "must be positive")
	}
	v.absPath("otlp.queue.dir", o.Queue.Dir)
	if o.Queue.MaxBytes < 1<<20 {
		v.add("otlp.queue.max_bytes", "%s: want at least 1MiB", o.Queue.MaxBytes)
	}
	if o.Queue.MaxBytes <= o.MaxRequestSize {
		v.add("otlp.queue.max_bytes", "%s must exceed max_request_size %s, or one large request could never be queued", o.Queue.MaxBytes, o.MaxRequestSize)
	}
	if o.Queue.Consumers < 1 || o.Queue.Consumers > 256 {
		v.add("otlp.queue.consumers", "%d: want 1..256", o.Queue.Consumers)
	}
	switch o.Queue.Fsync {
	case "never", "segment", "always":
	default:
		v.add("otlp.queue.fsync", "%q: want never, segment or always", o.Queue.Fsync)
	}
	if o.Retry.InitialInterval <= 0 {
		v.add("otlp.retry.initial_interval", "must be positive")
	}
	if o.Retry.MaxInterval < o.Retry.InitialInterval {
		v.add("otlp.retry.max_interval", "%s is below initial_interval %s", o.Retry.MaxInterval, o.Retry.InitialInterval)
	}
	if o.MemoryLimit < 16<<20 {
		v.add("otlp.memory_limit", "%s: want at least 16MiB", o.MemoryLimit)
	}
	if o.MaxRequestSize > o.MemoryLimit {
		v.add("otlp.max_request_size", "%s is above memory_limit %s: such a request could never be accepted", o.MaxRequestSize, o.MemoryLimit)
	}
	for _, k := range sortedKeys(o.ResourceAttributes) {
		if k == "" {
			v.add("otlp.resource_attributes", "an attribute needs a name")
		}
	}
}

// listen checks an IP:port listener address and that no other listener has it.
func (v *validator) listen(bound listeners, path, addr string) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		if _, ipErr := netip.ParseAddr(addr); ipErr == nil {
			v.add(path, "%q has no port", addr)
		} else {
			v.add(path, "%q is not IP:port (such as 127.0.0.1:9874; is $NODE_IP set?)", addr)
		}
		return
	}
	if ap.Port() == 0 {
		v.add(path, "%q: port 0 is not allowed", addr)
		return
	}
	for other, otherPath := range bound {
		if other.Port() == ap.Port() && (other.Addr() == ap.Addr() || other.Addr().IsUnspecified() || ap.Addr().IsUnspecified()) {
			v.add(path, "%q is already used by %s", addr, otherPath)
			return
		}
	}
	bound[ap] = path
}

func (v *validator) absPath(path, p string) {
	if p == "" {
		v.add(path, "empty: want an absolute path")
	} else if !filepath.IsAbs(p) {
		v.add(path, "%q must be an absolute path", p)
	}
}

func (v *validator) confFile(path, p, dir, ext string) {
	v.absPath(path, p)
	if filepath.IsAbs(p) && (!strings.HasPrefix(p, dir) || filepath.Ext(p) != ext) {
		v.add(path, "%q: the boot-time loader reads only %s*%s", p, dir, ext)
	}
}

func validIfName(s string) bool {
	return s != "" && len(s) <= 15 && s != "." && s != ".." && !strings.ContainsAny(s, "/: \t\n")
}

// ParseLevel parses a log level name.
func ParseLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return 0, fmt.Errorf("%q: want debug, info, warn or error", s)
	}
	return l, nil
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
