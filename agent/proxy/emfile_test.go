package proxy

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

const emfileChildEnv = "NODEAGENT_PROXY_EMFILE_CHILD_TARGET"

// emfileChild runs a proxy under a small RLIMIT_NOFILE for TestAcceptEMFILE, in
// a re-executed test binary. It prints its address, then obeys stdin: "grab"
// opens files until EMFILE (so every accept fails), "release" closes them; at
// EOF it prints its accept error count.
func emfileChild(target string) {
	fail := func(err error) {
		fmt.Println("error", err)
		os.Exit(1)
	}
	var rl syscall.Rlimit
	syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl)
	rl.Cur = 64
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		fail(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fail(err)
	}
	dst := netip.MustParseAddrPort("192.0.2.9:80")
	p, err := New(Options{
		Listeners:   []net.Listener{ln},
		AddressMap:  map[string]string{dst.String(): target},
		OriginalDst: OriginalDstFunc(func(netip.AddrPort) (netip.AddrPort, bool) { return dst, true }),
	}, slog.New(slog.NewTextHandler(os.Stderr, nil)), nil, nil)
	if err != nil {
		fail(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	fmt.Println(ln.Addr())
	var grabbed []*os.File
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		switch in.Text() {
		case "grab":
			for {
				f, err := os.Open(os.DevNull)
				if err != nil {
					break
				}
				grabbed = append(grabbed, f)
			}
			fmt.Println("grabbed", len(grabbed))
		case "release":
			for _, f := range grabbed {
				f.Close()
			}
			grabbed = nil
			fmt.Println("released")
		}
	}
	cancel()
	<-done
	fmt.Println("accept_errors", testutil.ToFloat64(p.m.acceptErrors))
	os.Exit(0)
}

// TestAcceptEMFILE runs the proxy in a child process, exhausts its descriptors
// for real, and checks that failing accepts back off (no busy loop, a bounded
// number of attempts) and that the proxy serves the waiting connections once
// descriptors are free again.
func TestAcceptEMFILE(t *testing.T) {
	if target := os.Getenv(emfileChildEnv); target != "" {
		emfileChild(target)
		return
	}
	t.Parallel()
	srv := startServer(t, "127.0.0.1:0", echo)
	cmd := exec.Command(os.Args[0], "-test.run=^TestAcceptEMFILE$")
	cmd.Env = append(os.Environ(), emfileChildEnv+"="+srv.addr.String())
	stdin, _ := cmd.StdinPipe()
	stdoutPipe, _ := cmd.StdoutPipe()
	cmd.Stderr = io.Discard
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	out := bufio.NewScanner(stdoutPipe)
	line := func() string {
		if !out.Scan() {
			t.Fatal("child stopped talking")
		}
		if strings.HasPrefix(out.Text(), "error") {
			t.Fatalf("child: %s", out.Text())
		}
		return out.Text()
	}
	addr := line()
	roundTrip := func(c net.Conn, within time.Duration) error {
		c.Write([]byte("x"))
		c.SetReadDeadline(time.Now().Add(within))
		_, err := io.ReadFull(c, make([]byte, 1))
		return err
	}
	// Served normally first.
	c0, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c0.Close()
	if err := roundTrip(c0, 5*time.Second); err != nil {
		t.Fatalf("before EMFILE: %v", err)
	}

	fmt.Fprintln(stdin, "grab")
	t.Logf("child: %s", line())
	var waiting []net.Conn
	for i := range 5 {
		c, err := net.Dial("tcp", addr) // completes in the kernel backlog
		if err != nil {
			t.Fatalf("dial %d: %v", i, err)
		}
		defer c.Close()
		waiting = append(waiting, c)
	}
	if err := roundTrip(waiting[0], 300*time.Millisecond); !os.IsTimeout(err) {
		t.Fatalf("with no descriptor left: got %v; want the connection to wait in the backlog", err)
	}
	cpu0 := procCPU(t, cmd.Process.Pid)
	time.Sleep(time.Second)
	if used := procCPU(t, cmd.Process.Pid) - cpu0; used > 300*time.Millisecond {
		t.Errorf("CPU used in 1s of EMFILE: got %v; want a backed-off accept loop", used)
	}

	fmt.Fprintln(stdin, "release")
	line()
	for i, c := range waiting {
		if err := roundTrip(c, 5*time.Second); err != nil {
			t.Errorf("waiting connection %d after descriptors were freed: %v; want it served", i, err)
		}
	}
	stdin.Close()
	n, _ := strconv.ParseFloat(strings.TrimPrefix(line(), "accept_errors "), 64)
	// 5ms doubling to 1s over ~1.5s of EMFILE: about 9 attempts, not thousands.
	if n < 3 || n > 30 {
		t.Errorf("child accept_errors_total: got %v; want a backed-off count (3 to 30)", n)
	}
	cmd.Wait()
}

func procCPU(t *testing.T, pid int) time.Duration {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * 10 * time.Millisecond
}
