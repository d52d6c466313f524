package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"go.yaml.in/yaml/v3"
	"golang.org/x/sys/unix"

	steering "github.com/nodeagent/nodeagent/ebpf"
	"github.com/nodeagent/nodeagent/test/privtest"
)

// The test binary re-executes itself as a client that lives in the test
// network namespace (and, when asked, the test cgroup).
const (
	helperEnv   = "NODEAGENT_E2E_HELPER"
	dialRequest = "NODEAGENT_E2E_DIAL"
)

// binary is the nodeagent built by TestMain.
var binary string

func TestMain(m *testing.M) {
	if h := os.Getenv(helperEnv); h != "" {
		if h != "dial" {
			fmt.Fprintln(os.Stderr, "unknown helper", h)
			os.Exit(2)
		}
		os.Exit(helperDial())
	}
	os.Exit(run(m))
}

func run(m *testing.M) int {
	if os.Geteuid() != 0 {
		// Every test skips (or fails, when privileged tests are required) in privtest.Root.
		return m.Run()
	}
	dir, err := os.MkdirTemp("", "nodeagent-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	binary = filepath.Join(dir, "nodeagent")
	build := exec.Command("go", "build", "-o", binary, "./cmd/nodeagent")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build nodeagent: %v\n%s", err, out)
		return 1
	}
	return m.Run()
}

// Addresses inside every test namespace. Its loopback answers all of 127/8, and
// it has no other interface: a 169.254.x.x destination that is not steered fails
// at once with "network is unreachable".
const (
	healthAddr = "127.0.0.1:9874"
	proxyAddr  = "127.0.0.1:15001"
	targetA    = "127.0.0.2:8080" // endpoint of cluster c1
	targetB    = "127.0.0.3:9000"
)

// baseMap is the address map of the brief.
func baseMap() map[string]string {
	return map[string]string{"169.254.1.2": "c1", "169.254.1.4:443": targetB}
}

// world is one test's private host: a network namespace, a cgroup, a bpffs
// mount, the two targets, and a directory for the configuration and logs.
type world struct {
	t      *testing.T
	ns     *privtest.Netns
	cgroup string // steering.cgroup
	mount  string // the temporary bpffs mount
	bpffs  string // steering.bpffs, inside mount
	dir    string
	config string // the configuration file

	preloaded map[string]bool // files the fresh bpffs mount already had

	client *http.Client // reaches the health endpoint inside ns

	nAgents atomic.Int64
}

func newWorld(t *testing.T) *world {
	t.Helper()
	privtest.Root(t)
	if binary == "" {
		t.Fatal("nodeagent binary was not built")
	}
	w := &world{t: t, ns: privtest.NewNetns(t), dir: t.TempDir()}
	w.cgroup = newCgroup(t)
	w.mount = newBPFFS(t)
	w.bpffs = filepath.Join(w.mount, "nodeagent")
	// A new bpf filesystem may come with the kernel's preloaded iterators
	// (maps.debug, progs.debug): those are not the agent's.
	w.preloaded = map[string]bool{}
	for _, p := range w.pins() {
		w.preloaded[p] = true
	}
	w.config = filepath.Join(w.dir, "config.yaml")
	t.Cleanup(func() {
		// A safety net for a test that failed with a killed agent's pins in place;
		// the unmount would drop them too, but not as visibly.
		if err := steering.Cleanup(steering.Options{Cgroup: w.cgroup, BPFFS: w.bpffs}); err != nil {
			t.Errorf("cleanup of %s: %v", w.bpffs, err)
		}
	})
	w.client = &http.Client{
		Timeout: 3 * time.Second,
		Transport: &http.Transport{
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				return w.dialInNetns(ctx, network, addr)
			},
		},
	}
	w.serve(targetA)
	w.serve(targetB)
	return w
}

