package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"runtime/debug"
	"sync"
	"time"

	"github.com/nodeagent/nodeagent/agent/health"
	"github.com/prometheus/client_golang/prometheus"
)

// runner is what the supervisor runs: a subsystem's Run.
type runner interface {
	Run(ctx context.Context) error
}

// supervised runs one subsystem's Run until it is stopped: a Run that fails or panics
// is reported on the subsystem's checks and started again with backoff, so one broken
// subsystem never takes the process (or the others) down.
type supervised struct {
	name     string
	checks   []string
	r        runner
	rep      health.Reporter
	log      *slog.Logger
	restarts *prometheus.CounterVec

	// Backoff between failed runs; a run that lasted longer than resetAfter starts
	// the backoff over.
	minBackoff, maxBackoff, resetAfter time.Duration

	cancel context.CancelFunc
	done   chan struct{}
}

// start runs the subsystem in its own goroutine under ctx.
func (s *supervised) start(ctx context.Context) {
	ctx, s.cancel = context.WithCancel(ctx)
	s.done = make(chan struct{})
	go func() {
		defer close(s.done)
		s.loop(ctx)
	}()
}

// stop cancels the subsystem and waits for its Run to return, or for ctx.
func (s *supervised) stop(ctx context.Context) error {
	if s.cancel == nil {
		return nil
	}
	s.cancel()
	select {
	case <-s.done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("%s did not stop in time", s.name)
	}
}

func (s *supervised) loop(ctx context.Context) {
	backoff := s.minBackoff
	for {
		started := time.Now()
		err := s.runOnce(ctx)
		if ctx.Err() != nil {
			return
		}
		if err == nil {
			err = errors.New("stopped on its own")
		}
		if time.Since(started) > s.resetAfter {
			backoff = s.minBackoff
		}
		s.restarts.WithLabelValues(s.name).Inc()
		s.log.Error("subsystem failed; restarting", "subsystem", s.name, "error", err, "retry_in", backoff)
		for _, c := range s.checks {
			s.rep.Report(health.Result{Name: c, OK: false, Detail: fmt.Sprintf("%s failed (retrying in %s): %v", s.name, backoff.Round(time.Millisecond), err)})
		}
		// Full jitter around the backoff keeps nodes from retrying in lockstep.
		wait := backoff/2 + rand.N(backoff/2+1)
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		backoff = min(2*backoff, s.maxBackoff)
	}
}

// runOnce calls Run and turns a panic into an error.
func (s *supervised) runOnce(ctx context.Context) (err error) {
	defer func() {
		if p := recover(); p != nil {
			s.log.Error("subsystem panicked", "subsystem", s.name, "panic", fmt.Sprint(p), "stack", string(debug.Stack()))
			err = fmt.Errorf("panic: %v", p)
		}
	}()
	return s.r.Run(ctx)
}

// stopAll stops subsystems in reverse start order, all within ctx.
func stopAll(ctx context.Context, subs []*supervised) error {
	var errs []error
	for i := len(subs) - 1; i >= 0; i-- {
		if err := subs[i].stop(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// trackingRegisterer registers collectors on a registry and can take them all back,
// so that a subsystem disabled and enabled again by reloads registers anew.
type trackingRegisterer struct {
	mu    sync.Mutex
	reg   prometheus.Registerer
	owned []prometheus.Collector
}

func (t *trackingRegisterer) Register(c prometheus.Collector) error {
	if err := t.reg.Register(c); err != nil {
		return err
	}
	t.mu.Lock()
	t.owned = append(t.owned, c)
	t.mu.Unlock()
	return nil
}

func (t *trackingRegisterer) MustRegister(cs ...prometheus.Collector) {
	for _, c := range cs {
		if err := t.Register(c); err != nil {
			panic(err)
		}
	}
}

func (t *trackingRegisterer) Unregister(c prometheus.Collector) bool {
	return t.reg.Unregister(c)
}

func (t *trackingRegisterer) unregisterAll() {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, c := range t.owned {
		t.reg.Unregister(c)
	}
	t.owned = nil
}
