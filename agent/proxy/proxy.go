// Package proxy is nodeagent's address-mapping TCP proxy: the node-local,
// config-driven equivalent of an Envoy TCP proxy whose cluster is chosen per
// connection from the connection's original destination.
//
// For each accepted connection the proxy asks the steering layer (OriginalDst) where
// the connection was originally headed, maps that destination through
// proxy.address_map (IP:port wins over IP) to a target — a cluster, host:port, or
// host keeping the original port — dials it (connect_timeout per attempt, up to
// max_connect_attempts endpoints, passive health with backoff) and relays bytes both
// ways with half-close, idle_timeout and max_connection_duration. A connection the
// steering layer does not know, or whose destination is not mapped, is reset at
// once: the proxy is never an open relay.
//
// Relay. Each direction is one RawConn.Read whose callback reads (non-blocking)
// into a pooled buffer taken only for that read, so a parked direction holds no
// buffer; a read that fills the 16 KiB buffer switches to splice(2) through a
// pipe pair borrowed from a pool and returned as soon as the socket is empty.
// Small messages are copied (same syscalls as splicing them, no pipe), bulk is
// zero-copy, and an idle connection holds 2 descriptors and no pipe. The
// textbook alternative, io.Copy on two *net.TCPConn, splices too but holds a pipe
// pair per direction for the connection's whole life: 6 descriptors per proxied
// connection, so this machine's 20 000-descriptor limit caps it at ~3 300
// connections instead of ~9 990. Measured by test/bench/proxy on a 2-vCPU VM
// (medians of 3 rounds, client, server and proxy sharing the CPUs):
//
//	                   Gbit/s  conn/s  CPU µs/conn  p50 µs  p99 µs  KiB/idle conn  fds/idle conn
//	direct              20.4   14188       -          20      97       -              -
//	haproxy 2.6 splice   8.9    9912      86         127     225      3.3            2.00
//	nodeagent splice    15.1    5987     119          71     160      7.8            2.00
//	nodeagent copy      12.5    8438     111         116     203      7.9            2.00
//	Go io.Copy          13.2    6417     108          70     166     14.1            5.96
//
// Idle memory is RSS growth of the proxy process over 9 900 idle connections
// (3 316 for io.Copy, which runs out of descriptors). The relay goroutines are
// started fresh after the dial, so an idle connection does not keep the dial
// path's grown stack (13.8 KiB per idle connection before that change).
//
// Access log: with Options.AccessLog, one Info line "connection" per connection
// at close (sampled by AccessLogSample) with client, original_dst, mapping, target,
// endpoint, bytes_upstream, bytes_downstream, duration and reason (done,
// client_reset, target_reset, client_error, target_error, idle_timeout,
// max_duration, drain_timeout, shutdown); refused connections get a
// "connection refused" line, rate-limited.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/nodeagent/nodeagent/agent/health"
)

// keepAlive is used on both sides of every connection.
var keepAlive = net.KeepAliveConfig{Enable: true, Idle: 30 * time.Second, Interval: 15 * time.Second, Count: 4}

// Proxy is the address-mapping proxy. Create it with New, run it with Run.
type Proxy struct {
	log   *slog.Logger
	rep   health.Reporter
	m     *metrics
	eps   *endpointRegistry
	dns   *dnsCache
	pipes *pipePool

	hooks Options // OriginalDst, DialControl, Resolver, Listeners: fixed at New
	cfg   atomic.Pointer[config]

	mu       sync.Mutex
	running  bool
	stopping bool // Run is force-closing connections: refuse new ones
	conns    map[*conn]struct{}
	kick     chan struct{} // re-evaluate health now

	refusedLog rateLimit
	acceptLog  rateLimit
}

type config struct {
	opts Options
	tab  *table
}

// New validates opts and registers the proxy's metrics on reg. It does no I/O.
func New(opts Options, log *slog.Logger, reg prometheus.Registerer, rep health.Reporter) (*Proxy, error) {
	o := opts.withDefaults()
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if rep == nil {
		rep = health.Discard
	}
	p := &Proxy{
		log:   log,
		rep:   rep,
		eps:   newEndpointRegistry(),
		dns:   newDNSCache(),
		pipes: &pipePool{max: 1024},
		hooks: o,
		conns: map[*conn]struct{}{},
		kick:  make(chan struct{}, 1),
	}
	tab, err := compile(o, p.eps)
	if err != nil {
		return nil, fmt.Errorf("proxy config: %w", err)
	}
	m, err := newMetrics(reg)
	if err != nil {
		return nil, err
	}
	p.m = m
	m.initMappings(tab)
	p.dns.sync(tab.hosts)
	p.cfg.Store(&config{opts: o, tab: tab})
	return p, nil
}

