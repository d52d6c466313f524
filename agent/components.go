package agent

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"path/filepath"
	"slices"
	"sync"

	"github.com/nodeagent/nodeagent/agent/config"
	"github.com/nodeagent/nodeagent/agent/health"
	"github.com/nodeagent/nodeagent/agent/proxy"
	"github.com/nodeagent/nodeagent/agent/spire"
	"github.com/nodeagent/nodeagent/collector"
	"github.com/nodeagent/nodeagent/collector/queue"
	"github.com/nodeagent/nodeagent/ebpf"
	"github.com/nodeagent/nodeagent/hostprep"
	"github.com/nodeagent/nodeagent/netcfg"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// instance is a built subsystem: it runs, and takes new configuration.
type instance interface {
	runner
	// Update applies cfg live where it can, or returns health.ErrNeedsRestart.
	Update(cfg *config.Config) error
}

// buildArgs is what a component's constructor gets.
type buildArgs struct {
	cfg    *config.Config
	log    *slog.Logger
	reg    prometheus.Registerer
	rep    health.Reporter
	wiring *wiring
}

// wiring carries what crosses between subsystems. Only the agent sees both sides.
type wiring struct {
	ctx       context.Context // lives as long as the agent's subsystems
	listeners map[string][]net.Listener
	log       *slog.Logger

	mu       sync.Mutex
	steering *ebpf.Steering // the proxy's source of original destinations
}

func (w *wiring) originalDst() proxy.OriginalDst {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.steering != nil {
		return w.steering
	}
	// Without steering no connection has a known original destination, so the
	// proxy refuses every one: it is never an open relay.
	return proxy.OriginalDstFunc(func(netip.AddrPort) (netip.AddrPort, bool) { return netip.AddrPort{}, false })
}

// component is one subsystem as the agent sees it.
type component struct {
	name     string
	checks   []string
	enabled  func(*config.Config) bool
	required func(*config.Config) bool
	build    func(buildArgs) (instance, error)
	check    func(ctx context.Context, cfg *config.Config) []health.Result
	// cleanup, when set, removes host state the subsystem may have left behind.
	cleanup func(cfg *config.Config, log *slog.Logger) error
	// validate, when set, adds the subsystem's own rules to config validation.
	validate func(cfg *config.Config) error
}

// adapter turns a subsystem with its own Options into an instance.
type adapter[O any] struct {
	r      runner
	update func(O) error
	opts   func(*config.Config) O
}

func (a adapter[O]) Run(ctx context.Context) error   { return a.r.Run(ctx) }
func (a adapter[O]) Update(cfg *config.Config) error { return a.update(a.opts(cfg)) }

