package netcfg

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// linkInfo is the part of a link the check looks at.
type linkInfo struct {
	index     int
	name      string
	kind      string // netlink's Link.Type(): "device", "veth", "tuntap", ...
	adminUp   bool   // IFF_UP
	lowerUp   bool   // IFF_LOWER_UP: carrier
	operState netlink.LinkOperState
	mtu       int
	rxQueues  int
	txQueues  int
	loopback  bool
}

// snapshot is the network namespace's links, global addresses and default routes at
// one moment.
type snapshot struct {
	links        []linkInfo
	addrs        map[int][]netip.Prefix // link index -> global (universe-scope) addresses
	defaultRoute map[int]bool           // link indexes that carry a default route
	interrupted  bool                   // a dump stayed interrupted after retries: data may be partial
}

func (s *snapshot) link(name string) (linkInfo, bool) {
	for _, l := range s.links {
		if l.name == name {
			return l, true
		}
	}
	return linkInfo{}, false
}

// lister is the part of *netlink.Handle a snapshot needs.
type lister interface {
	LinkByName(name string) (netlink.Link, error)
	LinkByIndex(index int) (netlink.Link, error)
	LinkList() ([]netlink.Link, error)
	AddrList(link netlink.Link, family int) ([]netlink.Addr, error)
	RouteListFilteredIter(family int, filter *netlink.Route, filterMask uint64, f func(netlink.Route) bool) error
}

// dumpAttempts bounds how often a dump interrupted by a concurrent change is redone
// before its partial result is used (and another recompute scheduled).
const dumpAttempts = 4

// retryInterrupted runs dump until it does not return netlink.ErrDumpInterrupted, at
// most dumpAttempts times. It reports whether the last attempt was still interrupted;
// the caller then has partial results from it.
func retryInterrupted(dump func() error) (interrupted bool, err error) {
	for range dumpAttempts {
		err = dump()
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return false, err
		}
	}
	return true, nil
}

func newLinkInfo(l netlink.Link) linkInfo {
	a := l.Attrs()
	return linkInfo{
		index:     a.Index,
		name:      a.Name,
		kind:      l.Type(),
		adminUp:   a.Flags&net.FlagUp != 0,
		lowerUp:   a.RawFlags&unix.IFF_LOWER_UP != 0,
		operState: a.OperState,
		mtu:       a.MTU,
		rxQueues:  a.NumRxQueues,
		txQueues:  a.NumTxQueues,
		loopback:  a.Flags&net.FlagLoopback != 0,
	}
}

// takeSnapshot lists global addresses and main-table default routes, and the links
// the verdict names: the uplink, fetched by name, and the links carrying the node
// address or a default route. Only when the uplink is missing are all links dumped, to
// list them in the detail — a full link dump is the expensive part on a node with a
// veth per pod. Each dump is redone when the kernel flags it as interrupted by a
// concurrent change.
func takeSnapshot(h lister, uplink string, nodeIP netip.Addr) (*snapshot, error) {
	s := &snapshot{addrs: map[int][]netip.Prefix{}, defaultRoute: map[int]bool{}}

	var addrs []netlink.Addr
	intr, err := retryInterrupted(func() (err error) {
		addrs, err = h.AddrList(nil, netlink.FAMILY_ALL)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("list addresses: %w", err)
	}
	s.interrupted = s.interrupted || intr
	nodeLink := 0
	for _, a := range addrs {
		if a.Scope != unix.RT_SCOPE_UNIVERSE || a.IPNet == nil {
			continue
		}
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			continue
		}
		ones, _ := a.Mask.Size()
		s.addrs[a.LinkIndex] = append(s.addrs[a.LinkIndex], netip.PrefixFrom(ip.Unmap(), ones))
		if nodeIP.IsValid() && ip.Unmap() == nodeIP.Unmap() {
			nodeLink = a.LinkIndex
		}
	}

	intr, err = retryInterrupted(func() error {
		clear(s.defaultRoute)
		main := &netlink.Route{Table: unix.RT_TABLE_MAIN}
		return h.RouteListFilteredIter(netlink.FAMILY_ALL, main, netlink.RT_FILTER_TABLE, func(r netlink.Route) bool {
			if !isDefault(r) {
				return true
			}
			if r.LinkIndex > 0 {
				s.defaultRoute[r.LinkIndex] = true
			}
			for _, nh := range r.MultiPath {
				if nh.LinkIndex > 0 {
					s.defaultRoute[nh.LinkIndex] = true
				}
			}
			return true
		})
	})
	if err != nil {
		return nil, fmt.Errorf("list routes: %w", err)
	}
	s.interrupted = s.interrupted || intr

	l, err := h.LinkByName(uplink)
	var notFound netlink.LinkNotFoundError
	switch {
	case err == nil:
		s.links = append(s.links, newLinkInfo(l))
		related := []int{nodeLink}
		for i := range s.defaultRoute {
			related = append(related, i)
		}
		slices.Sort(related)
		for _, i := range slices.Compact(related) {
			if i <= 0 || i == l.Attrs().Index {
				continue
			}
			other, err := h.LinkByIndex(i)
			if errors.As(err, &notFound) {
				continue // deleted since the dump; its event triggers another evaluation
			}
			if err != nil {
				return nil, fmt.Errorf("get link %d: %w", i, err)
			}
			s.links = append(s.links, newLinkInfo(other))
		}
		slices.SortFunc(s.links, func(a, b linkInfo) int { return a.index - b.index })
	case errors.As(err, &notFound):
		var links []netlink.Link
		intr, err := retryInterrupted(func() (err error) {
			links, err = h.LinkList()
			return err
		})
		if err != nil {
			return nil, fmt.Errorf("list links: %w", err)
		}
		s.interrupted = s.interrupted || intr
		for _, l := range links {
			s.links = append(s.links, newLinkInfo(l))
		}
	default:
		return nil, fmt.Errorf("get link %s: %w", uplink, err)
	}
	return s, nil
}

// isDefault reports whether r is a unicast default route (0.0.0.0/0 or ::/0). netlink
// reports the destination of a default route as nil or as an all-zero prefix,
// depending on the version.
func isDefault(r netlink.Route) bool {
	if r.Type != unix.RTN_UNICAST && r.Type != 0 {
		return false
	}
	if r.Dst == nil {
		return true
	}
	ones, _ := r.Dst.Mask.Size()
	return ones == 0 && r.Dst.IP.IsUnspecified()
}