// Update applies new options. The mapping, clusters, timeouts and access log
// apply to new connections at once; established connections keep their settings,
// and those whose mapping was removed or re-targeted are closed after
// DrainTimeout unless they end first. Different listen addresses need a restart of
// Run: Update stores them and returns health.ErrNeedsRestart. The injected hooks
// (OriginalDst, DialControl, Resolver, Listeners) are those given to New.
func (p *Proxy) Update(opts Options) error {
	o := opts.withDefaults()
	o.OriginalDst, o.DialControl, o.Resolver, o.Listeners = p.hooks.OriginalDst, p.hooks.DialControl, p.hooks.Resolver, p.hooks.Listeners
	tab, err := compile(o, p.eps)
	if err != nil {
		return fmt.Errorf("proxy config: %w", err)
	}
	old := p.cfg.Load()
	p.m.initMappings(tab)
	p.dns.sync(tab.hosts)
	p.cfg.Store(&config{opts: o, tab: tab})
	p.eps.prune(tab)

	p.mu.Lock()
	for c := range p.conns {
		c.setDrain(!tab.ids[c.routeID], o.DrainTimeout)
	}
	p.mu.Unlock()
	p.healthNow()
	p.log.Info("proxy config updated", "mappings", len(tab.routes), "clusters", len(tab.clusters))
	if len(p.hooks.Listeners) == 0 && !slices.Equal(old.opts.Listen, o.Listen) {
		return health.ErrNeedsRestart
	}
	return nil
}

func (p *Proxy) healthNow() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// Run listens, serves until ctx is done, then stops accepting, lets connections
// finish for up to ShutdownGrace, closes the rest and returns nil. It returns an
// error when it cannot listen or a listener fails.
func (p *Proxy) Run(ctx context.Context) error {
	p.mu.Lock()
	if p.running {
		p.mu.Unlock()
		return errors.New("proxy is already running")
	}
	p.running = true
	p.stopping = false
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		p.running = false
		p.mu.Unlock()
	}()

	if p.hooks.OriginalDst == nil {
		err := errors.New("no original-destination source (steering) configured")
		p.rep.Report(health.Result{Name: health.Proxy, OK: false, Detail: err.Error()})
		return err
	}
	cfg := p.cfg.Load()
	lns, owned, err := p.listen(ctx, cfg.opts)
	if err != nil {
		p.rep.Report(health.Result{Name: health.Proxy, OK: false, Detail: err.Error()})
		return err
	}
	var addrs []string
	for _, ln := range lns {
		addrs = append(addrs, ln.Addr().String())
	}
	p.log.Info("proxy listening", "addresses", addrs, "relay", cfg.opts.Relay)

	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	var bg sync.WaitGroup
	bg.Go(func() { p.dns.run(runCtx, p.hooks.Resolver, p.dnsRefresh, p.log, p.healthNow) })
	bg.Go(func() { p.healthLoop(runCtx, addrs) })

	var conns sync.WaitGroup
	acceptErr := make(chan error, len(lns))
	var accepting sync.WaitGroup
	for _, ln := range lns {
		accepting.Go(func() {
			if err := p.acceptLoop(runCtx, ln, &conns); err != nil {
				acceptErr <- err
			}
		})
	}

	var runErr error
	select {
	case <-ctx.Done():
	case runErr = <-acceptErr:
	}
	cancel()
	// Stop accepting: close our listeners, interrupt Accept on borrowed ones.
	for i, ln := range lns {
		if owned[i] {
			ln.Close()
		} else if d, ok := ln.(interface{ SetDeadline(time.Time) error }); ok {
			// Fails only on a closed listener, whose Accept has returned already.
			_ = d.SetDeadline(time.Unix(1, 0))
		}
	}
	accepting.Wait()
	for i, ln := range lns {
		if d, ok := ln.(interface{ SetDeadline(time.Time) error }); ok && !owned[i] {
			_ = d.SetDeadline(time.Time{}) // as above: only a closed listener refuses
		}
	}
	p.shutdownConns(&conns, p.cfg.Load().opts.ShutdownGrace)
	bg.Wait()
	p.pipes.drain()
	detail := "stopped"
	if runErr != nil {
		detail = runErr.Error()
	}
	p.rep.Report(health.Result{Name: health.Proxy, OK: false, Detail: detail})
	p.log.Info("proxy stopped", "error", runErr)
	return runErr
}