// dialInNetns dials from the test process, inside the namespace but outside the
// cgroup.
func (w *world) dialInNetns(ctx context.Context, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := w.ns.Do(func() (err error) {
		d := net.Dialer{Timeout: 2 * time.Second}
		c, err = d.DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// serve runs an echo server on addr inside the namespace until the test ends: for
// every line it reads it answers "<its own address> <line>".
func (w *world) serve(addr string) {
	w.t.Helper()
	var ln net.Listener
	if err := w.ns.Do(func() (err error) {
		ln, err = net.Listen("tcp", addr)
		return err
	}); err != nil {
		w.t.Fatalf("listen on %s in %s: %v", addr, w.ns.Name, err)
	}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		conns = map[net.Conn]bool{}
	)
	w.t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns[c] = true
			mu.Unlock()
			wg.Go(func() {
				defer func() {
					mu.Lock()
					delete(conns, c)
					mu.Unlock()
					c.Close()
				}()
				_ = c.SetDeadline(time.Now().Add(30 * time.Second))
				r := bufio.NewReader(c)
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						return
					}
					if _, err := fmt.Fprintf(c, "%s %s\n", c.LocalAddr(), strings.TrimSpace(line)); err != nil {
						return
					}
				}
			})
		}
	})
}

// writeConfig writes the agent's configuration with addressMap; edit, when set,
// changes the document before it is written. The file is replaced atomically, so
// an agent reloading never reads half of it.
func (w *world) writeConfig(addressMap map[string]string, edit func(map[string]any)) {
	w.t.Helper()
	doc := map[string]any{
		"node_name":      "e2e",
		"log":            map[string]any{"format": "text", "level": "debug"},
		"health":         map[string]any{"listen": healthAddr},
		"shutdown_grace": "5s",
		"steering":       map[string]any{"required": true, "cgroup": w.cgroup, "bpffs": w.bpffs},
		"proxy": map[string]any{
			"required":        true,
			"listen":          []string{proxyAddr},
			"connect_timeout": "2s",
			"address_map":     addressMap,
			"clusters":        map[string]any{"c1": map[string]any{"endpoints": []string{targetA}}},
		},
	}
	if edit != nil {
		edit(doc)
	}
	b, err := yaml.Marshal(doc)
	if err != nil {
		w.t.Fatal(err)
	}
	tmp := w.config + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		w.t.Fatal(err)
	}
	if err := os.Rename(tmp, w.config); err != nil {
		w.t.Fatal(err)
	}
}

// agent is one nodeagent process.
type agent struct {
	t    *testing.T
	cmd  *exec.Cmd
	log  string
	done chan struct{} // closed when the process has been reaped
	err  error         // cmd.Wait's result, once done is closed
}

// startAgent starts `nodeagent run --config` entered only into the test
// namespace (so it sees the host's mounts, cgroup and bpffs included). With
// inCgroup the process starts inside the steered cgroup (clone3
// CLONE_INTO_CGROUP), before it opens any socket. The process is killed and
// reaped when the test ends, and its log shown if the test failed.
func (w *world) startAgent(inCgroup bool) *agent {
	w.t.Helper()
	n := w.nAgents.Add(1)
	a := &agent{t: w.t, log: filepath.Join(w.dir, fmt.Sprintf("agent-%d.log", n)), done: make(chan struct{})}
	f, err := os.Create(a.log)
	if err != nil {
		w.t.Fatal(err)
	}
	defer f.Close()
	a.cmd = w.ns.Command(binary, "run", "--config", w.config)
	a.cmd.Stdout, a.cmd.Stderr = f, f
	if inCgroup {
		cg, err := os.Open(w.cgroup)
		if err != nil {
			w.t.Fatal(err)
		}
		defer cg.Close()
		a.cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd())}
	}
	if err := a.cmd.Start(); err != nil {
		w.t.Fatalf("start nodeagent: %v", err)
	}
	go func() {
		a.err = a.cmd.Wait()
		close(a.done)
	}()
	w.t.Cleanup(func() {
		select {
		case <-a.done:
		default:
			_ = a.cmd.Process.Kill()
			<-a.done
		}
		if w.t.Failed() {
			b, _ := os.ReadFile(a.log)
			w.t.Logf("log of nodeagent #%d (pid %d):\n%s", n, a.cmd.Process.Pid, b)
		}
	})
	return a
}

