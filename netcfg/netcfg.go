// Package netcfg checks the uplink interface that Calico-VPP takes over
// (vpp_dataplane_interface): present, administratively and operationally up with
// carrier, MTU, global and node addresses, default route, PCI device, driver, NUMA
// node and queues — and, once VPP has taken the NIC over, the tap that replaces it.
//
// The check is watched, not polled: netlink link, address and route subscriptions
// trigger a re-evaluation (debounced by 75 ms, so always well within a second
// of the change). A dump the kernel flags as interrupted is redone; a subscription
// whose socket fails (for example ENOBUFS after an event storm) is re-established with
// backoff, and its initial dump re-reads everything that may have been missed.
// vpp-manager's info file is watched with inotify. Only sysfs driver binding, which
// has no event a container can watch, is re-read on a timer, and only while the
// verdict depends on it.
package netcfg

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/nodeagent/nodeagent/agent/health"
)

// Defaults for zero Options fields.
const (
	DefaultInterface = "eth1"
	DefaultMinMTU    = 1500
)

const (
	// debounceDelay gathers a burst of netlink events into one re-evaluation. The
	// delay runs from the first event of a burst and is not extended by later ones,
	// so a change is reflected within debounceDelay plus one evaluation.
	debounceDelay = 75 * time.Millisecond
	// While the verdict depends on sysfs driver binding (no event source), it is
	// re-read after minWaitingResync, then less and less often up to
	// maxWaitingResync; any netlink event starts again from the minimum, since a NIC
	// leaving netlink is bound to vfio-pci only just after.
	minWaitingResync = time.Second
	maxWaitingResync = time.Minute
	// interruptedResync re-lists soon when a dump stayed interrupted after retries.
	interruptedResync = 200 * time.Millisecond
	// netlinkTimeout bounds each netlink request of a re-evaluation.
	netlinkTimeout = 5 * time.Second

	minBackoff = 100 * time.Millisecond
	maxBackoff = 10 * time.Second
	// stableSubscription is how long a subscription must have lasted for its
	// resubscribe backoff to start again from minBackoff.
	stableSubscription = 30 * time.Second
)

// Options configures the uplink check (config section `uplink`, plus `host_root` and
// the node address).
type Options struct {
	// Interface is the uplink Calico-VPP takes over (uplink.interface, Calico-VPP's
	// vpp_dataplane_interface). Default "eth1".
	Interface string
	// MinMTU is the smallest acceptable MTU in bytes (uplink.min_mtu). Default 1500.
	MinMTU int
	// NodeIP is the Kubernetes node address (NODE_IP). When valid, the uplink must
	// carry it; the zero Addr means unknown, and any global address will do.
	NodeIP netip.Addr
	// HostRoot is the host's / as this process sees it (host_root, default "/"):
	// /sys/class/net, /sys/bus/pci and /var/run/vpp/vppmanagerinfofile are read under it.
	HostRoot string
	// NetnsPath is the network namespace to watch, as a path such as
	// /run/netns/NAME or /proc/PID/ns/net. Empty (the default, and what the daemon
	// uses) means the agent's own namespace, which is the host's in the DaemonSet
	// (hostNetwork). Not a config key: tests point it at a throwaway namespace.
	NetnsPath string
}

// Validate reports every problem with o (after defaults), each naming its config key.
func (o Options) Validate() error {
	o = o.withDefaults()
	var errs []error
	if len(o.Interface) > maxIfNameLen || strings.ContainsAny(o.Interface, "/ \t\n:") || o.Interface == "." || o.Interface == ".." {
		errs = append(errs, fmt.Errorf("uplink.interface: %q is not a valid interface name (at most %d characters, no '/', ':' or spaces)", o.Interface, maxIfNameLen))
	}
	if o.MinMTU < minMTU || o.MinMTU > maxMTU {
		errs = append(errs, fmt.Errorf("uplink.min_mtu: %d is outside %d..%d", o.MinMTU, minMTU, maxMTU))
	}
	return errors.Join(errs...)
}

// Interface name and MTU bounds, as the kernel enforces them (IFNAMSIZ-1; IPv4's
// minimum MTU; the largest MTU netlink can express for common links).
const (
	maxIfNameLen = 15
	minMTU       = 68
	maxMTU       = 65535
)

func (o Options) withDefaults() Options {
	if o.Interface == "" {
		o.Interface = DefaultInterface
	}
	if o.MinMTU == 0 {
		o.MinMTU = DefaultMinMTU
	}
	if o.HostRoot == "" {
		o.HostRoot = "/"
	}
	return o
}

