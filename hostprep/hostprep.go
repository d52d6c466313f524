// Package hostprep prepares a node for the VPP dataplane: the 2 MiB hugepage pool, the
// kernel modules (vfio-pci), the IOMMU (or vfio's no-IOMMU mode, only when allowed) and
// the bpffs mount that steering pins under. In apply mode it sets each of them now,
// persists them for the next boot in files it shares with the operator (through a marked
// block, written atomically), and verifies what the kernel really did; in check mode, and
// in the one-shot Check, it only verifies and changes nothing.
//
// Every host path is taken under Options.HostRoot, and cleaned first so that ".." never
// leads out of it.
//
// Choices worth knowing:
//
//   - The 2 MiB pool is set through /sys/kernel/mm/hugepages/hugepages-2048kB, never
//     vm.nr_hugepages, which sizes the default pool (1 GiB on some nodes). It is persisted
//     as `vm.nr_hugepages = N` only when the default size is 2 MiB; otherwise the check
//     says that the kernel command line (`hugepagesz=2M hugepages=N`) is the only way.
//     A larger pool is kept, and persisted, unless AllowShrink.
//   - When the kernel allocates fewer pages than asked, memory is compacted once and the
//     pool asked for again; the check fails with the numbers and Run retries with backoff.
//   - Persistence problems (a read-only or symlinked file, a wrong key in check mode) are
//     warnings in the check's detail: the check's OK says whether the node can run VPP now.
//   - A module that fails to load is not written to modules_file: it would fail every boot.
//     The file spells vfio-pci as vfio_pci on the RHEL family (ID/ID_LIKE in os-release),
//     as their guides do; kmod treats both spellings alike.
//   - Files are shared with the operator: only the block between "# BEGIN nodeagent" and
//     "# END nodeagent" is nodeagent's; foreign lines that would mislead (the ignored key
//     vm_nr.hugepages, a conflicting vm.nr_hugepages) are commented out, never deleted.
//   - vfio no-IOMMU mode is turned on only with AllowNoIOMMU, and not persisted.
//   - bpffs is reported as the extra check CheckBPFFS when Options.BPFFS is set.
package hostprep

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/nodeagent/nodeagent/agent/health"
	"github.com/prometheus/client_golang/prometheus"
)

// Hostprep is the host-preparation subsystem.
type Hostprep struct {
	log *slog.Logger
	m   *metrics
	rep health.Reporter
	d   deps

	mu     sync.Mutex
	opts   Options
	update chan struct{}

	st runState // owned by Run
}

// runState is what one pass leaves for the next.
type runState struct {
	poolChangedAt time.Time // when hostprep last changed the pool; zero: never
}

// New returns a Hostprep for opts and registers its metrics on reg. It does no I/O.
func New(opts Options, log *slog.Logger, reg prometheus.Registerer, rep health.Reporter) (*Hostprep, error) {
	m, err := newMetrics(reg)
	if err != nil {
		return nil, fmt.Errorf("register hostprep metrics: %w", err)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if rep == nil {
		rep = health.Discard
	}
	return &Hostprep{
		log:    log,
		m:      m,
		rep:    rep,
		d:      realDeps(),
		opts:   opts.withDefaults(),
		update: make(chan struct{}, 1),
	}, nil
}

// Run applies (in apply mode) and verifies, reports every check at the start and
// whenever it changes, retries with backoff (RetryInitial doubling to RetryMax) while a
// check fails, and re-verifies every Reverify while all pass, so drift is noticed. It
// returns nil when ctx is done; it takes nothing that would need releasing (what it
// changed on the host is meant to stay).
func (h *Hostprep) Run(ctx context.Context) error {
	last := map[string]health.Result{}
	var backoff time.Duration
	for {
		opts := h.options()
		p := &pass{o: opts, d: h.d, log: h.log, m: h.m, apply: opts.Mode != ModeCheck, st: &h.st}
		results := p.all(ctx)
		if ctx.Err() != nil {
			return nil
		}
		allOK := true
		for _, r := range results {
			if prev, seen := last[r.Name]; !seen || prev != r {
				h.rep.Report(r)
				last[r.Name] = r
				if r.OK {
					h.log.Info("check", "name", r.Name, "ok", r.OK, "detail", r.Detail)
				} else {
					h.log.Warn("check", "name", r.Name, "ok", r.OK, "detail", r.Detail)
				}
			}
			allOK = allOK && r.OK
		}
		wait := opts.Reverify
		if allOK {
			backoff = 0
		} else {
			if backoff == 0 {
				backoff = opts.RetryInitial
			} else {
				backoff = min(2*backoff, opts.RetryMax)
			}
			wait = backoff
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-h.update:
			t.Stop()
			backoff = 0
		case <-t.C:
		}
	}
}

// Update takes new options live: the next pass, which starts at once, uses them.
func (h *Hostprep) Update(opts Options) error {
	h.mu.Lock()
	h.opts = opts.withDefaults()
	h.mu.Unlock()
	select {
	case h.update <- struct{}{}:
	default:
	}
	return nil
}

func (h *Hostprep) options() Options {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.opts
}

// Check runs every hostprep check once, whatever opts.Mode says, and changes nothing on
// the host. The bpffs result (CheckBPFFS) is included when opts.BPFFS is set.
func Check(ctx context.Context, opts Options) []health.Result {
	return check(ctx, opts, realDeps())
}

func check(ctx context.Context, opts Options, d deps) []health.Result {
	p := &pass{o: opts.withDefaults(), d: d, log: slog.New(slog.DiscardHandler), apply: false, st: &runState{}}
	return p.all(ctx)
}

// pass is one round of apply-and-verify (or verify only) over every check.
type pass struct {
	o     Options
	d     deps
	log   *slog.Logger
	m     *metrics
	apply bool
	st    *runState
}

func (p *pass) all(ctx context.Context) []health.Result {
	names := []string{health.Hugepages, health.Modules, health.IOMMU}
	if p.o.BPFFS != "" {
		names = append(names, CheckBPFFS)
	}
	if st, err := os.Stat(p.o.HostRoot); err != nil || !st.IsDir() {
		why := "not a directory"
		if err != nil {
			why = err.Error()
		}
		out := make([]health.Result, 0, len(names))
		for _, n := range names {
			out = append(out, health.Result{Name: n, Detail: fmt.Sprintf("host_root %s: %s: nothing checked", p.o.HostRoot, why)})
		}
		return out
	}
	out := []health.Result{p.hugepages(), p.modules(ctx), p.iommu()}
	if r, ok := p.bpffs(); ok {
		out = append(out, r)
	}
	return out
}