// defaultComponents lists the subsystems in start order: hostprep, uplink, spire,
// steering and proxy, otlp.
func defaultComponents() []component {
	return []component{
		{
			name:     "hostprep",
			checks:   []string{health.Hugepages, health.Modules, health.IOMMU, hostprep.CheckBPFFS},
			enabled:  func(c *config.Config) bool { return c.Hostprep != nil },
			required: func(c *config.Config) bool { return c.Hostprep.Required },
			build: func(b buildArgs) (instance, error) {
				h, err := hostprep.New(hostprepOptions(b.cfg), b.log, b.reg, b.rep)
				return adapter[hostprep.Options]{h, h.Update, hostprepOptions}, err
			},
			check: func(ctx context.Context, c *config.Config) []health.Result {
				return hostprep.Check(ctx, hostprepOptions(c))
			},
		},
		{
			name:     "uplink",
			checks:   []string{health.Uplink},
			enabled:  func(c *config.Config) bool { return c.Uplink != nil },
			required: func(c *config.Config) bool { return c.Uplink.Required },
			build: func(b buildArgs) (instance, error) {
				u, err := netcfg.New(uplinkOptions(b.cfg), b.log, b.reg, b.rep)
				return adapter[netcfg.Options]{u, u.Update, uplinkOptions}, err
			},
			check: func(ctx context.Context, c *config.Config) []health.Result {
				return netcfg.Check(ctx, uplinkOptions(c))
			},
			validate: func(c *config.Config) error { return uplinkOptions(c).Validate() },
		},
		{
			name:     "spire",
			checks:   []string{health.Spire},
			enabled:  func(c *config.Config) bool { return c.Spire != nil },
			required: func(c *config.Config) bool { return c.Spire.Required },
			build: func(b buildArgs) (instance, error) {
				s, err := spire.New(spireOptions(b.cfg), b.log, b.reg, b.rep)
				return adapter[spire.Options]{s, s.Update, spireOptions}, err
			},
			check: func(ctx context.Context, c *config.Config) []health.Result {
				return spire.Check(ctx, spireOptions(c))
			},
			validate: func(c *config.Config) error { return spireOptions(c).Validate() },
		},
		{
			name:     "steering",
			checks:   []string{health.Steering},
			enabled:  func(c *config.Config) bool { return c.Steering != nil },
			required: func(c *config.Config) bool { return c.Steering.Required },
			build: func(b buildArgs) (instance, error) {
				s, err := ebpf.New(steeringOptions(b.cfg), b.log, b.reg, b.rep)
				if err == nil {
					b.wiring.mu.Lock()
					b.wiring.steering = s
					b.wiring.mu.Unlock()
				}
				return adapter[ebpf.Options]{s, s.Update, steeringOptions}, err
			},
			check: func(ctx context.Context, c *config.Config) []health.Result {
				return ebpf.Check(ctx, steeringOptions(c))
			},
			cleanup: func(c *config.Config, _ *slog.Logger) error {
				return ebpf.Cleanup(steeringOptions(c))
			},
		},
		{
			name:     "proxy",
			checks:   []string{health.Proxy},
			enabled:  func(c *config.Config) bool { return c.Proxy != nil },
			required: func(c *config.Config) bool { return c.Proxy.Required },
			build: func(b buildArgs) (instance, error) {
				opts := func(c *config.Config) proxy.Options { return proxyOptions(c, b.wiring) }
				p, err := proxy.New(opts(b.cfg), b.log, b.reg, b.rep)
				return adapter[proxy.Options]{p, p.Update, opts}, err
			},
			check: func(ctx context.Context, c *config.Config) []health.Result {
				return proxy.Check(ctx, proxyOptions(c, &wiring{}))
			},
			validate: func(c *config.Config) error { return proxyOptions(c, &wiring{}).Validate() },
		},
		{
			name:     "otlp",
			checks:   []string{health.OTLP},
			enabled:  func(c *config.Config) bool { return c.OTLP != nil },
			required: func(c *config.Config) bool { return c.OTLP.Required },
			build: func(b buildArgs) (instance, error) {
				opts := func(c *config.Config) collector.Options { return otlpOptions(c, b.wiring) }
				r, err := collector.New(opts(b.cfg), b.log, b.reg, b.rep)
				return adapter[collector.Options]{r, r.Update, opts}, err
			},
			check: func(ctx context.Context, c *config.Config) []health.Result {
				return collector.Check(ctx, otlpOptions(c, &wiring{ctx: ctx, log: slog.Default()}))
			},
			validate: func(c *config.Config) error { return otlpOptions(c, &wiring{}).Validate() },
		},
	}
}

func hostprepOptions(c *config.Config) hostprep.Options {
	h := c.Hostprep
	o := hostprep.Options{
		Mode:     hostprep.Mode(h.Mode),
		HostRoot: c.HostRoot,
		Hugepages: hostprep.Hugepages{
			Count:       h.Hugepages.Count,
			AllowShrink: h.Hugepages.AllowShrink,
			SysctlFile:  h.Hugepages.SysctlFile,
		},
		Modules:      h.Modules,
		ModulesFile:  h.ModulesFile,
		AllowNoIOMMU: h.AllowNoIOMMU,
		BPFFS:        h.BPFFS,
	}
	if c.Uplink != nil {
		o.UplinkInterface = c.Uplink.Interface
	}
	return o
}

func uplinkOptions(c *config.Config) netcfg.Options {
	o := netcfg.Options{Interface: c.Uplink.Interface, MinMTU: c.Uplink.MinMTU, HostRoot: c.HostRoot}
	if ip, err := netip.ParseAddr(c.NodeIP); err == nil {
		o.NodeIP = ip
	}
	return o
}

func spireOptions(c *config.Config) spire.Options {
	return spire.Options{
		HostRoot: c.HostRoot, Socket: c.Spire.Socket, ExposeAt: c.Spire.ExposeAt,
		// When the exporter authenticates with the node's SVID, "serving, but no
		// identity for us" is a failure, not a pass.
		RequireIdentity: c.OTLP != nil && c.OTLP.Exporter.Spiffe.ServerID != "",
	}
}

func steeringOptions(c *config.Config) ebpf.Options {
	s := c.Steering
	o := ebpf.Options{HostRoot: c.HostRoot, Cgroup: s.Cgroup, BPFFS: s.BPFFS, KeepOnExit: s.KeepOnExit}
	if ap, err := netip.ParseAddrPort(s.PodRedirect); err == nil {
		o.PodRedirect = ap
	}
	if c.Proxy != nil {
		for _, l := range c.Proxy.Listen {
			ap, err := netip.ParseAddrPort(l)
			if err != nil || !ap.Addr().IsLoopback() {
				continue
			}
			if ap.Addr().Is4() && !o.ProxyAddr4.IsValid() {
				o.ProxyAddr4 = ap
			} else if ap.Addr().Is6() && !o.ProxyAddr6.IsValid() {
				o.ProxyAddr6 = ap
			}
		}
		for _, k := range slices.Sorted(maps.Keys(c.Proxy.AddressMap)) {
			if ic, err := ebpf.ParseIntercept(k); err == nil {
				o.Intercepts = append(o.Intercepts, ic)
			}
		}
	}
	return o
}

