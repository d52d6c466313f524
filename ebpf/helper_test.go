package ebpf

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/nodeagent/nodeagent/agent/health"
)

// The test binary re-executes itself as a helper process: a client that must
// live in the test cgroup and a network namespace, or an agent to kill -9.
const helperEnv = "NODEAGENT_EBPF_TEST_HELPER"

func TestMain(m *testing.M) {
	switch os.Getenv(helperEnv) {
	case "":
		os.Exit(m.Run())
	case "dial":
		os.Exit(helperDial())
	case "agent":
		os.Exit(helperAgent())
	default:
		fmt.Fprintln(os.Stderr, "unknown helper", os.Getenv(helperEnv))
		os.Exit(2)
	}
}

// dialRequest is what the dial helper does, passed as JSON in DIAL_REQUEST.
type dialRequest struct {
	Addr  string // e.g. 169.254.1.2:80, [fd00::2]:80, [::ffff:169.254.1.2]:80
	Six   bool   // use an AF_INET6 socket (for IPv4-mapped addresses)
	Mark  bool   // set UpstreamMark before connecting
	Count int    // sequential connections; 0 means 1
}

// dialResult is the dial helper's answer, one JSON line on stdout.
type dialResult struct {
	Reply string // first line read from the connection
	Peer  string // getpeername after connect
	Err   string
	OK    int // connections that connected and got a reply
}

// helperDial waits for a byte on stdin (the parent moves it into the cgroup
// first), then dials with raw syscalls so the socket family is exact.
func helperDial() int {
	var req dialRequest
	if err := json.Unmarshal([]byte(os.Getenv("DIAL_REQUEST")), &req); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	if _, err := io.ReadFull(os.Stdin, make([]byte, 1)); err != nil {
		fmt.Fprintln(os.Stderr, "wait for go:", err)
		return 2
	}
	n := max(req.Count, 1)
	var res dialResult
	for range n {
		reply, peer, err := dialOnce(req)
		if err != nil {
			res.Err = err.Error()
			break
		}
		res.OK++
		res.Reply, res.Peer = reply, peer
	}
	_ = json.NewEncoder(os.Stdout).Encode(res)
	return 0
}

func dialOnce(req dialRequest) (reply, peer string, err error) {
	ap, err := netip.ParseAddrPort(req.Addr)
	if err != nil {
		return "", "", err
	}
	var fd int
	var sa unix.Sockaddr
	if req.Six || (ap.Addr().Is6() && !ap.Addr().Is4In6()) {
		fd, err = unix.Socket(unix.AF_INET6, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		sa = &unix.SockaddrInet6{Addr: ap.Addr().As16(), Port: int(ap.Port())}
	} else {
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		sa = &unix.SockaddrInet4{Addr: ap.Addr().Unmap().As4(), Port: int(ap.Port())}
	}
	if err != nil {
		return "", "", fmt.Errorf("socket: %w", err)
	}
	defer unix.Close(fd)
	tv := unix.Timeval{Sec: 2}
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	if req.Mark {
		if err := MarkUpstream(fd); err != nil {
			return "", "", err
		}
	}
	if err := unix.Connect(fd, sa); err != nil {
		return "", "", fmt.Errorf("connect %s: %w", req.Addr, err)
	}
	psa, err := unix.Getpeername(fd)
	if err != nil {
		return "", "", fmt.Errorf("getpeername: %w", err)
	}
	switch p := psa.(type) {
	case *unix.SockaddrInet4:
		peer = netip.AddrPortFrom(netip.AddrFrom4(p.Addr), uint16(p.Port)).String()
	case *unix.SockaddrInet6:
		peer = netip.AddrPortFrom(netip.AddrFrom16(p.Addr), uint16(p.Port)).String()
	}
	var buf []byte
	b := make([]byte, 256)
	for {
		k, err := unix.Read(fd, b)
		if err == unix.EINTR {
			continue
		}
		if k > 0 {
			buf = append(buf, b[:k]...)
		}
		if err != nil {
			return "", peer, fmt.Errorf("read: %w", err)
		}
		if k == 0 || (len(buf) > 0 && buf[len(buf)-1] == '\n') {
			break
		}
	}
	line, _, _ := bytes.Cut(buf, []byte("\n"))
	return string(line), peer, nil
}

// helperAgent runs Steering with the options in AGENT_OPTIONS until killed,
// printing "ready" once attached.
func helperAgent() int {
	var opts Options
	if err := json.Unmarshal([]byte(os.Getenv("AGENT_OPTIONS")), &opts); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	opts.KeepOnExit = true
	rec := health.NewRecorder()
	s, err := New(opts, slog.New(slog.NewTextHandler(os.Stderr, nil)), prometheus.NewRegistry(), rec)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	errc := make(chan error, 1)
	go func() { errc <- s.Run(ctx) }()
	if res, ok := rec.WaitFor(health.Steering, 20*time.Second, func(r health.Result) bool { return r.OK }); !ok {
		fmt.Fprintln(os.Stderr, "not ready:", res.Detail)
		return 1
	}
	fmt.Println("ready " + strconv.Itoa(os.Getpid()))
	<-errc
	return 0
}

func mustAddr(s string) netip.Addr { return netip.MustParseAddr(s) }
