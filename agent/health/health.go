// Package health holds the small vocabulary every subsystem uses to say how it is:
// a Result per named check, pushed to a Reporter when it changes.
package health

import (
	"errors"
	"sync"
	"time"
)

// Check names, as the operator sees them in /status and `nodeagent check`.
const (
	Hugepages = "hugepages"
	Modules   = "modules"
	IOMMU     = "iommu"
	Uplink    = "uplink"
	Spire     = "spire"
	Steering  = "steering"
	Proxy     = "proxy"
	OTLP      = "otlp"
)

// Result is one check's verdict at one moment.
type Result struct {
	Name   string
	OK     bool
	Detail string
}

// Reporter receives results as a subsystem observes them. Reporting the same result
// again is cheap and harmless; the receiver keeps the time of the last change.
type Reporter interface {
	Report(Result)
}

// ReporterFunc adapts a function to Reporter.
type ReporterFunc func(Result)

// Report calls f(r).
func (f ReporterFunc) Report(r Result) { f(r) }

// Discard is a Reporter that drops everything.
var Discard Reporter = ReporterFunc(func(Result) {})

// ErrNeedsRestart is returned by a subsystem's Update when the new options cannot be
// applied live; the agent then restarts that subsystem's Run with them.
var ErrNeedsRestart = errors.New("change needs a restart of the subsystem")

// Recorder is a Reporter that remembers every result, for tests.
type Recorder struct {
	mu      sync.Mutex
	last    map[string]Result
	history []Result
	changed chan struct{}
}

// NewRecorder returns an empty Recorder.
func NewRecorder() *Recorder {
	return &Recorder{last: map[string]Result{}, changed: make(chan struct{})}
}

// Report records r.
func (r *Recorder) Report(res Result) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.last[res.Name] = res
	r.history = append(r.history, res)
	close(r.changed)
	r.changed = make(chan struct{})
}

// Last returns the latest result reported for name.
func (r *Recorder) Last(name string) (Result, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	res, ok := r.last[name]
	return res, ok
}

// History returns every result reported so far, in order.
func (r *Recorder) History() []Result {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Result(nil), r.history...)
}

// WaitFor blocks until the latest result for name satisfies cond or timeout passes,
// and returns that latest result and whether cond held.
func (r *Recorder) WaitFor(name string, timeout time.Duration, cond func(Result) bool) (Result, bool) {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		r.mu.Lock()
		res, seen := r.last[name]
		ch := r.changed
		r.mu.Unlock()
		if seen && cond(res) {
			return res, true
		}
		select {
		case <-ch:
		case <-deadline.C:
			return res, false
		}
	}
}