func proxyOptions(c *config.Config, w *wiring) proxy.Options {
	p := c.Proxy
	o := proxy.Options{
		ConnectTimeout:        p.ConnectTimeout.D(),
		IdleTimeout:           p.IdleTimeout.D(),
		MaxConnectionDuration: p.MaxConnectionDuration.D(),
		MaxConnectAttempts:    p.MaxConnectAttempts,
		DrainTimeout:          p.DrainTimeout.D(),
		ShutdownGrace:         c.ShutdownGrace.D(),
		AddressMap:            p.AddressMap,
		Clusters:              map[string]proxy.Cluster{},
		AccessLog:             p.AccessLog,
		OriginalDst:           w.originalDst(),
		// The proxy's own upstream sockets carry the mark the steering programs skip,
		// so a target inside the steered cgroup is never steered back to the proxy.
		DialControl: ebpf.UpstreamControl,
		Listeners:   w.listeners[ListenerProxy],
	}
	for _, l := range p.Listen {
		if ap, err := netip.ParseAddrPort(l); err == nil {
			o.Listen = append(o.Listen, ap)
		}
	}
	for name, cl := range p.Clusters {
		o.Clusters[name] = proxy.Cluster{Endpoints: cl.Endpoints, LBPolicy: proxy.LBPolicy(cl.LBPolicy)}
	}
	return o
}

func otlpOptions(c *config.Config, w *wiring) collector.Options {
	o := c.OTLP
	opts := collector.Options{
		Exporter: collector.Exporter{
			Endpoint:    o.Exporter.Endpoint,
			Protocol:    o.Exporter.Protocol,
			Path:        o.Exporter.Path,
			Insecure:    o.Exporter.Insecure,
			CAFile:      o.Exporter.CAFile,
			CertFile:    o.Exporter.CertFile,
			KeyFile:     o.Exporter.KeyFile,
			Headers:     o.Exporter.Headers,
			Timeout:     o.Exporter.Timeout.D(),
			Compression: o.Exporter.Compression,
		},
		ResourceAttributes: o.ResourceAttributes,
		MaxRequestSize:     int64(o.MaxRequestSize),
		Batch:              collector.Batch{MaxSpans: o.Batch.MaxSpans, MaxBytes: int64(o.Batch.MaxBytes), Timeout: o.Batch.Timeout.D()},
		Queue: collector.Queue{
			Dir: o.Queue.Dir, MaxBytes: int64(o.Queue.MaxBytes), Consumers: o.Queue.Consumers,
			Fsync: queue.Fsync(o.Queue.Fsync),
		},
		Retry:                 collector.Retry{InitialInterval: o.Retry.InitialInterval.D(), MaxInterval: o.Retry.MaxInterval.D()},
		MemoryLimit:           int64(o.MemoryLimit),
		SetProcessMemoryLimit: true,
		ShutdownGrace:         c.ShutdownGrace.D(),
		Listeners:             map[string]net.Listener{},
	}
	if ap, err := netip.ParseAddrPort(o.GRPCListen); err == nil {
		opts.GRPCListen = ap
	}
	if ap, err := netip.ParseAddrPort(o.HTTPListen); err == nil {
		opts.HTTPListen = ap
	}
	for _, name := range []string{ListenerOTLPGRPC, ListenerOTLPHTTP} {
		if ls := w.listeners[name]; len(ls) > 0 {
			opts.Listeners[name] = ls[0]
		}
	}
	if id := o.Exporter.Spiffe.ServerID; id != "" && c.Spire != nil {
		opts.Exporter.TLSConfig = spiffeTLS(c, id, w)
	}
	return opts
}

// spiffeTLS returns a provider of the mTLS client config that presents the node's
// SVID; it opens the Workload API source on first use and shares it afterwards.
func spiffeTLS(c *config.Config, serverID string, w *wiring) func() (*tls.Config, error) {
	var once sync.Once
	var cfg *tls.Config
	var err error
	socket := filepath.Join(c.HostRoot, c.Spire.Socket)
	return func() (*tls.Config, error) {
		once.Do(func() {
			id, perr := spiffeid.FromString(serverID)
			if perr != nil {
				err = fmt.Errorf("otlp.exporter.spiffe.server_id: %w", perr)
				return
			}
			ctx, log := w.ctx, w.log
			if ctx == nil {
				ctx = context.Background()
			}
			if log == nil {
				log = slog.Default()
			}
			cfg, err = spire.MTLSClientConfig(ctx, socket, id, log)
		})
		return cfg, err
	}
}
