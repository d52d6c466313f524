package reuseport

import (
	"context"
	"net"
	"testing"
)

func TestTwoListenersShareAnAddress(t *testing.T) {
	a, err := Listen(context.Background(), "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := Listen(context.Background(), a.Addr().String())
	if err != nil {
		t.Fatalf("second listener on %s: %v; want it to bind beside the first", a.Addr(), err)
	}
	defer b.Close()
	// A listener without SO_REUSEPORT is still refused: the option is what makes the overlap.
	if c, err := net.Listen("tcp", a.Addr().String()); err == nil {
		c.Close()
		t.Errorf("plain listener bound beside reuseport ones; want EADDRINUSE")
	}
}