// Uplink watches the uplink interface and reports the health.Uplink check.
type Uplink struct {
	log  *slog.Logger
	rep  health.Reporter
	subs []subscription

	upGauge  prometheus.Gauge
	mtuGauge prometheus.Gauge
	changes  prometheus.Counter

	rcvBuf       int           // subscription socket receive buffer, bytes
	kick         chan struct{} // buffered(1): "re-evaluate soon"
	evaluations  atomic.Int64  // snapshots taken by Run, for tests of the debounce
	resubscribes atomic.Int64  // subscriptions re-established after their socket failed

	mu      sync.Mutex
	opts    Options
	last    *health.Result // latest result, kept across runs so a restart logs no false change
	lastPCI string         // the uplink's PCI address when last seen as a NIC
	numa    int
	numaOK  bool
}

// New returns an Uplink for opts and registers its metrics on reg. It does no I/O.
func New(opts Options, log *slog.Logger, reg prometheus.Registerer, rep health.Reporter) (*Uplink, error) {
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	u := &Uplink{
		log:    log,
		rep:    rep,
		subs:   netlinkSubscriptions,
		rcvBuf: defaultReceiveBuffer,
		opts:   opts.withDefaults(),
		kick:   make(chan struct{}, 1),
		upGauge: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "nodeagent_uplink_up",
			Help: "1 when the uplink check passes (the interface is usable, or taken over by a ready VPP), else 0.",
		}),
		mtuGauge: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "nodeagent_uplink_mtu_bytes",
			Help: "MTU of the uplink interface in the host namespace; 0 when it is absent.",
		}),
		changes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "nodeagent_uplink_changes_total",
			Help: "Times the uplink check's verdict or detail changed.",
		}),
	}
	for _, c := range []prometheus.Collector{u.upGauge, u.mtuGauge, u.changes} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("register uplink metrics: %w", err)
		}
	}
	return u, nil
}

// Update applies new options live: the next evaluation, triggered now, uses them.
// Invalid options are refused and the old ones kept.
// A different NetnsPath or HostRoot needs new subscriptions or file watches and returns
// health.ErrNeedsRestart (the new options are kept for the restarted Run).
func (u *Uplink) Update(opts Options) error {
	if err := opts.Validate(); err != nil {
		return err
	}
	opts = opts.withDefaults()
	u.mu.Lock()
	restart := opts.NetnsPath != u.opts.NetnsPath || opts.HostRoot != u.opts.HostRoot
	if opts.Interface != u.opts.Interface {
		u.lastPCI, u.numa, u.numaOK = "", 0, false // they described the old interface
	}
	u.opts = opts
	u.mu.Unlock()
	u.trigger()
	if restart {
		return health.ErrNeedsRestart
	}
	return nil
}

// NUMANode returns the NUMA node of the uplink's NIC as last seen, and false when it is
// unknown (not seen yet, virtual, taken over, or no NUMA information).
func (u *Uplink) NUMANode() (int, bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.numa, u.numaOK
}

func (u *Uplink) options() Options {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.opts
}

func (u *Uplink) trigger() {
	select {
	case u.kick <- struct{}{}:
	default:
	}
}

// Run watches the uplink until ctx is done, reporting the check once at start and on
// every change. It returns an error when the namespace cannot be opened or watched.
func (u *Uplink) Run(ctx context.Context) error {
	opts := u.options()
	ns, closeNS, err := openNetns(opts.NetnsPath)
	if err != nil {
		return err
	}
	defer closeNS()
	h, err := newHandle(ns)
	if err != nil {
		return err
	}
	defer h.Close()

	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer wg.Wait() // runs after cancel below: the watchers see ctx done and drain
	defer cancel()

	for _, sub := range u.subs {
		w := &watcher{u: u, sub: sub, ns: ns}
		ch, err := sub.subscribe(w.params(ctx))
		if err != nil {
			if ctx.Err() != nil {
				return nil // cancelled while subscribing: the socket was closed under us
			}
			return fmt.Errorf("subscribe to %s updates: %w", sub.name, err)
		}
		wg.Go(func() { w.run(ctx, ch) })
	}

	wg.Go(func() {
		if err := watchVPPDir(ctx, opts.HostRoot, u.trigger); err != nil {
			u.log.Warn("watch vpp-manager's info file; re-reading it periodically instead", "error", err)
		}
	})

	var debounce, resync <-chan time.Time
	waitingDelay := minWaitingResync
	first := true // report once at start even if unchanged since a previous Run
	evaluateNow := func() error {
		v, interrupted, err := u.evaluate(h, first)
		first = false
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		switch {
		case interrupted:
			resync = time.After(interruptedResync)
		case v.waiting:
			resync = time.After(waitingDelay)
			waitingDelay = min(2*waitingDelay, maxWaitingResync)
		default:
			resync = nil
		}
		return nil
	}
	if err := evaluateNow(); err != nil {
		return err
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-u.kick:
			waitingDelay = minWaitingResync
			if debounce == nil {
				debounce = time.After(debounceDelay)
			}
		case <-debounce:
			debounce = nil
			if err := evaluateNow(); err != nil {
				return err
			}
		case <-resync:
			if err := evaluateNow(); err != nil {
				return err
			}
		}
	}
}