// pid is the agent's pid: nsenter without --fork (or a pid namespace) execs the
// agent in its own process.
func (a *agent) pid() int { return a.cmd.Process.Pid }

func (a *agent) signal(sig os.Signal) {
	a.t.Helper()
	if err := a.cmd.Process.Signal(sig); err != nil {
		a.t.Fatalf("signal %v to nodeagent: %v", sig, err)
	}
}

// wait waits up to d for the agent to exit and returns its exit code (-1 when
// it was killed by a signal).
func (a *agent) wait(d time.Duration) int {
	a.t.Helper()
	select {
	case <-a.done:
	case <-time.After(d):
		a.t.Fatalf("nodeagent did not exit within %v", d)
	}
	var ee *exec.ExitError
	switch {
	case a.err == nil:
		return 0
	case errors.As(a.err, &ee):
		return ee.ExitCode()
	default:
		a.t.Fatalf("wait for nodeagent: %v", a.err)
		return -1
	}
}

// kill9 kills the agent with SIGKILL and reaps it.
func (a *agent) kill9() {
	a.t.Helper()
	a.signal(syscall.SIGKILL)
	if code := a.wait(10 * time.Second); code != -1 {
		a.t.Fatalf("nodeagent after SIGKILL: exit code %d; want killed", code)
	}
}

// waitReady polls /readyz until it answers 200.
func (w *world) waitReady(a *agent) {
	w.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	last := "no answer"
	for time.Now().Before(deadline) {
		select {
		case <-a.done:
			w.t.Fatalf("nodeagent exited before it was ready: %v", a.err)
		default:
		}
		code, body, err := w.get("/readyz")
		if err == nil && code == http.StatusOK {
			return
		}
		if err != nil {
			last = err.Error()
		} else {
			last = fmt.Sprintf("%d %s", code, strings.TrimSpace(body))
		}
		time.Sleep(100 * time.Millisecond)
	}
	w.t.Fatalf("nodeagent not ready within 30s: last /readyz: %s", last)
}

// get fetches a path from the agent's health endpoint.
func (w *world) get(path string) (int, string, error) {
	resp, err := w.client.Get("http://" + healthAddr + path)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// status is the part of /status these tests read.
type status struct {
	Ready  bool `json:"ready"`
	Config struct {
		LoadedAt    time.Time `json:"loaded_at"`
		ReloadError string    `json:"reload_error"`
	} `json:"config"`
}

func (w *world) status() status {
	w.t.Helper()
	code, body, err := w.get("/status")
	if err != nil || code != http.StatusOK {
		w.t.Fatalf("GET /status: %d %v", code, err)
	}
	var s status
	if err := json.Unmarshal([]byte(body), &s); err != nil {
		w.t.Fatalf("/status %q: %v", body, err)
	}
	return s
}

// reload sends SIGHUP and waits for /status to show the new configuration loaded.
func (w *world) reload(a *agent) {
	w.t.Helper()
	loaded := w.status().Config.LoadedAt
	a.signal(syscall.SIGHUP)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		st := w.status()
		if st.Config.ReloadError != "" {
			w.t.Fatalf("reload: %s", st.Config.ReloadError)
		}
		if st.Config.LoadedAt.After(loaded) {
			return
		}
		if time.Now().After(deadline) {
			w.t.Fatalf("/status config.loaded_at still %v 10s after SIGHUP", loaded)
		}
	}
}

// metric returns the sum of the series of name whose labels include labels.
func (w *world) metric(name string, labels map[string]string) float64 {
	w.t.Helper()
	code, body, err := w.get("/metrics")
	if err != nil || code != http.StatusOK {
		w.t.Fatalf("GET /metrics: %d %v", code, err)
	}
	v, ok := metricValue(body, name, labels)
	if !ok {
		w.t.Fatalf("/metrics has no series %s%v", name, labels)
	}
	return v
}

// waitMetric polls /metrics until name{labels} equals want (counters the agent
// updates just after the client saw its answer).
func (w *world) waitMetric(name string, labels map[string]string, want float64) {
	w.t.Helper()
	var got float64
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if got = w.metric(name, labels); got == want {
			return
		}
	}
	w.t.Errorf("%s%v: got %v; want %v", name, labels, got, want)
}