func (p *Proxy) dnsRefresh() time.Duration { return p.cfg.Load().opts.DNSRefresh }

// listen binds every Listen address with SO_REUSEPORT, or borrows Listeners.
func (p *Proxy) listen(ctx context.Context, o Options) ([]net.Listener, []bool, error) {
	if len(p.hooks.Listeners) > 0 {
		for _, ln := range p.hooks.Listeners {
			if _, ok := ln.(interface{ SetDeadline(time.Time) error }); !ok {
				return nil, nil, fmt.Errorf("listener %s cannot be interrupted (no SetDeadline)", ln.Addr())
			}
		}
		return p.hooks.Listeners, make([]bool, len(p.hooks.Listeners)), nil
	}
	// Keepalive is set on the listening socket, whose options every accepted
	// socket inherits; KeepAlive -1 stops Go from setting them again per accept.
	lc := net.ListenConfig{
		KeepAlive: -1,
		Control: func(network, address string, c syscall.RawConn) error {
			var serr error
			if err := c.Control(func(fd uintptr) {
				serr = setSockopts(int(fd), [][3]int{
					{unix.SOL_SOCKET, unix.SO_REUSEPORT, 1},
					{unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1},
					{unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, int(keepAlive.Idle / time.Second)},
					{unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, int(keepAlive.Interval / time.Second)},
					{unix.IPPROTO_TCP, unix.TCP_KEEPCNT, keepAlive.Count},
				})
			}); err != nil {
				return err
			}
			return serr
		},
	}
	var lns []net.Listener
	for _, ap := range o.Listen {
		ln, err := lc.Listen(ctx, "tcp", ap.String())
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			return nil, nil, fmt.Errorf("listen on %s: %w", ap, err)
		}
		lns = append(lns, ln)
	}
	owned := make([]bool, len(lns))
	for i := range owned {
		owned[i] = true
	}
	return lns, owned, nil
}

// Accept backoff after errors such as EMFILE: 5ms doubling up to 1s.
const (
	acceptBackoffMin = 5 * time.Millisecond
	acceptBackoffMax = time.Second
)

func (p *Proxy) acceptLoop(ctx context.Context, ln net.Listener, conns *sync.WaitGroup) error {
	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("accept on %s: %w", ln.Addr(), err)
			}
			p.m.acceptErrors.Inc()
			delay = min(max(2*delay, acceptBackoffMin), acceptBackoffMax)
			if n, ok := p.acceptLog.allow(5 * time.Second); ok {
				p.log.Warn("accept failed; backing off", "listener", ln.Addr().String(), "backoff", delay, "suppressed", n, "error", err)
			}
			t := time.NewTimer(delay)
			select {
			case <-ctx.Done():
				t.Stop()
				return nil
			case <-t.C:
			}
			continue
		}
		delay = 0
		conns.Go(func() { p.serve(ctx, c, conns) })
	}
}

// shutdownConns waits up to grace for connections to end, then closes the rest.
func (p *Proxy) shutdownConns(conns *sync.WaitGroup, grace time.Duration) {
	done := make(chan struct{})
	go func() { conns.Wait(); close(done) }()
	if grace > 0 {
		p.mu.Lock()
		n := len(p.conns)
		p.mu.Unlock()
		if n > 0 {
			p.log.Info("proxy draining connections", "connections", n, "grace", grace)
		}
		t := time.NewTimer(grace)
		select {
		case <-done:
			t.Stop()
			return
		case <-t.C:
		}
	}
	p.mu.Lock()
	p.stopping = true
	for c := range p.conns {
		c.close("shutdown", false)
	}
	p.mu.Unlock()
	<-done
}

