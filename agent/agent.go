// Package agent runs nodeagent's subsystems under one supervisor, serves the health
// endpoint, speaks to systemd, and applies configuration reloads.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"runtime"
	"sync"
	"time"

	"github.com/nodeagent/nodeagent/agent/config"
	"github.com/nodeagent/nodeagent/agent/health"
	"github.com/nodeagent/nodeagent/agent/reuseport"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Agent is the daemon: the subsystems, their supervisor, the health server.
type Agent struct {
	cfg        *config.Config
	log        *slog.Logger
	level      *slog.LevelVar
	reg        *prometheus.Registry
	status     *Status
	components []component

	// Socket-activated listeners by name; nil means "ask systemd".
	listeners map[string][]net.Listener

	// startGate bounds how long a subsystem's first results are awaited before the
	// next subsystem in the start order is started.
	startGate time.Duration
	// minBackoff and maxBackoff bound the wait before a failed subsystem runs again.
	minBackoff, maxBackoff time.Duration

	mu      sync.Mutex
	running map[string]*instanceState // by component name
	wiring  *wiring

	reloads  *prometheus.CounterVec
	reloadOK prometheus.Gauge
	restarts *prometheus.CounterVec
}

type instanceState struct {
	inst instance
	sup  *supervised
	reg  *trackingRegisterer
}

// New returns an agent for cfg. level is the logger's level, changed on reload. It
// does no I/O.
func New(cfg *config.Config, log *slog.Logger, level *slog.LevelVar) *Agent {
	reg := prometheus.NewRegistry()
	a := &Agent{
		cfg:        cfg,
		log:        log,
		level:      level,
		reg:        reg,
		status:     NewStatus(cfg.NodeName, reg),
		components: defaultComponents(),
		startGate:  5 * time.Second,
		minBackoff: time.Second,
		maxBackoff: 30 * time.Second,
		running:    map[string]*instanceState{},
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "nodeagent_config_reloads_total",
			Help: "Configuration reloads (SIGHUP), by result.",
		}, []string{"result"}),
		reloadOK: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "nodeagent_config_last_reload_successful",
			Help: "1 when the last configuration reload succeeded (or none was tried), 0 when it failed and the previous configuration is still running.",
		}),
		restarts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "nodeagent_subsystem_restarts_total",
			Help: "Times a subsystem failed or panicked and was restarted.",
		}, []string{"subsystem"}),
	}
	a.reloads.WithLabelValues("success")
	a.reloads.WithLabelValues("failure")
	a.reloadOK.Set(1)
	buildInfo := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "nodeagent_build_info",
		Help: "Always 1; the labels say which build is running.",
	}, []string{"version", "goversion"})
	buildInfo.WithLabelValues(Version(), runtime.Version()).Set(1)
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		buildInfo, a.reloads, a.reloadOK, a.restarts,
	)
	for _, c := range a.components {
		a.restarts.WithLabelValues(c.name)
	}
	return a
}

// Run serves until ctx is cancelled: it binds the health listener first (an error
// there is returned at once), starts the subsystems in order, applies a reload on
// every receive from reload, and on cancellation turns unready, stops everything in
// reverse order within shutdown_grace and returns.
func (a *Agent) Run(ctx context.Context, reload <-chan struct{}) error {
	if a.listeners == nil {
		ls, err := systemdListeners()
		if err != nil {
			return err
		}
		a.listeners = ls
	}
	healthLn, err := a.listener(ListenerHealth, a.cfg.Health.Listen)
	if err != nil {
		return fmt.Errorf("health endpoint: %w", err)
	}
	allow := parsePrefixes(a.cfg.Health.AllowFrom)
	srv := newHealthServer(a.status, a.reg, allow)
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(healthLn) }()
	a.log.Info("nodeagent starting", "version", Version(), "node", a.cfg.NodeName, "config", a.cfg.File, "health", healthLn.Addr().String())
	a.status.SetConfig(ConfigStatus{File: a.cfg.File, LoadedAt: time.Now().UTC()})

	notify := newNotifier(a.log)
	var watchdog <-chan time.Time
	if notify.watchdog > 0 {
		t := time.NewTicker(notify.watchdog / 2)
		defer t.Stop()
		watchdog = t.C
		notify.alive()
	}

	subCtx, cancelSubs := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelSubs()
	a.wiring = &wiring{ctx: subCtx, listeners: a.listeners, log: a.log}
	a.startEnabled(ctx, subCtx, a.cfg)
	a.status.SetStarted()

	for {
		notify.update(a.status.Snapshot())
		changed := a.status.Changed()
		select {
		case <-ctx.Done():
			return a.shutdown(srv, notify)
		case err := <-serveErr:
			return errors.Join(fmt.Errorf("health server: %w", err), a.shutdown(srv, notify))
		case <-reload:
			notify.reloading()
			a.reload(subCtx)
			notify.reloaded()
		case <-watchdog:
			// Sent from this loop only, so a wedged supervisor stops feeding the
			// watchdog and systemd restarts the agent.
			notify.alive()
		case <-changed:
		}
	}
}