// metricValue parses the Prometheus text format just enough for these tests.
func metricValue(text, name string, labels map[string]string) (float64, bool) {
	var sum float64
	found := false
	for _, line := range strings.Split(text, "\n") {
		if !strings.HasPrefix(line, name) || len(line) == len(name) {
			continue
		}
		rest := line[len(name):]
		got := map[string]string{}
		switch rest[0] {
		case ' ':
		case '{':
			end := strings.LastIndexByte(rest, '}')
			if end < 0 {
				continue
			}
			for _, kv := range strings.Split(rest[1:end], ",") {
				k, v, ok := strings.Cut(kv, "=")
				if ok {
					got[k] = strings.Trim(v, `"`)
				}
			}
			rest = rest[end+1:]
		default:
			continue // another metric whose name starts with name
		}
		match := true
		for k, v := range labels {
			if got[k] != v {
				match = false
			}
		}
		if !match {
			continue
		}
		f, err := strconv.ParseFloat(strings.TrimSpace(rest), 64)
		if err != nil {
			continue
		}
		sum += f
		found = true
	}
	return sum, found
}

// dialResult is what the dial helper reports for one address.
type dialResult struct {
	Addr  string
	Reply string // the answer to "ping"
	Peer  string // getpeername after connect
	Err   string
}

// dialReq is the helper's job, passed as JSON in dialRequest.
type dialReq struct {
	Addrs []string
	Hold  bool // keep the connections open until stdin is closed
}

// client is a running dial helper.
type client struct {
	cmd    *exec.Cmd
	stdin  *os.File // the write end of its stdin
	stdout *bufio.Reader
	stderr *lockedBuffer
	done   chan struct{} // closed when the helper has been reaped
	err    error
}

// lockedBuffer collects a child's stderr; it may be read while the child runs.
type lockedBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// startClient starts the dial helper inside the test namespace, moves it into
// the cgroup when inCgroup, then lets it dial each address once.
func (w *world) startClient(inCgroup, hold bool, addrs ...string) *client {
	w.t.Helper()
	return w.startClientIn(w.ns, inCgroup, hold, addrs...)
}

// startClientIn is startClient in namespace ns.
func (w *world) startClientIn(ns *privtest.Netns, inCgroup, hold bool, addrs ...string) *client {
	w.t.Helper()
	b, _ := json.Marshal(dialReq{Addrs: addrs, Hold: hold})
	c := &client{cmd: ns.Command(os.Args[0], "-test.run=^$"), stderr: &lockedBuffer{}, done: make(chan struct{})}
	c.cmd.Env = append(os.Environ(), helperEnv+"=dial", dialRequest+"="+string(b))
	c.cmd.Stderr = c.stderr
	// Our own pipes, so that reaping the helper never closes what we still read.
	inR, inW, err := os.Pipe()
	if err != nil {
		w.t.Fatal(err)
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		w.t.Fatal(err)
	}
	c.cmd.Stdin, c.cmd.Stdout = inR, outW
	c.stdin, c.stdout = inW, bufio.NewReader(outR)
	err = c.cmd.Start()
	inR.Close()
	outW.Close()
	if err != nil {
		inW.Close()
		outR.Close()
		w.t.Fatalf("start dial helper: %v", err)
	}
	go func() {
		c.err = c.cmd.Wait()
		close(c.done)
	}()
	w.t.Cleanup(func() {
		c.stdin.Close()
		select {
		case <-c.done:
		default:
			_ = c.cmd.Process.Kill()
			<-c.done
		}
		outR.Close()
	})
	if inCgroup {
		// The helper waits for a byte on stdin before it dials.
		if err := os.WriteFile(filepath.Join(w.cgroup, "cgroup.procs"), []byte(strconv.Itoa(c.cmd.Process.Pid)), 0o644); err != nil {
			w.t.Fatalf("move dial helper into %s: %v", w.cgroup, err)
		}
	}
	if _, err := c.stdin.Write([]byte{1}); err != nil {
		w.t.Fatalf("start dialling: %v", err)
	}
	return c
}

