package netcfg

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// subscribeFunc starts one netlink subscription, with an initial dump of what exists.
// The returned channel receives a value (coalesced) for each notification and is
// closed when the subscription's socket fails or p.done is closed.
type subscribeFunc func(p subParams) (<-chan struct{}, error)

// subParams are a subscription's parameters.
type subParams struct {
	ns     netns.NsHandle  // namespace to watch; netns.None(): the current one
	done   <-chan struct{} // closing it closes the socket
	onErr  func(error)     // netlink's ErrorCallback; called from its goroutine, must not block
	rcvBuf int             // socket receive buffer in bytes (capped by net.core.rmem_max); 0: kernel default
}

// defaultReceiveBuffer sizes the subscription sockets so that a burst of events (a
// node starting many pods) does not overflow them; an overflow (ENOBUFS) is survived
// by resubscribing, but costs a re-dump.
const defaultReceiveBuffer = 1 << 20

type subscription struct {
	name      string
	subscribe subscribeFunc
}

// netlinkSubscriptions are the events that can change the uplink's verdict.
var netlinkSubscriptions = []subscription{
	{name: "link", subscribe: subscribeLinks},
	{name: "address", subscribe: subscribeAddrs},
	{name: "route", subscribe: subscribeRoutes},
}

func nsOption(ns netns.NsHandle) *netns.NsHandle {
	if !ns.IsOpen() {
		return nil
	}
	return &ns
}

func subscribeLinks(p subParams) (<-chan struct{}, error) {
	ch := make(chan netlink.LinkUpdate, 64)
	err := netlink.LinkSubscribeWithOptions(ch, p.done, netlink.LinkSubscribeOptions{
		Namespace: nsOption(p.ns), ErrorCallback: p.onErr, ListExisting: true, ReceiveBufferSize: p.rcvBuf,
	})
	if err != nil {
		return nil, err
	}
	return forward(ch, func(netlink.LinkUpdate) bool { return true }), nil
}

func subscribeAddrs(p subParams) (<-chan struct{}, error) {
	ch := make(chan netlink.AddrUpdate, 64)
	err := netlink.AddrSubscribeWithOptions(ch, p.done, netlink.AddrSubscribeOptions{
		Namespace: nsOption(p.ns), ErrorCallback: p.onErr, ListExisting: true, ReceiveBufferSize: p.rcvBuf,
	})
	if err != nil {
		return nil, err
	}
	return forward(ch, func(netlink.AddrUpdate) bool { return true }), nil
}

func subscribeRoutes(p subParams) (<-chan struct{}, error) {
	ch := make(chan netlink.RouteUpdate, 64)
	err := netlink.RouteSubscribeWithOptions(ch, p.done, netlink.RouteSubscribeOptions{
		Namespace: nsOption(p.ns), ErrorCallback: p.onErr, ListExisting: true, ReceiveBufferSize: p.rcvBuf,
	})
	if err != nil {
		return nil, err
	}
	// Only default routes matter; a node adds and removes a route per pod.
	return forward(ch, func(u netlink.RouteUpdate) bool { return isDefault(u.Route) }), nil
}

// forward drains in (so netlink's receive goroutine never blocks) and turns the
// updates that matter into coalesced ticks; it closes the result when in is closed.
func forward[T any](in <-chan T, matters func(T) bool) <-chan struct{} {
	out := make(chan struct{}, 1)
	go func() {
		defer close(out)
		for upd := range in {
			if !matters(upd) {
				continue
			}
			select {
			case out <- struct{}{}:
			default:
			}
		}
	}()
	return out
}

// watcher keeps one subscription alive for one Run: it turns its events into
// re-evaluations and resubscribes, with backoff, when its socket fails.
type watcher struct {
	u   *Uplink
	sub subscription
	ns  netns.NsHandle

	mu      sync.Mutex
	lastErr error
}

func (w *watcher) params(ctx context.Context) subParams {
	return subParams{ns: w.ns, done: ctx.Done(), onErr: w.onError(ctx), rcvBuf: w.u.rcvBuf}
}

// onError is the subscription's ErrorCallback. An interrupted dump means the initial
// list may be partial: re-evaluate (which re-lists). Other errors are remembered for
// the resubscribe log line; a failed socket also closes the channel.
func (w *watcher) onError(ctx context.Context) func(error) {
	return func(err error) {
		if ctx.Err() != nil {
			return // the socket was closed on purpose
		}
		if errors.Is(err, netlink.ErrDumpInterrupted) {
			w.u.log.Debug("netlink dump interrupted; re-listing", "subscription", w.sub.name)
			w.u.trigger()
			return
		}
		w.mu.Lock()
		w.lastErr = err
		w.mu.Unlock()
		w.u.log.Debug("netlink subscription error", "subscription", w.sub.name, "error", err)
		w.u.trigger()
	}
}

func (w *watcher) run(ctx context.Context, ch <-chan struct{}) {
	backoff := minBackoff
	for {
		started := time.Now()
		for range ch {
			w.u.trigger()
		}
		if ctx.Err() != nil {
			return
		}
		if time.Since(started) > stableSubscription {
			backoff = minBackoff
		}
		w.mu.Lock()
		err := w.lastErr
		w.lastErr = nil
		w.mu.Unlock()
		if err == nil {
			err = errSubscriptionClosed
		}
		w.u.log.Warn("netlink subscription lost; resubscribing", "subscription", w.sub.name, "backoff", backoff, "error", err)
		for {
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff):
			}
			backoff = min(backoff*2, maxBackoff)
			var serr error
			ch, serr = w.sub.subscribe(w.params(ctx))
			if serr == nil {
				break
			}
			w.u.log.Warn("resubscribe to netlink updates", "subscription", w.sub.name, "backoff", backoff, "error", serr)
		}
		w.u.resubscribes.Add(1)
		// Whatever changed while the socket was down shows in the next evaluation.
		w.u.trigger()
	}
}