// releaseAllowance is how long subsystems may take, after shutdown_grace, to give
// back host state: the proxy and the relay drain for all of shutdown_grace, and the
// subsystems stopped after them (steering detaching and unpinning its programs) must
// still get to finish. Unit files and the DaemonSet's termination grace period allow
// for shutdown_grace plus this.
const releaseAllowance = 3 * time.Second

func stopBudget(cfg *config.Config) time.Duration { return cfg.ShutdownGrace.D() + releaseAllowance }

func (a *Agent) shutdown(srv *http.Server, notify *notifier) error {
	a.log.Info("stopping: readiness off, draining", "grace", a.cfg.ShutdownGrace.D())
	a.status.SetStopping()
	notify.stopping()
	notify.update(a.status.Snapshot())
	ctx, cancel := context.WithTimeout(context.Background(), stopBudget(a.cfg))
	defer cancel()
	a.mu.Lock()
	var subs []*supervised
	for _, c := range a.components {
		if st := a.running[c.name]; st != nil {
			subs = append(subs, st.sup)
		}
	}
	a.mu.Unlock()
	err := stopAll(ctx, subs)
	if err != nil {
		a.log.Error("drain incomplete at the end of the grace period", "error", err)
	}
	_ = srv.Shutdown(ctx)
	a.log.Info("stopped")
	return err
}

// startEnabled starts every enabled component in start order, giving each up to
// startGate to report before the next starts (hostprep mounts bpffs before steering
// needs it, the proxy's upstream marks come from steering, and so on).
func (a *Agent) startEnabled(ctx, subCtx context.Context, cfg *config.Config) {
	for _, c := range a.components {
		if !c.enabled(cfg) {
			continue
		}
		if err := a.startComponent(subCtx, c, cfg); err != nil {
			a.log.Error("subsystem not started", "subsystem", c.name, "error", err)
			continue
		}
		a.awaitFirstResults(ctx, c)
	}
}

func (a *Agent) startComponent(ctx context.Context, c component, cfg *config.Config) error {
	required := c.required(cfg)
	for _, name := range c.checks {
		a.status.Expect(name, required)
	}
	treg := &trackingRegisterer{reg: a.reg}
	inst, err := c.build(buildArgs{
		cfg:    cfg,
		log:    a.log.With("subsystem", c.name),
		reg:    treg,
		rep:    a.status,
		wiring: a.wiring,
	})
	if err != nil {
		treg.unregisterAll()
		for _, name := range c.checks {
			a.status.Report(health.Result{Name: name, Detail: fmt.Sprintf("%s not started: %v", c.name, err)})
		}
		return err
	}
	sup := &supervised{
		name: c.name, checks: c.checks, r: inst, rep: a.status,
		log: a.log, restarts: a.restarts,
		minBackoff: a.minBackoff, maxBackoff: a.maxBackoff, resetAfter: time.Minute,
	}
	sup.start(ctx)
	a.mu.Lock()
	a.running[c.name] = &instanceState{inst: inst, sup: sup, reg: treg}
	a.mu.Unlock()
	return nil
}

func (a *Agent) awaitFirstResults(ctx context.Context, c component) {
	deadline := time.After(a.startGate)
	for {
		pending := false
		doc := a.status.Snapshot()
		for _, cs := range doc.Checks {
			for _, name := range c.checks {
				if cs.Name == name && cs.Detail == "not checked yet" {
					pending = true
				}
			}
		}
		if !pending {
			return
		}
		select {
		case <-a.status.Changed():
		case <-deadline:
			return
		case <-ctx.Done():
			return
		}
	}
}