// results reads the helper's answer.
func (c *client) results(t *testing.T) []dialResult {
	t.Helper()
	type answer struct {
		line string
		err  error
	}
	ch := make(chan answer, 1)
	go func() {
		line, err := c.stdout.ReadString('\n')
		ch <- answer{line, err}
	}()
	var a answer
	select {
	case a = <-ch:
	case <-time.After(30 * time.Second):
		t.Fatalf("dial helper: no answer within 30s (stderr %s)", c.stderr.String())
	}
	if a.err != nil {
		t.Fatalf("dial helper: %v (stderr %s)", a.err, c.stderr.String())
	}
	var res []dialResult
	if err := json.Unmarshal([]byte(a.line), &res); err != nil {
		t.Fatalf("dial helper output %q: %v", a.line, err)
	}
	return res
}

// again makes a holding helper ping on every connection once more.
func (c *client) again(t *testing.T) []dialResult {
	t.Helper()
	if _, err := c.stdin.Write([]byte{1}); err != nil {
		t.Fatalf("dial helper: %v", err)
	}
	return c.results(t)
}

// release closes the helper's stdin (a holding helper then closes its
// connections) and waits for it to exit.
func (c *client) release(t *testing.T) {
	t.Helper()
	c.stdin.Close()
	select {
	case <-c.done:
		if c.err != nil {
			t.Errorf("dial helper: %v (stderr %s)", c.err, c.stderr.String())
		}
	case <-time.After(10 * time.Second):
		t.Errorf("dial helper did not exit after release")
	}
}

// dial runs the dial helper to completion in the test namespace.
func (w *world) dial(inCgroup bool, addrs ...string) []dialResult {
	w.t.Helper()
	return w.dialIn(w.ns, inCgroup, addrs...)
}

// dialIn runs the dial helper to completion in namespace ns.
func (w *world) dialIn(ns *privtest.Netns, inCgroup bool, addrs ...string) []dialResult {
	w.t.Helper()
	c := w.startClientIn(ns, inCgroup, false, addrs...)
	res := c.results(w.t)
	c.release(w.t)
	return res
}

// expect is what one dial should give: a reply from the target (and
// getpeername showing the dialled address), or an error containing err.
type expect struct {
	addr  string
	reply string
	err   string
}

func steered(addr, target string) expect { return expect{addr: addr, reply: target + " ping"} }
func fails(addr, err string) expect      { return expect{addr: addr, err: err} }

// unreachable is how an unsteered dial to a 169.254.x.x address fails in the
// test namespace: it has no route there.
const unreachable = "network is unreachable"

// checkDials dials every expectation's address in one helper in the test
// namespace and compares.
func (w *world) checkDials(inCgroup bool, want ...expect) {
	w.t.Helper()
	w.checkDialsIn(w.ns, inCgroup, want...)
}

// checkDialsIn is checkDials from namespace ns.
func (w *world) checkDialsIn(ns *privtest.Netns, inCgroup bool, want ...expect) {
	w.t.Helper()
	var addrs []string
	for _, e := range want {
		addrs = append(addrs, e.addr)
	}
	got := w.dialIn(ns, inCgroup, addrs...)
	if len(got) != len(want) {
		w.t.Fatalf("dial helper: got %d results; want %d", len(got), len(want))
	}
	where := "from " + ns.Name + " outside the cgroup"
	if inCgroup {
		where = "from " + ns.Name + " in the cgroup"
	}
	for i, e := range want {
		g := got[i]
		switch {
		case e.err != "":
			if !strings.Contains(g.Err, e.err) {
				w.t.Errorf("dial %s %s: got reply %q error %q; want error %q", e.addr, where, g.Reply, g.Err, e.err)
			}
		default:
			if g.Err != "" || g.Reply != e.reply {
				w.t.Errorf("dial %s %s: got reply %q error %q; want reply %q", e.addr, where, g.Reply, g.Err, e.reply)
			}
			if g.Peer != e.addr {
				w.t.Errorf("dial %s %s: getpeername got %s; want %s", e.addr, where, g.Peer, e.addr)
			}
		}
	}
}

