package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// dnsCache keeps the DNS names of targets and endpoints resolved in the
// background, so the accept path never waits for a lookup it started itself: a
// connection only waits (up to its connect timeout) for a name's first answer.
type dnsCache struct {
	mu      sync.Mutex
	entries map[string]*dnsEntry
	kick    chan struct{}
}

type dnsEntry struct {
	host  string
	ready chan struct{} // closed after the first lookup finished, either way

	mu      sync.Mutex
	addrs   []netip.Addr
	err     error
	next    time.Time // when to look up again
	rr      atomic.Uint64
	started bool
}

func newDNSCache() *dnsCache {
	return &dnsCache{entries: map[string]*dnsEntry{}, kick: make(chan struct{}, 1)}
}

// sync makes the cache hold exactly hosts (new ones resolved at once).
func (d *dnsCache) sync(hosts map[string]bool) {
	d.mu.Lock()
	added := false
	for h := range hosts {
		if d.entries[h] == nil {
			d.entries[h] = &dnsEntry{host: h, ready: make(chan struct{})}
			added = true
		}
	}
	for h := range d.entries {
		if !hosts[h] {
			delete(d.entries, h)
		}
	}
	d.mu.Unlock()
	if added {
		select {
		case d.kick <- struct{}{}:
		default:
		}
	}
}

func (d *dnsCache) entry(host string) *dnsEntry {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.entries[host]
}

// errNotResolved is returned for a name the cache has no address for.
var errNotResolved = errors.New("name not resolved")

// resolve returns an address for host, rotating through the answers, waiting for
// the first lookup (never starting one) until ctx is done.
func (d *dnsCache) resolve(ctx context.Context, host string) (netip.Addr, error) {
	if a, err := netip.ParseAddr(host); err == nil {
		return a, nil
	}
	e := d.entry(host)
	if e == nil {
		return netip.Addr{}, fmt.Errorf("resolve %s: %w", host, errNotResolved)
	}
	select {
	case <-e.ready:
	case <-ctx.Done():
		return netip.Addr{}, fmt.Errorf("resolve %s: waiting for the first lookup: %w", host, ctx.Err())
	}
	e.mu.Lock()
	addrs, err := e.addrs, e.err
	e.mu.Unlock()
	if len(addrs) == 0 {
		if err == nil {
			err = errNotResolved
		}
		return netip.Addr{}, fmt.Errorf("resolve %s: %w", host, err)
	}
	return addrs[int(e.rr.Add(1)-1)%len(addrs)], nil
}

// unresolved lists the names that have no address, with the reason.
func (d *dnsCache) unresolved() []string {
	d.mu.Lock()
	entries := make([]*dnsEntry, 0, len(d.entries))
	for _, e := range d.entries {
		entries = append(entries, e)
	}
	d.mu.Unlock()
	var out []string
	for _, e := range entries {
		e.mu.Lock()
		if len(e.addrs) == 0 {
			why := "not resolved yet"
			if e.err != nil {
				why = e.err.Error()
			}
			out = append(out, e.host+": "+why)
		}
		e.mu.Unlock()
	}
	slices.Sort(out)
	return out
}

// dnsRetry is how soon a failed lookup is retried (capped by the refresh interval).
const dnsRetry = 5 * time.Second

// run resolves due names until ctx is done. refresh returns the current interval.
func (d *dnsCache) run(ctx context.Context, r Resolver, refresh func() time.Duration, log *slog.Logger, changed func()) {
	const tick = 250 * time.Millisecond
	t := time.NewTicker(tick)
	defer t.Stop()
	for {
		now := time.Now()
		d.mu.Lock()
		var due []*dnsEntry
		for _, e := range d.entries {
			e.mu.Lock()
			if !e.started || !now.Before(e.next) {
				e.started = true
				e.next = now.Add(time.Hour) // in flight; set properly when done
				due = append(due, e)
			}
			e.mu.Unlock()
		}
		d.mu.Unlock()
		for _, e := range due {
			go d.lookup(ctx, r, e, refresh(), log, changed)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-d.kick:
		}
	}
}

func (d *dnsCache) lookup(ctx context.Context, r Resolver, e *dnsEntry, refresh time.Duration, log *slog.Logger, changed func()) {
	lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	addrs, err := r.LookupNetIP(lctx, "ip", e.host)
	cancel()
	if ctx.Err() != nil {
		e.mu.Lock()
		e.started = false // look up again when a Run starts
		e.mu.Unlock()
		return
	}
	for i := range addrs {
		addrs[i] = addrs[i].Unmap()
	}
	slices.SortFunc(addrs, func(a, b netip.Addr) int { return a.Compare(b) })
	addrs = slices.Compact(addrs)
	if err == nil && len(addrs) == 0 {
		err = errNotResolved
	}
	e.mu.Lock()
	prevErr := e.err
	prevAddrs := e.addrs
	if err != nil {
		// Keep the last good answer: a DNS outage should not break traffic.
		e.err = fmt.Errorf("lookup %s: %w", e.host, err)
		e.next = time.Now().Add(min(dnsRetry, refresh))
	} else {
		e.addrs, e.err = addrs, nil
		e.next = time.Now().Add(refresh)
	}
	e.mu.Unlock()
	select {
	case <-e.ready:
	default:
		close(e.ready)
	}
	if err != nil && prevErr == nil {
		log.Warn("dns lookup failed", "host", e.host, "stale_addresses", len(prevAddrs), "error", err)
	}
	if err == nil && !slices.Equal(prevAddrs, addrs) {
		log.Debug("dns resolved", "host", e.host, "addresses", addrs)
	}
	if (err == nil) != (prevErr == nil) || !slices.Equal(prevAddrs, addrs) {
		changed()
	}
}