// serve handles one accepted connection from the steering layer to its end.
//
// serve returns once the relay is set up: the relay runs in two fresh goroutines
// (counted in conns), so the deep stack of the accept-and-dial phase is not kept
// alive by a connection that then idles for hours.
func (p *Proxy) serve(ctx context.Context, nc net.Conn, conns *sync.WaitGroup) {
	client, ok := nc.(*net.TCPConn)
	if !ok {
		nc.Close()
		return
	}
	accepted := time.Now()
	cfg := p.cfg.Load()
	o := cfg.opts
	// TCP_NODELAY is Go's default on every TCP socket; keepalive comes from the
	// listener (ours: keepAlive; borrowed: Go's default, 15s).
	clientAddr := addrPortOf(client.RemoteAddr())

	dst, ok := p.hooks.OriginalDst.OriginalDst(clientAddr)
	if !ok {
		p.refuse(client, o, clientAddr, netip.AddrPort{}, mappingNone, resultNoOriginalDst, nil)
		return
	}
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	r := cfg.tab.lookup(dst)
	if r == nil {
		p.refuse(client, o, clientAddr, dst, mappingNone, resultUnmapped, nil)
		return
	}

	target, ep, result, err := p.connect(ctx, o, r, dst)
	if err != nil {
		p.refuse(client, o, clientAddr, dst, r.key, result, err)
		return
	}
	p.m.connectDuration.Observe(time.Since(accepted).Seconds())
	r.connected.Inc()

	c := &conn{
		p: p, client: client, target: target, route: r, routeID: r.id(), ep: ep,
		clientAddr: clientAddr, orig: dst, start: accepted,
		idle: o.IdleTimeout, maxDur: o.MaxConnectionDuration,
		logIt: o.AccessLog && (o.AccessLogSample >= 1 || rand.Float64() < o.AccessLogSample),
	}
	c.touch()
	if !p.track(c) {
		c.close("shutdown", false)
	}
	c.relay(o.Relay, conns)
}

// ended runs once, after both directions of c stopped.
func (c *conn) ended() {
	c.close("done", false)
	c.p.untrack(c)
	if c.logIt {
		c.p.log.Info("connection",
			"client", c.clientAddr.String(), "original_dst", c.orig.String(), "mapping", c.route.key, "target", c.route.target,
			"endpoint", c.target.RemoteAddr().String(), "bytes_upstream", c.up.Load(), "bytes_downstream", c.down.Load(),
			"duration", time.Since(c.start), "reason", c.reasonString())
	}
}

// connect dials the route's target: up to MaxConnectAttempts endpoints, each
// bounded by ConnectTimeout, skipping endpoints in backoff.
func (p *Proxy) connect(ctx context.Context, o Options, r *route, dst netip.AddrPort) (*net.TCPConn, *endpoint, string, error) {
	d := net.Dialer{Timeout: o.ConnectTimeout, KeepAliveConfig: keepAlive, Control: p.hooks.DialControl}
	tried := map[*endpoint]bool{}
	result := resultConnectFailed
	var errs []error
	for range o.MaxConnectAttempts {
		var ep *endpoint
		if r.cluster != nil {
			ep = r.cluster.pick(time.Now(), tried)
		} else {
			port := r.port
			if port == 0 {
				port = dst.Port()
			}
			ep = p.eps.get(r.host, port)
		}
		if ep == nil {
			return nil, nil, resultConnectFailed, errors.New("cluster has no endpoints")
		}
		tried[ep] = true
		addr, err := ep.ip, error(nil)
		if !addr.IsValid() { // a DNS name: wait for the background lookup, at most ConnectTimeout
			rctx, cancel := context.WithTimeout(ctx, o.ConnectTimeout)
			addr, err = p.dns.resolve(rctx, ep.host)
			cancel()
		}
		if err != nil {
			if ctx.Err() != nil {
				return nil, nil, resultShutdown, ctx.Err()
			}
			result = resultUnresolved
			errs = append(errs, err)
			continue
		}
		ep.active.Add(1)
		nc, err := d.DialContext(ctx, "tcp", netip.AddrPortFrom(addr, ep.port).String())
		if err != nil {
			ep.active.Add(-1)
			if ctx.Err() != nil {
				return nil, nil, resultShutdown, ctx.Err()
			}
			ep.failed(time.Now())
			p.healthNow() // the cluster may have lost its last live endpoint
			result = resultConnectFailed
			errs = append(errs, fmt.Errorf("connect to %s: %w", ep.addr, err))
			continue
		}
		ep.succeeded()
		return nc.(*net.TCPConn), ep, "", nil
	}
	return nil, nil, result, errors.Join(errs...)
}

