package agent

import (
	"context"
	"log/slog"
	"net"
	"runtime"

	"github.com/nodeagent/nodeagent/agent/config"
	"github.com/nodeagent/nodeagent/agent/health"
	"github.com/prometheus/client_golang/prometheus"
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
	listeners map[string][]net.Listener
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
}

// defaultComponents lists the subsystems in start order: hostprep, uplink, spire,
// steering and proxy, otlp.
func defaultComponents() []component {
	return nil
}

func goVersion() string { return runtime.Version() }
