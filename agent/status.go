package agent

import (
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/nodeagent/nodeagent/agent/health"
	"github.com/prometheus/client_golang/prometheus"
)

// CheckStatus is one check as /status and `nodeagent check --output json` show it.
type CheckStatus struct {
	Name     string    `json:"name"`
	OK       bool      `json:"ok"`
	Required bool      `json:"required"`
	Detail   string    `json:"detail"`
	Since    time.Time `json:"since"`
}

// ConfigStatus says which configuration is running and whether the last reload failed.
type ConfigStatus struct {
	File        string    `json:"file"`
	LoadedAt    time.Time `json:"loaded_at"`
	ReloadError string    `json:"reload_error,omitempty"`
}

// StatusDoc is the /status document. Field names are part of the product contract.
type StatusDoc struct {
	Node    string        `json:"node"`
	Version string        `json:"version"`
	Ready   bool          `json:"ready"`
	Checks  []CheckStatus `json:"checks"`
	Config  *ConfigStatus `json:"config,omitempty"`
}

// Failing names the required checks that fail, for /readyz and the exit code.
func (d StatusDoc) Failing() []string {
	var out []string
	for _, c := range d.Checks {
		if c.Required && !c.OK {
			out = append(out, c.Name)
		}
	}
	return out
}

// checkOrder is the order checks are listed in: the start order of their subsystems.
var checkOrder = []string{
	health.Hugepages, health.Modules, health.IOMMU, health.Uplink,
	health.Spire, health.Steering, health.Proxy, health.OTLP,
}

// Status collects check results from the subsystems. It is the health.Reporter they
// are given, and the source of /readyz, /status, the check gauges and systemd STATUS=.
type Status struct {
	mu       sync.Mutex
	node     string
	checks   map[string]*CheckStatus
	config   ConfigStatus
	started  bool // every subsystem has been started once
	stopping bool
	changed  chan struct{} // closed and replaced on every change that matters
	okGauge  *prometheus.GaugeVec
	now      func() time.Time
}

// NewStatus returns an empty Status registering nodeagent_check_ok on reg.
func NewStatus(node string, reg prometheus.Registerer) *Status {
	s := &Status{
		node:    node,
		checks:  map[string]*CheckStatus{},
		changed: make(chan struct{}),
		now:     time.Now,
		okGauge: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "nodeagent_check_ok",
			Help: "1 when the named health check passes, 0 when it fails.",
		}, []string{"check"}),
	}
	if reg != nil {
		reg.MustRegister(s.okGauge)
	}
	return s
}

// Expect declares a check that an enabled subsystem owns. Until it reports, the check
// fails with "not checked yet", so a required check holds readiness back.
func (s *Status) Expect(name string, required bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c, ok := s.checks[name]
	if !ok {
		c = &CheckStatus{Name: name, Detail: "not checked yet", Since: s.now().UTC()}
		s.checks[name] = c
		s.okGauge.WithLabelValues(name).Set(0)
	}
	c.Required = required
	s.notifyLocked()
}

// Forget removes a check whose subsystem was disabled.
func (s *Status) Forget(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.checks, name)
	s.okGauge.DeleteLabelValues(name)
	s.notifyLocked()
}

// Report records a result. Results for checks no enabled subsystem owns are ignored.
func (s *Status) Report(r health.Result) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c, ok := s.checks[r.Name]
	if !ok {
		return
	}
	if c.OK == r.OK && c.Detail == r.Detail {
		return
	}
	if c.OK != r.OK || c.Detail == "not checked yet" {
		c.Since = s.now().UTC()
	}
	c.OK, c.Detail = r.OK, r.Detail
	s.okGauge.WithLabelValues(r.Name).Set(b2f(r.OK))
	s.notifyLocked()
}

// SetConfig records the configuration in force and the outcome of the last reload.
func (s *Status) SetConfig(cs ConfigStatus) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.config = cs
	s.notifyLocked()
}

// SetStarted marks the end of start-up: until then the agent is not ready, even with
// no failing check.
func (s *Status) SetStarted() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.started = true
	s.notifyLocked()
}

// SetStopping makes the agent unready for good: the first step of a graceful stop.
func (s *Status) SetStopping() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stopping = true
	s.notifyLocked()
}

// Changed returns a channel closed at the next change.
func (s *Status) Changed() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.changed
}

func (s *Status) notifyLocked() {
	close(s.changed)
	s.changed = make(chan struct{})
}

// Snapshot returns the current document.
func (s *Status) Snapshot() StatusDoc {
	s.mu.Lock()
	defer s.mu.Unlock()
	doc := StatusDoc{Node: s.node, Version: Version(), Ready: s.started && !s.stopping, Checks: []CheckStatus{}}
	for _, c := range s.checks {
		doc.Checks = append(doc.Checks, *c)
		if c.Required && !c.OK {
			doc.Ready = false
		}
	}
	sortChecks(doc.Checks)
	if s.config.File != "" {
		cs := s.config
		doc.Config = &cs
	}
	return doc
}

// Summary is a one-line state for systemd's STATUS= and logs.
func (d StatusDoc) Summary() string {
	if len(d.Checks) == 0 {
		return "no checks enabled"
	}
	var failing []string
	for _, c := range d.Checks {
		if !c.OK {
			failing = append(failing, fmt.Sprintf("%s: %s", c.Name, c.Detail))
		}
	}
	state := "ready"
	if !d.Ready {
		state = "not ready"
	}
	if len(failing) == 0 {
		return fmt.Sprintf("%s: all %d checks pass", state, len(d.Checks))
	}
	return fmt.Sprintf("%s: %d of %d checks fail (%s)", state, len(failing), len(d.Checks), strings.Join(failing, "; "))
}

func sortChecks(cs []CheckStatus) {
	rank := map[string]int{}
	for i, n := range checkOrder {
		rank[n] = i + 1
	}
	sort.Slice(cs, func(i, j int) bool {
		ri, rj := rank[cs[i].Name], rank[cs[j].Name]
		if ri != rj {
			return ri < rj
		}
		return cs[i].Name < cs[j].Name
	})
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