// refuse resets client at once (RST, not FIN: the client must not mistake it for
// an empty answer) and counts it.
func (p *Proxy) refuse(client *net.TCPConn, o Options, clientAddr, dst netip.AddrPort, mapping, result string, err error) {
	// If SetLinger fails, Close sends a FIN instead; there is nothing better to do.
	_ = client.SetLinger(0)
	client.Close()
	p.m.connections.WithLabelValues(mapping, result).Inc()
	if !o.AccessLog && result != resultConnectFailed && result != resultUnresolved {
		return
	}
	if n, ok := p.refusedLog.allow(100 * time.Millisecond); ok {
		args := []any{"client", clientAddr.String(), "mapping", mapping, "result", result, "suppressed", n}
		if dst.IsValid() {
			args = append(args, "original_dst", dst.String())
		}
		if err != nil {
			args = append(args, "error", err)
		}
		p.log.Info("connection refused", args...)
	}
}

func (p *Proxy) track(c *conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.conns[c] = struct{}{}
	p.m.active.Inc()
	cfg := p.cfg.Load()
	// A reload between routing and here may already have removed the mapping.
	c.setDrain(!cfg.tab.ids[c.routeID], cfg.opts.DrainTimeout)
	return !p.stopping
}

func (p *Proxy) untrack(c *conn) {
	p.mu.Lock()
	delete(p.conns, c)
	p.mu.Unlock()
	p.m.active.Dec()
	c.ep.active.Add(-1)
}

func setSockopts(fd int, opts [][3]int) error {
	for _, o := range opts {
		if err := unix.SetsockoptInt(fd, o[0], o[1], o[2]); err != nil {
			return fmt.Errorf("setsockopt %d/%d: %w", o[0], o[1], err)
		}
	}
	return nil
}

func addrPortOf(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	return netip.AddrPort{}
}

// conn is one relayed connection.
type conn struct {
	p              *Proxy
	client, target *net.TCPConn
	route          *route
	routeID        string
	ep             *endpoint
	clientAddr     netip.AddrPort
	orig           netip.AddrPort
	start          time.Time
	idle, maxDur   time.Duration

	last     atomic.Int64 // UnixNano of the last byte moved
	up, down atomic.Int64
	eofs     atomic.Int32 // directions that ended with EOF
	logIt    bool         // sampled for the access log

	mu      sync.Mutex
	timer   *time.Timer
	drainAt time.Time
	reason  string
	closed  bool
}

func (c *conn) touch() { c.last.Store(time.Now().UnixNano()) }

func (c *conn) reasonString() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.reason == "" {
		return "done"
	}
	return c.reason
}

// close closes both sockets, with RST when abort; the first reason sticks.
func (c *conn) close(reason string, abort bool) {
	c.mu.Lock()
	if c.reason == "" {
		c.reason = reason
	}
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	if c.timer != nil {
		c.timer.Stop()
	}
	c.mu.Unlock()
	if abort {
		// Best effort: without it Close sends a FIN instead of an RST.
		_ = c.client.SetLinger(0)
		_ = c.target.SetLinger(0)
	}
	c.client.Close()
	c.target.Close()
}

// setDrain starts (on) or cancels the drain deadline of a connection whose
// mapping left the table.
func (c *conn) setDrain(on bool, timeout time.Duration) {
	c.mu.Lock()
	switch {
	case on && c.drainAt.IsZero():
		c.drainAt = time.Now().Add(timeout)
	case !on && !c.drainAt.IsZero():
		c.drainAt = time.Time{}
	default:
		c.mu.Unlock()
		return
	}
	c.armLocked()
	c.mu.Unlock()
	if on && timeout <= 0 {
		c.close("drain_timeout", false)
	}
}

// armLocked (re)sets the timer to the earliest of the idle, duration and drain
// deadlines.
func (c *conn) armLocked() {
	if c.closed {
		return
	}
	var next time.Time
	consider := func(t time.Time) {
		if !t.IsZero() && (next.IsZero() || t.Before(next)) {
			next = t
		}
	}
	if c.idle > 0 {
		consider(time.Unix(0, c.last.Load()).Add(c.idle))
	}
	if c.maxDur > 0 {
		consider(c.start.Add(c.maxDur))
	}
	consider(c.drainAt)
	if next.IsZero() {
		if c.timer != nil {
			c.timer.Stop()
		}
		return
	}
	d := time.Until(next)
	if c.timer == nil {
		c.timer = time.AfterFunc(d, c.onTimer)
	} else {
		c.timer.Reset(d)
	}
}