// reload re-reads the configuration file. A bad file changes nothing: it is logged,
// shown in /status and counted, and the running configuration stays.
func (a *Agent) reload(ctx context.Context) {
	next, err := LoadConfig(a.cfg.File)
	if err != nil {
		a.log.Error("reload failed; keeping the running configuration", "error", err)
		a.reloads.WithLabelValues("failure").Inc()
		a.reloadOK.Set(0)
		a.status.SetConfig(ConfigStatus{File: a.cfg.File, LoadedAt: a.loadedAt(), ReloadError: err.Error()})
		return
	}
	prev := a.cfg
	if next.Health.Listen != prev.Health.Listen || next.Log.Format != prev.Log.Format || next.NodeName != prev.NodeName {
		a.log.Warn("health.listen, log.format and node_name take effect at the next start")
	}
	if lvl, err := config.ParseLevel(next.Log.Level); err == nil {
		a.level.Set(lvl)
	}
	for _, c := range a.components {
		a.mu.Lock()
		st := a.running[c.name]
		a.mu.Unlock()
		on := c.enabled(next)
		switch {
		case st == nil && on:
			if err := a.startComponent(ctx, c, next); err != nil {
				a.log.Error("subsystem not started", "subsystem", c.name, "error", err)
			}
		case st != nil && !on:
			a.stopComponent(c, st)
		case st != nil && on:
			for _, name := range c.checks {
				a.status.Expect(name, c.required(next))
			}
			err := st.inst.Update(next)
			if errors.Is(err, health.ErrNeedsRestart) {
				a.log.Info("restarting subsystem for the new configuration", "subsystem", c.name)
				stopCtx, cancel := context.WithTimeout(context.Background(), stopBudget(next))
				if err := st.sup.stop(stopCtx); err != nil {
					a.log.Error("subsystem slow to stop for restart", "subsystem", c.name, "error", err)
				}
				cancel()
				st.sup.start(ctx)
			} else if err != nil {
				a.log.Error("subsystem rejected the new configuration", "subsystem", c.name, "error", err)
			}
		}
	}
	a.cfg = next
	a.reloads.WithLabelValues("success").Inc()
	a.reloadOK.Set(1)
	a.status.SetConfig(ConfigStatus{File: next.File, LoadedAt: time.Now().UTC()})
	a.log.Info("configuration reloaded", "file", next.File)
}

func (a *Agent) stopComponent(c component, st *instanceState) {
	ctx, cancel := context.WithTimeout(context.Background(), stopBudget(a.cfg))
	defer cancel()
	if err := st.sup.stop(ctx); err != nil {
		a.log.Error("disabled subsystem slow to stop", "subsystem", c.name, "error", err)
	}
	st.reg.unregisterAll()
	for _, name := range c.checks {
		a.status.Forget(name)
	}
	a.mu.Lock()
	delete(a.running, c.name)
	a.mu.Unlock()
	a.log.Info("subsystem disabled", "subsystem", c.name)
}

func (a *Agent) loadedAt() time.Time {
	if doc := a.status.Snapshot(); doc.Config != nil {
		return doc.Config.LoadedAt
	}
	return time.Time{}
}

// listener returns the socket-activated listener of that name, or binds addr with
// SO_REUSEPORT, so that during a rolling update the new agent binds while the old
// one still serves.
func (a *Agent) listener(name, addr string) (net.Listener, error) {
	if ls := a.listeners[name]; len(ls) > 0 {
		return ls[0], nil
	}
	return reuseport.Listen(context.Background(), addr)
}

// LoadConfig reads and validates the configuration file: the file's own rules, then
// each enabled subsystem's. Every error wraps config.ErrInvalid (exit code 2).
func LoadConfig(path string) (*config.Config, error) {
	cfg, err := config.Load(path)
	if err != nil {
		return nil, err
	}
	var errs []error
	for _, c := range defaultComponents() {
		if c.validate != nil && c.enabled(cfg) {
			if err := c.validate(cfg); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("%w: %s: %w", config.ErrInvalid, path, errors.Join(errs...))
	}
	return cfg, nil
}

// Cleanup removes the host state a crashed or stopped agent left behind (pinned
// programs and their cgroup attachments): `nodeagent run --cleanup`, ExecStopPost=.
func Cleanup(cfg *config.Config, log *slog.Logger) error {
	var errs []error
	for _, c := range defaultComponents() {
		if c.cleanup != nil && c.enabled(cfg) {
			if err := c.cleanup(cfg, log); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", c.name, err))
			}
		}
	}
	return errors.Join(errs...)
}

// Check runs every enabled subsystem's checks once and returns the same document as
// /status. It changes nothing on the host.
func Check(ctx context.Context, cfg *config.Config) StatusDoc {
	now := time.Now().UTC()
	doc := StatusDoc{Node: cfg.NodeName, Version: Version(), Ready: true, Checks: []CheckStatus{}}
	for _, c := range defaultComponents() {
		if !c.enabled(cfg) {
			continue
		}
		required := c.required(cfg)
		got := map[string]health.Result{}
		for _, r := range c.check(ctx, cfg) {
			got[r.Name] = r
		}
		for _, name := range c.checks {
			r, ok := got[name]
			if !ok {
				r = health.Result{Name: name, Detail: "no result"}
			}
			doc.Checks = append(doc.Checks, CheckStatus{Name: name, OK: r.OK, Required: required, Detail: r.Detail, Since: now})
			if required && !r.OK {
				doc.Ready = false
			}
		}
	}
	sortChecks(doc.Checks)
	return doc
}

func parsePrefixes(ss []string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		if p, err := netip.ParsePrefix(s); err == nil {
			out = append(out, p.Masked())
		}
	}
	return out
}
