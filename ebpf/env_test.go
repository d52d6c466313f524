package ebpf

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/nodeagent/nodeagent/agent/health"
	"github.com/nodeagent/nodeagent/test/privtest"
)

var (
	proxy4 = netip.MustParseAddrPort("127.0.0.1:15001")
	proxy6 = netip.MustParseAddrPort("[::1]:15001")
	podIP  = netip.MustParseAddr("10.99.0.1")
	podDst = netip.AddrPortFrom(podIP, 15001)
)

// testIntercepts are the mapped destinations of the tests.
func testIntercepts() []Intercept {
	var out []Intercept
	for _, s := range []string{"169.254.1.2", "169.254.1.4:443", "fd00::2"} {
		i, err := ParseIntercept(s)
		if err != nil {
			panic(err)
		}
		out = append(out, i)
	}
	return out
}

// env is one privileged test's world: a cgroup, a bpffs, a network namespace
// "host" (whose cookie steering treats as the host's) with the mapped and
// unmapped addresses on its loopback, a listener on port 80 of every address
// that answers "direct <local>", and a test proxy on the proxy addresses that
// answers "proxy <original destination> | <what the target said>".
type env struct {
	t      testing.TB
	cgroup string
	bpffs  string
	host   *privtest.Netns

	steer  atomic.Pointer[Steering]
	relay  atomic.Bool  // proxy dials the original destination and relays its first line
	missed atomic.Int64 // accepted connections whose original destination was not found
	proxyd atomic.Int64 // accepted connections
}

func newEnv(t testing.TB) *env {
	t.Helper()
	privtest.Root(t)
	e := &env{t: t, cgroup: newCgroup(t), bpffs: newBPFFS(t), host: privtest.NewNetns(t)}
	e.relay.Store(true)
	for _, a := range []string{"169.254.1.2/32", "169.254.1.4/32", "169.254.1.9/32"} {
		e.ip(e.host, "addr", "add", a, "dev", "lo")
	}
	for _, a := range []string{"fd00::2/128", "fd00::9/128"} {
		e.ip(e.host, "-6", "addr", "add", a, "dev", "lo", "nodad")
	}
	e.listen(e.host, "tcp", ":80", e.serveDirect)
	e.listen(e.host, "tcp4", proxy4.String(), e.serveProxy)
	e.listen(e.host, "tcp6", proxy6.String(), e.serveProxy)
	return e
}

func (e *env) ip(ns *privtest.Netns, args ...string) {
	e.t.Helper()
	if out, err := ns.Command("ip", args...).CombinedOutput(); err != nil {
		e.t.Fatalf("ip %s in %s: %v: %s", strings.Join(args, " "), ns.Name, err, out)
	}
}

// listen opens a listener inside ns and serves it until the test ends.
func (e *env) listen(ns *privtest.Netns, network, addr string, serve func(net.Conn)) {
	e.t.Helper()
	var ln net.Listener
	if err := ns.Do(func() (err error) {
		ln, err = net.Listen(network, addr)
		return err
	}); err != nil {
		e.t.Fatalf("listen %s %s in %s: %v", network, addr, ns.Name, err)
	}
	var wg sync.WaitGroup
	e.t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(5 * time.Second))
				serve(c)
			}()
		}
	}()
}

func (e *env) serveDirect(c net.Conn) {
	fmt.Fprintf(c, "direct %s\n", c.LocalAddr())
}

func (e *env) serveProxy(c net.Conn) {
	e.proxyd.Add(1)
	peer := c.RemoteAddr().(*net.TCPAddr).AddrPort()
	var orig netip.AddrPort
	ok := false
	if s := e.steer.Load(); s != nil {
		orig, ok = s.OriginalDst(peer)
	}
	if !ok {
		e.missed.Add(1)
		fmt.Fprintf(c, "proxy none\n")
		return
	}
	if !e.relay.Load() {
		fmt.Fprintf(c, "proxy %s\n", orig)
		return
	}
	// The proxy runs in the "host" namespace; its upstream dial is marked.
	d := net.Dialer{Timeout: 2 * time.Second, Control: UpstreamControl}
	var up net.Conn
	err := e.host.Do(func() (err error) {
		up, err = d.Dial("tcp", orig.String())
		return err
	})
	if err != nil {
		fmt.Fprintf(c, "proxy %s | error %v\n", orig, err)
		return
	}
	defer up.Close()
	_ = up.SetDeadline(time.Now().Add(2 * time.Second))
	line, _ := bufio.NewReader(up).ReadString('\n')
	fmt.Fprintf(c, "proxy %s | %s\n", orig, strings.TrimSpace(line))
}