func (c *conn) onTimer() {
	now := time.Now()
	c.mu.Lock()
	var reason string
	switch {
	case c.maxDur > 0 && !now.Before(c.start.Add(c.maxDur)):
		reason = "max_duration"
	case !c.drainAt.IsZero() && !now.Before(c.drainAt):
		reason = "drain_timeout"
	case c.idle > 0 && now.Sub(time.Unix(0, c.last.Load())) >= c.idle:
		reason = "idle_timeout"
	default:
		c.armLocked() // activity since: sleep until the new deadline
		c.mu.Unlock()
		return
	}
	c.mu.Unlock()
	c.close(reason, false)
}

// relay moves bytes both ways until both directions ended or one failed.
func (c *conn) relay(mode RelayMode, wg *sync.WaitGroup) {
	c.mu.Lock()
	c.armLocked()
	c.mu.Unlock()
	clientRaw, err1 := c.client.SyscallConn()
	targetRaw, err2 := c.target.SyscallConn()
	if err := errors.Join(err1, err2); err != nil {
		c.close("client_error", true)
		c.ended()
		return
	}
	m := c.p.m
	up := newHalf(c, c.client, c.target, clientRaw, targetRaw, &c.up, func(n int64) { m.bytesUp.Add(float64(n)) }, mode, c.p.pipes)
	down := newHalf(c, c.target, c.client, targetRaw, clientRaw, &c.down, func(n int64) { m.bytesDown.Add(float64(n)) }, mode, c.p.pipes)
	var running atomic.Int32
	running.Store(2)
	wg.Go(func() {
		c.finish(down, down.run(), "target", "client")
		if running.Add(-1) == 0 {
			c.ended()
		}
	})
	wg.Go(func() {
		c.finish(up, up.run(), "client", "target")
		if running.Add(-1) == 0 {
			c.ended()
		}
	})
}

// finish ends one direction: a clean EOF is passed on as a FIN (half-close), a
// failure resets both sides.
func (c *conn) finish(h *half, err error, srcName, dstName string) {
	if err == nil {
		if c.eofs.Add(1) == 2 {
			// The other direction already ended with EOF: nothing is left to
			// read from dst, so the final close sends its FIN (no shutdown call).
			return
		}
		if cerr := h.dst.CloseWrite(); cerr == nil || isClosed(cerr) {
			return
		} else {
			err = &relayError{err: cerr}
		}
	}
	if isClosed(err) {
		return // we closed it: the reason is already set
	}
	side := dstName
	var re *relayError
	if errors.As(err, &re) && re.read {
		side = srcName
	}
	kind := "_error"
	if isReset(err) {
		kind = "_reset"
	}
	c.close(side+kind, true)
}

// rateLimit lets one event through per interval and counts the others.
type rateLimit struct {
	mu         sync.Mutex
	last       time.Time
	suppressed int
}

func (r *rateLimit) allow(every time.Duration) (suppressed int, ok bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	if now.Sub(r.last) < every {
		r.suppressed++
		return 0, false
	}
	r.last = now
	n := r.suppressed
	r.suppressed = 0
	return n, true
}

// healthLoop reports the proxy check once at start and whenever it changes.
func (p *Proxy) healthLoop(ctx context.Context, addrs []string) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	var last health.Result
	first := true
	for {
		res := p.evaluate(addrs)
		if first || res != last {
			p.rep.Report(res)
			last, first = res, false
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-p.kick:
		}
	}
}

// evaluate builds the proxy check: listeners bound, every DNS name resolved, every
// cluster with at least one endpoint out of backoff.
func (p *Proxy) evaluate(addrs []string) health.Result {
	tab := p.cfg.Load().tab
	var problems []string
	problems = append(problems, p.dns.unresolved()...)
	now := time.Now()
	var names []string
	for name := range tab.clusters {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		c := tab.clusters[name]
		if c.liveCount(now) == 0 {
			problems = append(problems, fmt.Sprintf("cluster %s: no live endpoint (%d in backoff)", name, len(c.endpoints)))
		}
	}
	if len(problems) > 0 {
		return health.Result{Name: health.Proxy, OK: false, Detail: strings.Join(problems, "; ")}
	}
	return health.Result{Name: health.Proxy, OK: true,
		Detail: fmt.Sprintf("listening on %s; %d mappings, %d clusters", strings.Join(addrs, ", "), len(tab.routes), len(tab.clusters))}
}
