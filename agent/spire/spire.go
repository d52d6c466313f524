// Package spire makes the SPIRE agent's Workload API socket available to the node's
// workloads and verifies, with go-spiffe's Workload API client, that it really serves
// identities.
//
// Three jobs:
//
//   - Expose: the socket's directory exists (mode 0755, traversable by non-root
//     workloads) before the SPIRE agent starts and is kept across its restarts, so
//     hostPath mounts of it stay valid. With ExposeAt the same socket is published at a
//     second path (see expose.go) — by the file system, never by relaying bytes.
//   - Verify: the directory is watched with inotify (the socket appears, disappears, is
//     re-created) and a Workload API watch (FetchX509SVID stream) tells whether the agent
//     serves: an X.509 context, or PermissionDenied ("no identity issued"), which proves
//     the agent serves just as `spire-agent healthcheck` treats it. Anything else fails.
//     With an identity, the SVID's expiry is followed across rotations.
//   - Use: MTLSClientConfig (and MTLSConfigFunc, its provider form) builds a go-spiffe
//     mTLS client config on an X509Source of the same socket, for the OTLP exporter.
package spire

import (
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/nodeagent/nodeagent/agent/health"
)

// DefaultSocket is where the SPIRE agent DaemonSet commonly puts its socket.
const DefaultSocket = "/run/spire/agent-sockets/api.sock"

// Options configure the spire subsystem (config section `spire`).
type Options struct {
	// HostRoot is the host's / as this process sees it (`host_root`; "/" on bare
	// metal, "/host" in the DaemonSet). Socket and ExposeAt are host paths below it.
	HostRoot string
	// Socket is the SPIRE agent's Workload API socket as a host path
	// (`spire.socket`; default DefaultSocket).
	Socket string
	// ExposeAt is an optional second host path at which connecting reaches the same
	// socket (`spire.expose_at`; default "": none). In the socket's directory it is a
	// relative symlink; in another directory that directory becomes a bind mount of the
	// socket's (needs CAP_SYS_ADMIN and Linux 5.8). See expose.go for why.
	ExposeAt string
	// RequireIdentity makes "serving, no identity issued" a failure instead of a pass
	// (no config key; the agent sets it when otlp.exporter.spiffe needs the node's
	// SVID). Default false: PermissionDenied proves the agent serves.
	RequireIdentity bool
	// ExpiryMargin fails the check when the SVID expires within this duration without
	// having been rotated. 0 (the default; no config key) means a sixth of the SVID's
	// lifetime (10 minutes before a 1h SVID expires, 4h40m before a 28h one): SPIRE
	// rotates X509-SVIDs once half their lifetime has passed, so an SVID in its last
	// sixth has missed rotation for a third of its life — late enough to rule out
	// ordinary rotation jitter, early enough to act before connections fail.
	ExpiryMargin time.Duration
	// Resync is how often the directory, the exposure and the SVID expiry are checked
	// again besides inotify events and Workload API updates (default 10s).
	Resync time.Duration
}

func (o Options) withDefaults() Options {
	if o.HostRoot == "" {
		o.HostRoot = "/"
	}
	if o.Socket == "" {
		o.Socket = DefaultSocket
	}
	if o.Resync <= 0 {
		o.Resync = 10 * time.Second
	}
	return o
}

// Validate reports options the subsystem cannot work with, naming the config keys.
func (o Options) Validate() error {
	o = o.withDefaults()
	var errs []error
	if !filepath.IsAbs(o.Socket) {
		errs = append(errs, fmt.Errorf("spire.socket: %q is not an absolute path", o.Socket))
	} else if filepath.Dir(filepath.Clean(o.Socket)) == "/" {
		errs = append(errs, fmt.Errorf("spire.socket: %q must be in a directory of its own, not /", o.Socket))
	}
	if o.ExposeAt != "" {
		if !filepath.IsAbs(o.ExposeAt) {
			errs = append(errs, fmt.Errorf("spire.expose_at: %q is not an absolute path", o.ExposeAt))
		} else if err := checkExposePaths(filepath.Clean(o.Socket), filepath.Clean(o.ExposeAt)); err != nil {
			errs = append(errs, fmt.Errorf("spire.expose_at: %w", err))
		}
	}
	if o.ExpiryMargin < 0 {
		errs = append(errs, fmt.Errorf("spire.expiry_margin: %s is negative", o.ExpiryMargin))
	}
	return errors.Join(errs...)
}

// hostPath maps a host path to the path this process uses.
func (o Options) hostPath(p string) string { return filepath.Join(o.HostRoot, p) }

// Spire is the spire subsystem.
type Spire struct {
	log *slog.Logger
	rep health.Reporter
	m   *metrics

	mu      sync.Mutex
	opts    Options
	retired []Options // exposures of options replaced by Update, removed at the next Run
}

// New returns the subsystem; it does no I/O and registers its metrics on reg.
func New(opts Options, log *slog.Logger, reg prometheus.Registerer, rep health.Reporter) (*Spire, error) {
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	m, err := newMetrics(reg)
	if err != nil {
		return nil, err
	}
	return &Spire{log: log, rep: rep, m: m, opts: opts.withDefaults()}, nil
}

// Update applies new options: the expiry margin and resync interval live; a change of
// host root, socket or expose path needs Run to restart (health.ErrNeedsRestart).
func (s *Spire) Update(opts Options) error {
	if err := opts.Validate(); err != nil {
		return err
	}
	opts = opts.withDefaults()
	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.opts
	s.opts = opts
	if old.HostRoot != opts.HostRoot || old.Socket != opts.Socket || old.ExposeAt != opts.ExposeAt {
		if old.ExposeAt != "" {
			s.retired = append(s.retired, old)
		}
		return health.ErrNeedsRestart
	}
	return nil
}

// takeRetired returns and forgets the options whose exposure must be removed.
func (s *Spire) takeRetired() []Options {
	s.mu.Lock()
	defer s.mu.Unlock()
	r := s.retired
	s.retired = nil
	return r
}

func (s *Spire) options() Options {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.opts
}

type metrics struct {
	socketUp  prometheus.Gauge
	expiry    prometheus.Gauge
	rotations prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		socketUp: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "nodeagent_spire_socket_up",
			Help: "1 while the SPIRE agent's Workload API socket is present and serving (with or without an identity for nodeagent), else 0.",
		}),
		expiry: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "nodeagent_spire_svid_expiry_timestamp_seconds",
			Help: "Expiry (Unix time) of nodeagent's current X509-SVID from the Workload API; 0 without one.",
		}),
		rotations: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "nodeagent_spire_svid_rotations_total",
			Help: "Times the Workload API delivered a different default X509-SVID than the one held.",
		}),
	}
	for _, c := range []prometheus.Collector{m.socketUp, m.expiry, m.rotations} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("register spire metrics: %w", err)
		}
	}
	return m, nil
}