// evaluate takes a snapshot, judges it, and publishes the verdict: metrics always,
// the result and a log line when it changed.
func (u *Uplink) evaluate(h *netlink.Handle, report bool) (verdict, bool, error) {
	opts := u.options()
	u.evaluations.Add(1)
	s, err := takeSnapshot(h, opts.Interface, opts.NodeIP)
	if err != nil {
		err = fmt.Errorf("read uplink %s state: %w", opts.Interface, err)
		u.publish(verdict{result: health.Result{Name: health.Uplink, Detail: err.Error()}}, report)
		return verdict{}, false, err
	}
	u.mu.Lock()
	remembered := u.lastPCI
	u.mu.Unlock()
	v := evaluate(opts, s, remembered)
	u.publish(v, report)
	return v, s.interrupted, nil
}

// publish sets the metrics and, when the result changed (or report is set), reports
// it; a change is logged once and counted.
func (u *Uplink) publish(v verdict, report bool) {
	if v.up {
		u.upGauge.Set(1)
	} else {
		u.upGauge.Set(0)
	}
	u.mtuGauge.Set(float64(v.mtu))

	u.mu.Lock()
	prev := u.last
	changed := prev == nil || *prev != v.result
	res := v.result
	u.last = &res
	if v.mtu > 0 && v.pci != "" {
		u.lastPCI = v.pci
	}
	u.numa, u.numaOK = v.numa, v.numaOK
	u.mu.Unlock()

	if changed {
		if prev != nil {
			u.changes.Inc()
		}
		level := slog.LevelInfo
		if !v.result.OK {
			level = slog.LevelWarn
		}
		u.log.Log(context.Background(), level, "uplink check", "ok", v.result.OK, "detail", v.result.Detail)
	}
	if changed || report {
		u.rep.Report(v.result)
	}
}

// Check evaluates the uplink once, for `nodeagent check`. It only reads: netlink
// dumps, sysfs and vpp-manager's info file.
func Check(ctx context.Context, opts Options) []health.Result {
	opts = opts.withDefaults()
	fail := func(err error) []health.Result {
		return []health.Result{{Name: health.Uplink, Detail: err.Error()}}
	}
	if err := ctx.Err(); err != nil {
		return fail(fmt.Errorf("check uplink %s: %w", opts.Interface, err))
	}
	ns, closeNS, err := openNetns(opts.NetnsPath)
	if err != nil {
		return fail(err)
	}
	defer closeNS()
	h, err := newHandle(ns)
	if err != nil {
		return fail(err)
	}
	defer h.Close()
	s, err := takeSnapshot(h, opts.Interface, opts.NodeIP)
	if err != nil {
		return fail(fmt.Errorf("read uplink %s state: %w", opts.Interface, err))
	}
	return []health.Result{evaluate(opts, s, "").result}
}

// openNetns opens the namespace at path, or returns netns.None() (the current
// namespace) for an empty path.
func openNetns(path string) (netns.NsHandle, func(), error) {
	if path == "" {
		return netns.None(), func() {}, nil
	}
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return netns.None(), nil, fmt.Errorf("open network namespace %s: %w", path, err)
	}
	return ns, func() { ns.Close() }, nil
}

func newHandle(ns netns.NsHandle) (*netlink.Handle, error) {
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return nil, fmt.Errorf("open netlink handle: %w", err)
	}
	if err := h.SetSocketTimeout(netlinkTimeout); err != nil {
		h.Close()
		return nil, fmt.Errorf("set netlink socket timeout: %w", err)
	}
	return h, nil
}

// errSubscriptionClosed is logged when a subscription ends without a reported error.
var errSubscriptionClosed = errors.New("subscription closed")
