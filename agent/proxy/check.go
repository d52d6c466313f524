package proxy

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nodeagent/nodeagent/agent/health"
)

// Check is the one-shot proxy check of `nodeagent check`. It changes nothing on
// the host: it validates the options, checks that every listen address is one of
// this host's (without binding: a momentary SO_REUSEPORT listener could steal a
// running agent's connections), resolves every DNS name once, and dials each
// cluster endpoint (ConnectTimeout each, through DialControl) until one per cluster
// answers.
func Check(ctx context.Context, opts Options) []health.Result {
	o := opts.withDefaults()
	if err := o.Validate(); err != nil {
		return []health.Result{{Name: health.Proxy, OK: false, Detail: err.Error()}}
	}
	var problems []string
	if len(o.Listeners) == 0 {
		local, err := localAddrs()
		if err != nil {
			problems = append(problems, fmt.Sprintf("list local addresses: %v", err))
		}
		for _, ap := range o.Listen {
			if !ap.Addr().IsUnspecified() && !local[ap.Addr().Unmap()] {
				problems = append(problems, fmt.Sprintf("listen address %s is not on this host", ap))
			}
		}
	}
	tab, err := compile(o, newEndpointRegistry())
	if err != nil {
		return []health.Result{{Name: health.Proxy, OK: false, Detail: err.Error()}}
	}
	resolved := map[string][]netip.Addr{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for host := range tab.hosts {
		wg.Go(func() {
			lctx, cancel := context.WithTimeout(ctx, o.ConnectTimeout+5*time.Second)
			defer cancel()
			addrs, err := o.Resolver.LookupNetIP(lctx, "ip", host)
			mu.Lock()
			defer mu.Unlock()
			if err != nil || len(addrs) == 0 {
				problems = append(problems, fmt.Sprintf("resolve %s: %v", host, orNoAddrs(err)))
				return
			}
			resolved[host] = addrs
		})
	}
	wg.Wait()
	d := net.Dialer{Timeout: o.ConnectTimeout, Control: o.DialControl}
	for name, c := range tab.clusters {
		wg.Go(func() {
			var errs []string
			for _, ep := range c.endpoints {
				addrs := resolved[ep.host]
				if a, err := netip.ParseAddr(ep.host); err == nil {
					addrs = []netip.Addr{a}
				}
				if len(addrs) == 0 {
					errs = append(errs, ep.addr+": not resolved")
					continue
				}
				nc, err := d.DialContext(ctx, "tcp", netip.AddrPortFrom(addrs[0].Unmap(), ep.port).String())
				if err == nil {
					nc.Close()
					return
				}
				errs = append(errs, err.Error())
			}
			mu.Lock()
			problems = append(problems, fmt.Sprintf("cluster %s: no endpoint answers (%s)", name, strings.Join(errs, "; ")))
			mu.Unlock()
		})
	}
	wg.Wait()
	if len(problems) > 0 {
		slices.Sort(problems)
		return []health.Result{{Name: health.Proxy, OK: false, Detail: strings.Join(problems, "; ")}}
	}
	return []health.Result{{Name: health.Proxy, OK: true,
		Detail: fmt.Sprintf("%d mappings, %d clusters reachable, %d names resolved", len(tab.routes), len(tab.clusters), len(resolved))}}
}

func orNoAddrs(err error) error {
	if err == nil {
		return errNotResolved
	}
	return err
}

func localAddrs() (map[netip.Addr]bool, error) {
	ifAddrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil, err
	}
	m := map[netip.Addr]bool{}
	for _, a := range ifAddrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil {
			m[p.Addr().Unmap()] = true
		}
	}
	return m, nil
}