// options returns steering options for this env.
func (e *env) options() Options {
	return Options{
		Cgroup:     e.cgroup,
		BPFFS:      e.bpffs,
		HostNetns:  e.host.Path,
		ProxyAddr4: proxy4,
		ProxyAddr6: proxy6,
		Intercepts: testIntercepts(),
	}
}

// start runs a Steering with opts until the test ends (or stop is called) and
// waits for it to report attached.
func (e *env) start(opts Options) (s *Steering, rec *health.Recorder, reg *prometheus.Registry, stop func() error) {
	e.t.Helper()
	rec = health.NewRecorder()
	reg = prometheus.NewRegistry()
	s, err := New(opts, slog.New(slog.NewTextHandler(testWriter{e.t}, nil)), reg, rec)
	if err != nil {
		e.t.Fatalf("New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- s.Run(ctx) }()
	var once sync.Once
	var runErr error
	stop = func() error {
		once.Do(func() {
			cancel()
			runErr = <-errc
			e.steer.CompareAndSwap(s, nil)
		})
		return runErr
	}
	e.t.Cleanup(func() {
		if err := stop(); err != nil {
			e.t.Errorf("Run: %v", err)
		}
	})
	if res, ok := rec.WaitFor(health.Steering, 20*time.Second, func(r health.Result) bool { return r.OK }); !ok {
		e.t.Fatalf("steering check: got %+v; want OK", res)
	}
	e.steer.Store(s)
	return s, rec, reg, stop
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// dial runs the dial helper in ns, inside the test cgroup when inCgroup.
func (e *env) dial(ns *privtest.Netns, inCgroup bool, req dialRequest) dialResult {
	e.t.Helper()
	b, _ := json.Marshal(req)
	cmd := ns.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"=dial", "DIAL_REQUEST="+string(b),
		// No preemption signals: a blocking connect() interrupted by one
		// cannot simply be retried.
		"GODEBUG=asyncpreemptoff=1")
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		e.t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		e.t.Fatalf("start dial helper: %v", err)
	}
	if inCgroup {
		if err := os.WriteFile(filepath.Join(e.cgroup, "cgroup.procs"), []byte(strconv.Itoa(cmd.Process.Pid)), 0o644); err != nil {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
			e.t.Fatalf("move helper into %s: %v", e.cgroup, err)
		}
	}
	_, _ = stdin.Write([]byte{1})
	_ = stdin.Close()
	if err := cmd.Wait(); err != nil {
		e.t.Fatalf("dial helper %+v: %v: %s", req, err, stderr.String())
	}
	var res dialResult
	if err := json.Unmarshal([]byte(stdout.String()), &res); err != nil {
		e.t.Fatalf("dial helper output %q: %v (stderr %s)", stdout.String(), err, stderr.String())
	}
	return res
}

var cgSeq atomic.Int64

// newCgroup makes an empty cgroup v2 directory under the mount found in
// /proc/mounts and removes it when the test ends.
func newCgroup(t testing.TB) string {
	t.Helper()
	f, err := os.Open("/proc/mounts")
	if err != nil {
		t.Fatal(err)
	}
	mnt, err := cgroup2Mount(f)
	f.Close()
	if err != nil {
		privtest.Skip(t, err.Error())
	}
	dir := filepath.Join(mnt, fmt.Sprintf("natest-ebpf-%d-%d", os.Getpid(), cgSeq.Add(1)))
	if err := os.Mkdir(dir, 0o755); err != nil {
		privtest.Skip(t, fmt.Sprintf("create cgroup: %v", err))
	}
	t.Cleanup(func() {
		// Exited helpers leave the cgroup once reaped; give the kernel a moment.
		var err error
		for range 50 {
			if err = unix.Rmdir(dir); err == nil || errors.Is(err, unix.ENOENT) {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Errorf("remove cgroup %s: %v", dir, err)
	})
	return dir
}

// newBPFFS mounts a bpf filesystem on a temporary directory.
func newBPFFS(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "natest-bpffs-")
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		os.Remove(dir)
		privtest.Skip(t, fmt.Sprintf("mount bpffs: %v", err))
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
		os.Remove(dir)
	})
	return filepath.Join(dir, "nodeagent")
}
