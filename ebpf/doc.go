// Package ebpf steers TCP connections that workloads open to mapped destinations
// (the keys of proxy.address_map) to nodeagent's local proxy with cgroup eBPF,
// and keeps each connection's original destination for the proxy to look up.
//
// Programs (C in bpf/steer.c, compiled with bpf2go, objects committed):
//
//   - cgroup/connect4, cgroup/connect6 (kernel 4.17): a TCP connect() to an
//     intercepted destination (IP:port, else IP with any port; IPv4-mapped IPv6
//     included) is rewritten to the proxy. A socket in the host network namespace
//     (told apart by netns cookie, kernel 5.7 for bpf_get_netns_cookie) goes to the
//     proxy's loopback listener; a socket in any other namespace (a pod) goes to
//     Options.PodRedirect, or is left alone and counted when that is unset. The
//     dialled destination is remembered by socket cookie.
//   - sockops (kernel 4.13; state callback 4.16): when a steered connection is
//     established, the original destination is stored under the client's address
//     and port, which is the peer address the proxy sees on the accepted socket
//     (Steering.OriginalDst). Both entries are deleted when the client socket
//     reaches TCP_CLOSE, however the connection ends; the maps are LRU only as
//     a safety net (for a connect() that fails before the TCP handshake starts).
//   - cgroup/getpeername4, cgroup/getpeername6 (kernel 5.8): the workload sees
//     the address it dialled, not the proxy's.
//
// The programs are attached with bpf_link (kernel 5.7; coexists with other
// programs on the same hook, e.g. Cilium's) and pinned, with their maps, under
// Options.BPFFS. A restarted agent replaces the programs of the pinned links in
// place (no detach, no double attachment) and reuses the pinned maps.
//
// No loops: sockets whose SO_MARK is UpstreamMark are never steered; the proxy
// dials upstream through UpstreamControl. A mark, rather than the agent's cgroup
// id, because the agent usually runs in the very cgroup that is steered (the
// cgroup v2 root by default) and some of its own connections may have to be
// steered; the mark is per socket and set only where the proxy asks for it.
// The mark is readable from the connect hooks through ctx->sk (kernel 5.3).
//
// Minimum kernel: 5.8, plus SO_NETNS_COOKIE (5.14) to learn the host
// namespace's cookie. Run probes for each and names what is missing.
package ebpf
