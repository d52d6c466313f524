package proxy

import (
	"math/rand/v2"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// route is one compiled address_map entry.
type route struct {
	key    string // as written in the configuration: the metrics label
	target string // as written
	// cluster is set for cluster targets; otherwise host/port describe the target
	// (port 0: keep the original port).
	cluster *cluster
	host    string
	port    uint16
	// connected is this mapping's connections_total{result="connected"}.
	connected interface{ Inc() }
}

// id identifies what a connection was routed by: a connection whose route id is no
// longer in the table after Update is drained.
func (r *route) id() string { return r.key + "\x00" + r.target }

type cluster struct {
	name      string
	policy    LBPolicy
	endpoints []*endpoint
	rr        atomic.Uint64
}

// table is an immutable snapshot of the mapping; Update swaps in a new one.
type table struct {
	byAddrPort map[netip.AddrPort]*route
	byAddr     map[netip.Addr]*route
	routes     []*route
	clusters   map[string]*cluster
	ids        map[string]bool
	hosts      map[string]bool // DNS names to keep resolved
}

func (t *table) lookup(dst netip.AddrPort) *route {
	dst = netip.AddrPortFrom(dst.Addr().Unmap().WithZone(""), dst.Port())
	if r := t.byAddrPort[dst]; r != nil {
		return r
	}
	return t.byAddr[dst.Addr()]
}

// compile validates o and builds a table, sharing endpoint state through reg.
func compile(o Options, reg *endpointRegistry) (*table, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	t := &table{
		byAddrPort: map[netip.AddrPort]*route{},
		byAddr:     map[netip.Addr]*route{},
		clusters:   map[string]*cluster{},
		ids:        map[string]bool{},
		hosts:      map[string]bool{},
	}
	for name, c := range o.Clusters {
		cl := &cluster{name: name, policy: c.LBPolicy}
		if cl.policy == "" {
			cl.policy = RoundRobin
		}
		for _, ep := range c.Endpoints {
			host, port, _ := ParseHostPort(ep) // validated
			cl.endpoints = append(cl.endpoints, reg.get(host, port))
			if !isIP(host) {
				t.hosts[host] = true
			}
		}
		t.clusters[name] = cl
	}
	for k, v := range o.AddressMap {
		key, _ := ParseKey(k)               // validated
		tg, _ := ParseTarget(v, o.Clusters) // validated
		r := &route{key: k, target: v, host: tg.Host, port: tg.Port}
		if tg.IsCluster() {
			r.cluster = t.clusters[tg.Cluster]
		} else if !isIP(tg.Host) {
			t.hosts[tg.Host] = true
		}
		if key.Port == 0 {
			t.byAddr[key.Addr] = r
		} else {
			t.byAddrPort[netip.AddrPortFrom(key.Addr, key.Port)] = r
		}
		t.routes = append(t.routes, r)
		t.ids[r.id()] = true
	}
	return t, nil
}

func isIP(host string) bool {
	_, err := netip.ParseAddr(host)
	return err == nil
}

// endpoint is one upstream host:port with its passive health and load, shared by
// every cluster and table that names it, so a reload keeps what was learned.
type endpoint struct {
	host   string
	port   uint16
	addr   string     // host:port, for logs and DialControl
	ip     netip.Addr // when host is an IP literal
	active atomic.Int64

	mu       sync.Mutex
	failures int       // consecutive connect failures
	downAt   time.Time // when the last failure happened
	downTill time.Time // skipped by the load balancer until then
}

// Passive health backoff: after n consecutive failures an endpoint is skipped for
// min(healthBackoffBase<<(n-1), healthBackoffMax).
const (
	healthBackoffBase = time.Second
	healthBackoffMax  = time.Minute
)

func (e *endpoint) failed(now time.Time) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.failures++
	d := healthBackoffMax
	if e.failures < 8 {
		d = min(healthBackoffBase<<(e.failures-1), healthBackoffMax)
	}
	e.downAt = now
	e.downTill = now.Add(d)
}

func (e *endpoint) succeeded() {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.failures = 0
	e.downTill = time.Time{}
}

// live reports whether the endpoint is not in backoff, and until when it is.
func (e *endpoint) live(now time.Time) (bool, time.Time) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return !now.Before(e.downTill), e.downTill
}

type endpointRegistry struct {
	mu sync.Mutex
	m  map[string]*endpoint
}

func newEndpointRegistry() *endpointRegistry {
	return &endpointRegistry{m: map[string]*endpoint{}}
}

func (r *endpointRegistry) get(host string, port uint16) *endpoint {
	addr := joinHostPort(host, port)
	r.mu.Lock()
	defer r.mu.Unlock()
	e := r.m[addr]
	if e == nil {
		e = &endpoint{host: host, port: port, addr: addr}
		if ip, err := netip.ParseAddr(host); err == nil {
			e.ip = ip
		}
		r.m[addr] = e
	}
	return e
}

// prune forgets endpoints that no table names and that carry no connection.
func (r *endpointRegistry) prune(keep *table) {
	named := map[*endpoint]bool{}
	for _, c := range keep.clusters {
		for _, e := range c.endpoints {
			named[e] = true
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for k, e := range r.m {
		if !named[e] && e.active.Load() == 0 {
			delete(r.m, k)
		}
	}
}

func joinHostPort(host string, port uint16) string {
	if a, err := netip.ParseAddr(host); err == nil {
		return netip.AddrPortFrom(a, port).String()
	}
	return host + ":" + strconv.Itoa(int(port))
}

// pick chooses the next endpoint to try. tried marks endpoints already attempted
// for this connection. Live endpoints come first, by policy; when none is left, the
// untried endpoint whose backoff ends soonest is tried anyway (better than failing
// a connection while every endpoint is in backoff); when every endpoint was tried,
// the choice starts over.
func (c *cluster) pick(now time.Time, tried map[*endpoint]bool) *endpoint {
	n := len(c.endpoints)
	if n == 0 {
		return nil
	}
	if len(tried) >= n {
		clear(tried)
	}
	var start int
	switch c.policy {
	case Random:
		start = rand.IntN(n)
	default:
		start = int(c.rr.Add(1)-1) % n
	}
	var best *endpoint
	var bestActive int64
	var fallback *endpoint
	var fallbackTill time.Time
	for i := range n {
		e := c.endpoints[(start+i)%n]
		if tried[e] {
			continue
		}
		live, till := e.live(now)
		if !live {
			if fallback == nil || till.Before(fallbackTill) {
				fallback, fallbackTill = e, till
			}
			continue
		}
		if c.policy != LeastConn {
			return e
		}
		if a := e.active.Load(); best == nil || a < bestActive {
			best, bestActive = e, a
		}
	}
	if best != nil {
		return best
	}
	return fallback
}

// liveCount is the number of endpoints not in backoff.
func (c *cluster) liveCount(now time.Time) int {
	n := 0
	for _, e := range c.endpoints {
		if live, _ := e.live(now); live {
			n++
		}
	}
	return n
}
