package ebpf

import (
	"fmt"
	"syscall"

	"golang.org/x/sys/unix"
)

// UpstreamMark is the SO_MARK of the proxy's upstream sockets; the connect
// hooks never steer a socket carrying it. 0x6e avoids the bits kube-proxy
// (0x4000, 0x8000), Cilium (0x0f00) and Calico (0xffff0000) use.
const UpstreamMark = 0x6e

// UpstreamControl marks a socket with UpstreamMark before it connects, so the
// steering programs leave it alone. It has the signature of net.Dialer.Control;
// the proxy uses it for every upstream connection. Setting SO_MARK needs
// CAP_NET_ADMIN.
func UpstreamControl(network, address string, c syscall.RawConn) error {
	var serr error
	if err := c.Control(func(fd uintptr) {
		serr = MarkUpstream(int(fd))
	}); err != nil {
		return fmt.Errorf("mark upstream socket: %w", err)
	}
	return serr
}

// MarkUpstream sets UpstreamMark on the socket fd.
func MarkUpstream(fd int) error {
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, UpstreamMark); err != nil {
		return fmt.Errorf("set SO_MARK %#x on upstream socket: %w", UpstreamMark, err)
	}
	return nil
}