// helperDial is the client process: it waits for a byte on stdin (the parent
// moves it into the cgroup first), dials each address, sends "ping", reads the
// answer, and prints the results as one JSON line. A holding helper then keeps
// its connections: each further byte on stdin pings them all again (one more
// JSON line), and end of file closes them.
func helperDial() int {
	var req dialReq
	if err := json.Unmarshal([]byte(os.Getenv(dialRequest)), &req); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	if _, err := io.ReadFull(os.Stdin, make([]byte, 1)); err != nil {
		fmt.Fprintln(os.Stderr, "wait for go:", err)
		return 2
	}
	var res []dialResult
	conns := make([]net.Conn, len(req.Addrs))
	for i, addr := range req.Addrs {
		var r dialResult
		r, conns[i] = dialOnce(addr)
		res = append(res, r)
	}
	enc := json.NewEncoder(os.Stdout)
	if err := enc.Encode(res); err != nil {
		return 2
	}
	for req.Hold {
		if _, err := io.ReadFull(os.Stdin, make([]byte, 1)); err != nil {
			break
		}
		for i, c := range conns {
			res[i].Reply, res[i].Err = "", ""
			if c == nil {
				res[i].Err = "not connected"
				continue
			}
			res[i].Reply, res[i].Err = ping(c)
		}
		if err := enc.Encode(res); err != nil {
			return 2
		}
	}
	for _, c := range conns {
		if c != nil {
			c.Close()
		}
	}
	return 0
}

// ping sends "ping" on c and returns the answer line.
func ping(c net.Conn) (reply, errText string) {
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := io.WriteString(c, "ping\n"); err != nil {
		return "", fmt.Sprintf("write: %v", err)
	}
	// One byte at a time: a buffered reader would have to live as long as c.
	var line []byte
	b := make([]byte, 1)
	for {
		if _, err := c.Read(b); err != nil {
			return "", fmt.Sprintf("read: %v", err)
		}
		if b[0] == '\n' {
			return string(line), ""
		}
		line = append(line, b[0])
	}
}

func dialOnce(addr string) (dialResult, net.Conn) {
	r := dialResult{Addr: addr}
	c, err := net.DialTimeout("tcp", addr, 3*time.Second)
	if err != nil {
		r.Err = err.Error()
		return r, nil
	}
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err == nil {
		var sa unix.Sockaddr
		var gerr error
		err = rc.Control(func(fd uintptr) { sa, gerr = unix.Getpeername(int(fd)) })
		if err == nil {
			err = gerr
		}
		if p, ok := sa.(*unix.SockaddrInet4); ok {
			r.Peer = netip.AddrPortFrom(netip.AddrFrom4(p.Addr), uint16(p.Port)).String()
		} else if p, ok := sa.(*unix.SockaddrInet6); ok {
			r.Peer = netip.AddrPortFrom(netip.AddrFrom16(p.Addr), uint16(p.Port)).String()
		}
	}
	if err != nil {
		r.Err = fmt.Sprintf("getpeername: %v", err)
		return r, c
	}
	r.Reply, r.Err = ping(c)
	return r, c
}

var cgSeq atomic.Int64

// newCgroup makes an empty cgroup v2 directory under the mount found in
// /proc/mounts and removes it when the test ends.
func newCgroup(t *testing.T) string {
	t.Helper()
	mnt, err := cgroup2Mount()
	if err != nil {
		privtest.Skip(t, err.Error())
	}
	dir := filepath.Join(mnt, fmt.Sprintf("natest-e2e-%d-%d", os.Getpid(), cgSeq.Add(1)))
	if err := os.Mkdir(dir, 0o755); err != nil {
		privtest.Skip(t, fmt.Sprintf("create cgroup: %v", err))
	}
	t.Cleanup(func() {
		// Reaped processes leave the cgroup asynchronously: poll briefly.
		var err error
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
			if err = unix.Rmdir(dir); err == nil || errors.Is(err, unix.ENOENT) {
				return
			}
		}
		t.Errorf("remove cgroup %s: %v", dir, err)
	})
	return dir
}

