package ebpf

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"reflect"
	"strings"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/nodeagent/nodeagent/agent/health"
)

// Steering runs the steering programs. The proxy asks it for original
// destinations with OriginalDst.
type Steering struct {
	log *slog.Logger
	rep health.Reporter

	// mu guards opts and cur; readers of the maps (OriginalDst, metrics) hold
	// it shared, so the objects are not closed under them.
	mu   sync.RWMutex
	opts Options
	cur  *loaded // nil unless Run has the programs attached

	metrics *collector
	probe   func() error // probeKernel; tests swap it
}

// healthInterval is how often Run re-checks its pins and reports.
const healthInterval = 15 * time.Second

// New returns a Steering for opts. It does no I/O; it registers the steering
// metrics on reg.
func New(opts Options, log *slog.Logger, reg prometheus.Registerer, rep health.Reporter) (*Steering, error) {
	opts = opts.withDefaults()
	if err := opts.validate(); err != nil {
		return nil, err
	}
	s := &Steering{log: log, rep: rep, opts: opts, probe: probeKernel}
	s.metrics = newCollector(s)
	if reg != nil {
		if err := reg.Register(s.metrics); err != nil {
			return nil, fmt.Errorf("register steering metrics: %w", err)
		}
	}
	return s, nil
}

// Run loads and attaches the programs, reports the steering check, and blocks
// until ctx is done. Then, unless Options.KeepOnExit, it detaches and unpins
// everything. When the host cannot steer at all (old kernel, no BPF privilege,
// cgroup v1 only), Run reports the failing check naming what is missing and
// waits for ctx without an error, so the rest of the agent keeps running; other
// failures are returned, to be retried.
func (s *Steering) Run(ctx context.Context) error {
	s.mu.Lock()
	opts := s.opts
	s.mu.Unlock()

	fail := func(err error) error {
		s.rep.Report(health.Result{Name: health.Steering, OK: false, Detail: err.Error()})
		if errors.Is(err, errUnsupported) {
			s.log.Error("steering unavailable", "error", err)
			<-ctx.Done()
			return nil
		}
		return err
	}

	if err := s.probe(); err != nil {
		return fail(err)
	}
	cgroup, err := resolveCgroup(opts.HostRoot, opts.Cgroup)
	if err != nil {
		if errors.Is(err, errNoCgroup2) {
			err = fmt.Errorf("%w: %w", errUnsupported, err)
		}
		return fail(err)
	}
	cookie, err := netnsCookie(opts.HostNetns)
	if err != nil {
		return fail(fmt.Errorf("host netns cookie: %w", err))
	}
	l, err := load(opts, cgroup, s.log)
	if err != nil {
		return fail(err)
	}

	// The maps are written before the programs are attached (or swapped into
	// the links of an earlier run), so they never run with an empty config.
	s.mu.Lock()
	opts = s.opts // Update may have run meanwhile
	err = apply(l, opts, cookie)
	if err == nil {
		err = l.attach(s.log)
	}
	if err == nil {
		s.cur = l
	}
	s.mu.Unlock()
	if err != nil {
		l.close() // pins stay, for the retry to reuse
		return fail(err)
	}
	s.log.Info("steering attached", "cgroup", cgroup, "bpffs", opts.BPFFS, "intercepts", len(opts.Intercepts))

	s.reportHealth(l)
	t := time.NewTicker(healthInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			s.mu.Lock()
			s.cur = nil
			opts = s.opts
			s.metrics.snapshot(l) // keep the last counter values after detaching
			s.mu.Unlock()
			return s.release(l, opts)
		case <-t.C:
			s.reportHealth(l)
		}
	}
}

// release gives back what Run took: detaching and unpinning unless KeepOnExit.
func (s *Steering) release(l *loaded, opts Options) error {
	if opts.KeepOnExit {
		l.close()
		s.log.Info("steering left attached", "bpffs", opts.BPFFS)
		return nil
	}
	if err := l.detach(); err != nil {
		s.log.Error("detach steering", "error", err)
		return fmt.Errorf("detach steering: %w", err)
	}
	s.log.Info("steering detached", "cgroup", l.cgroup)
	s.rep.Report(health.Result{Name: health.Steering, OK: false, Detail: "detached"})
	return nil
}

