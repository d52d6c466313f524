// Package reuseport binds TCP listeners with SO_REUSEPORT, so that during a rolling
// update (or a systemd restart with an overlap) a new agent binds the same address
// while the old one still serves, and no client sees a refused connection.
package reuseport

import (
	"context"
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

// Listen binds a TCP listener on address with SO_REUSEPORT set.
func Listen(ctx context.Context, address string) (net.Listener, error) {
	lc := net.ListenConfig{Control: Control}
	return lc.Listen(ctx, "tcp", address)
}

// Control sets SO_REUSEPORT; it fits net.ListenConfig.Control.
func Control(_, _ string, c syscall.RawConn) error {
	var serr error
	if err := c.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
	}); err != nil {
		return err
	}
	return serr
}