// cgroup2Mount returns the cgroup v2 mount point from /proc/mounts.
func cgroup2Mount() (string, error) {
	b, err := os.ReadFile("/proc/mounts")
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) >= 3 && f[2] == "cgroup2" {
			// Mount points escape spaces and the like as octal (\040).
			return strconv.Unquote(`"` + strings.ReplaceAll(f[1], `"`, `\"`) + `"`)
		}
	}
	return "", errors.New("no cgroup2 mount in /proc/mounts")
}

// newBPFFS mounts a bpf filesystem on a temporary directory and unmounts it
// when the test ends.
func newBPFFS(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "natest-e2e-bpffs-")
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
		if err := os.Remove(dir); err != nil {
			t.Errorf("remove %s: %v", dir, err)
		}
	})
	return dir
}

// hooks are the cgroup attach points of the steering programs.
var hooks = []struct {
	name   string
	attach ebpf.AttachType
}{
	{"connect4", ebpf.AttachCGroupInet4Connect},
	{"connect6", ebpf.AttachCGroupInet6Connect},
	{"sockops", ebpf.AttachCGroupSockOps},
	{"getpeername4", ebpf.AttachCgroupInet4GetPeername},
	{"getpeername6", ebpf.AttachCgroupInet6GetPeername},
}

// attached returns the ids of the programs attached to the cgroup at each hook.
func (w *world) attached() map[string][]ebpf.ProgramID {
	w.t.Helper()
	f, err := os.Open(w.cgroup)
	if err != nil {
		w.t.Fatal(err)
	}
	defer f.Close()
	out := map[string][]ebpf.ProgramID{}
	for _, h := range hooks {
		res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: h.attach})
		if err != nil {
			w.t.Fatalf("query %s programs on %s: %v", h.name, w.cgroup, err)
		}
		for _, p := range res.Programs {
			out[h.name] = append(out[h.name], p.ID)
		}
	}
	return out
}

// wantAttached checks that every hook has n programs attached.
func (w *world) wantAttached(n int) map[string][]ebpf.ProgramID {
	w.t.Helper()
	got := w.attached()
	for _, h := range hooks {
		if len(got[h.name]) != n {
			w.t.Errorf("programs attached at %s on the cgroup: got %d %v; want %d", h.name, len(got[h.name]), got[h.name], n)
		}
	}
	return got
}

// pins lists the files under the bpffs mount, but for those it came with.
func (w *world) pins() []string {
	w.t.Helper()
	var out []string
	err := filepath.WalkDir(w.mount, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if rel := strings.TrimPrefix(p, w.mount+"/"); !d.IsDir() && !w.preloaded[rel] {
			out = append(out, rel)
		}
		return nil
	})
	if err != nil {
		w.t.Fatalf("walk %s: %v", w.mount, err)
	}
	return out
}

// linkIDs returns the ids of the pinned links, by pin name.
func (w *world) linkIDs() map[string]link.ID {
	w.t.Helper()
	dir := filepath.Join(w.bpffs, "links")
	ents, err := os.ReadDir(dir)
	if err != nil {
		w.t.Fatalf("read %s: %v", dir, err)
	}
	out := map[string]link.ID{}
	for _, e := range ents {
		lk, err := link.LoadPinnedLink(filepath.Join(dir, e.Name()), nil)
		if err != nil {
			w.t.Fatalf("load pinned link %s: %v", e.Name(), err)
		}
		info, err := lk.Info()
		lk.Close()
		if err != nil {
			w.t.Fatalf("info of pinned link %s: %v", e.Name(), err)
		}
		out[e.Name()] = info.ID
	}
	return out
}

// pinnedMapID returns the id of a map pinned under steering.bpffs/maps.
func (w *world) pinnedMapID(name string) ebpf.MapID {
	w.t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(w.bpffs, "maps", name), nil)
	if err != nil {
		w.t.Fatalf("load pinned map %s: %v", name, err)
	}
	defer m.Close()
	info, err := m.Info()
	if err != nil {
		w.t.Fatal(err)
	}
	id, _ := info.ID()
	return id
}