// apply writes opts into the maps of l: the config, and the intercept map
// updated in place (new keys first, then stale ones removed), so a destination
// mapped before and after is never unsteered.
func apply(l *loaded, opts Options, hostCookie uint64) error {
	cfg := steerConfig{
		HostNetnsCookie: hostCookie,
		SkipMark:        UpstreamMark,
		Enabled:         1,
		Proxy4:          target(opts.ProxyAddr4),
		Proxy6:          target(opts.ProxyAddr6),
		Pod:             target(opts.PodRedirect),
	}
	if err := l.objs.SteerConfig.Put(uint32(0), cfg); err != nil {
		return fmt.Errorf("write steering config: %w", err)
	}
	want := make(map[steerAddrPort]bool, len(opts.Intercepts))
	for _, i := range opts.Intercepts {
		k := interceptKey(i)
		want[k] = true
		if err := l.objs.Intercepts.Put(k, uint32(1)); err != nil {
			return fmt.Errorf("add intercept %s: %w", i, err)
		}
	}
	var stale []steerAddrPort
	var k steerAddrPort
	var v uint32
	it := l.objs.Intercepts.Iterate()
	for it.Next(&k, &v) {
		if !want[k] {
			stale = append(stale, k)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("list intercepts: %w", err)
	}
	for _, k := range stale {
		if err := l.objs.Intercepts.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("remove stale intercept: %w", err)
		}
	}
	return nil
}

// Update applies new options. Intercepts, proxy addresses, PodRedirect and
// KeepOnExit apply live, in place; a new Cgroup, BPFFS, HostNetns or HostRoot
// returns health.ErrNeedsRestart.
func (s *Steering) Update(opts Options) error {
	opts = opts.withDefaults()
	if err := opts.validate(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.opts
	if old.Cgroup != opts.Cgroup || old.BPFFS != opts.BPFFS || old.HostNetns != opts.HostNetns || old.HostRoot != opts.HostRoot {
		s.opts = opts
		return health.ErrNeedsRestart
	}
	if s.cur != nil && !reflect.DeepEqual(old, opts) {
		var cfg steerConfig
		if err := s.cur.objs.SteerConfig.Lookup(uint32(0), &cfg); err != nil {
			return fmt.Errorf("read steering config: %w", err)
		}
		if err := apply(s.cur, opts, cfg.HostNetnsCookie); err != nil {
			return err
		}
		s.log.Info("steering updated", "intercepts", len(opts.Intercepts))
	}
	s.opts = opts
	return nil
}

// OriginalDst returns the destination the client dialled for a connection the
// proxy accepted, given the accepted socket's peer address (the client's
// address and port; IPv4 and IPv4-mapped IPv6 spellings are the same). It is
// found while the client's socket is open; false when the connection was not
// steered, or has closed already. It has the signature of the proxy's
// OriginalDst interface.
func (s *Steering) OriginalDst(client netip.AddrPort) (netip.AddrPort, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	l := s.cur
	if l == nil {
		return netip.AddrPort{}, false
	}
	var o steerOrigDst
	if err := l.objs.OrigByClient.Lookup(clientKey(client), &o); err != nil {
		return netip.AddrPort{}, false
	}
	return origAddr(o), true
}

func (s *Steering) reportHealth(l *loaded) {
	s.rep.Report(status(l))
}

// status describes l: attached programs, map sizes and the cgroup.
func status(l *loaded) health.Result {
	var missing []string
	for i, h := range hooks {
		if i >= len(l.links) {
			missing = append(missing, h.name)
			continue
		}
		info, err := l.links[i].Info()
		if err != nil || info.Cgroup() == nil || info.Cgroup().CgroupId != l.cgroupID {
			missing = append(missing, h.name)
		}
	}
	n := mapEntries(l)
	detail := fmt.Sprintf("%d programs attached to %s; entries: intercepts=%d orig_by_cookie=%d orig_by_client=%d",
		len(hooks)-len(missing), l.cgroup, n["intercepts"], n["orig_by_cookie"], n["orig_by_client"])
	if len(missing) > 0 {
		return health.Result{Name: health.Steering, OK: false, Detail: "not attached: " + strings.Join(missing, ", ") + "; " + detail}
	}
	return health.Result{Name: health.Steering, OK: true, Detail: detail}
}

// mapEntries counts the entries of the maps that grow.
func mapEntries(l *loaded) map[string]int {
	out := map[string]int{}
	for name, m := range map[string]*ebpf.Map{
		"intercepts":     l.objs.Intercepts,
		"orig_by_cookie": l.objs.OrigByCookie,
		"orig_by_client": l.objs.OrigByClient,
	} {
		out[name] = countKeys(m)
	}
	return out
}

func countKeys(m *ebpf.Map) int {
	buf := make([]byte, m.KeySize())
	next := make([]byte, m.KeySize())
	var n int
	var prev any // nil: first key
	// Entries come and go while we walk; a deleted key restarts the walk, so
	// the count is capped at the map's size.
	for n < int(m.MaxEntries()) {
		if err := m.NextKey(prev, next); err != nil {
			return n
		}
		n++
		copy(buf, next)
		prev = buf
	}
	return n
}
