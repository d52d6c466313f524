package deploytest

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// note is one sd_notify datagram, with the sender's pid from SCM_CREDENTIALS (which
// is how systemd enforces NotifyAccess=main).
type note struct {
	pid  int
	text string
	at   time.Time
}

// notifySocket is a NOTIFY_SOCKET as systemd provides it: a unixgram socket with
// SO_PASSCRED.
type notifySocket struct {
	path  string
	conn  *net.UnixConn
	mu    sync.Mutex
	notes []note
	more  chan struct{} // closed and replaced on every note
}

func newNotifySocket(t *testing.T) *notifySocket {
	t.Helper()
	dir, err := os.MkdirTemp("", "sdnotify")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	n := &notifySocket{path: filepath.Join(dir, "notify.sock"), more: make(chan struct{})}
	n.conn, err = net.ListenUnixgram("unixgram", &net.UnixAddr{Name: n.path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	raw, err := n.conn.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := raw.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_PASSCRED, 1)
	}); err != nil || serr != nil {
		t.Fatalf("SO_PASSCRED: %v %v", err, serr)
	}
	t.Cleanup(func() { n.conn.Close() })
	go n.read()
	return n
}

func (n *notifySocket) read() {
	buf := make([]byte, 4096)
	oob := make([]byte, syscall.CmsgSpace(syscall.SizeofUcred))
	for {
		nb, noob, _, _, err := n.conn.ReadMsgUnix(buf, oob)
		if err != nil {
			return
		}
		pid := 0
		if msgs, err := syscall.ParseSocketControlMessage(oob[:noob]); err == nil {
			for _, m := range msgs {
				if cred, err := syscall.ParseUnixCredentials(&m); err == nil {
					pid = int(cred.Pid)
				}
			}
		}
		n.mu.Lock()
		for _, line := range strings.Split(string(buf[:nb]), "\n") {
			if line != "" {
				n.notes = append(n.notes, note{pid: pid, text: line, at: time.Now()})
			}
		}
		close(n.more)
		n.more = make(chan struct{})
		n.mu.Unlock()
	}
}

// waitFor waits until a note from pid equals text (or, with a trailing "=", starts
// with it), and returns it.
func (n *notifySocket) waitFor(pid int, text string, timeout time.Duration, exited <-chan struct{}) (note, error) {
	deadline := time.After(timeout)
	final := false
	for {
		n.mu.Lock()
		for _, x := range n.notes {
			if x.pid == pid && (x.text == text || (strings.HasSuffix(text, "=") && strings.HasPrefix(x.text, text))) {
				n.mu.Unlock()
				return x, nil
			}
		}
		more := n.more
		n.mu.Unlock()
		if final {
			return note{}, fmt.Errorf("no %q from pid %d before it exited; got %v", text, pid, n.all())
		}
		select {
		case <-more:
		case <-exited:
			// One more look at what arrived before the exit, after the socket had
			// time to deliver it.
			time.Sleep(100 * time.Millisecond)
			final = true
		case <-deadline:
			return note{}, fmt.Errorf("no %q from pid %d within %v; got %v", text, pid, timeout, n.all())
		}
	}
}

func (n *notifySocket) all() []note {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]note(nil), n.notes...)
}

// heldSockets are listening sockets held by the test as systemd holds them for a
// socket unit, in the order of the service's Sockets=.
type heldSockets struct {
	names []string
	addrs map[string]string
	files []*os.File
}

func holdSockets(t *testing.T, names []string) *heldSockets {
	t.Helper()
	h := &heldSockets{names: names, addrs: map[string]string{}}
	for _, name := range names {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		f, err := l.(*net.TCPListener).File()
		if err != nil {
			t.Fatal(err)
		}
		h.addrs[name] = l.Addr().String()
		l.Close() // f holds the socket, as pid 1 does
		h.files = append(h.files, f)
		t.Cleanup(func() { f.Close() })
	}
	return h
}

// agentProc is one nodeagent process started the way systemd starts the service.
type agentProc struct {
	cmd    *exec.Cmd
	pid    int
	exited chan struct{}
	err    error
	log    *bytes.Buffer
}

// cleanEnv is this process's environment without systemd's variables.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch k {
		case "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID":
			continue
		}
		env = append(env, kv)
	}
	return env
}

// startAgent runs `nodeagent run --config cfg` with the held sockets as fds 3.. and
// LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID (the child's own pid: it is set by the shell
// that then execs nodeagent in its place), NOTIFY_SOCKET and WATCHDOG_USEC.
func startAgent(t *testing.T, bin, cfg string, held *heldSockets, notify *notifySocket, watchdog time.Duration) *agentProc {
	t.Helper()
	cmd := exec.Command("/bin/sh", "-c", `LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@"`, bin, "run", "--config", cfg)
	cmd.Env = append(cleanEnv(), "NOTIFY_SOCKET="+notify.path)
	if held != nil {
		cmd.ExtraFiles = held.files
		cmd.Env = append(cmd.Env,
			"LISTEN_FDS="+strconv.Itoa(len(held.files)),
			"LISTEN_FDNAMES="+strings.Join(held.names, ":"))
	}
	if watchdog > 0 {
		cmd.Env = append(cmd.Env, "WATCHDOG_USEC="+strconv.FormatInt(watchdog.Microseconds(), 10))
	}
	p := &agentProc{cmd: cmd, exited: make(chan struct{}), log: &bytes.Buffer{}}
	cmd.Stdout = &lockedWriter{w: p.log}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p.pid = cmd.Process.Pid
	go func() { p.err = cmd.Wait(); close(p.exited) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-p.exited
		if t.Failed() {
			t.Logf("nodeagent pid %d output:\n%s", p.pid, p.output())
		}
	})
	return p
}

func (p *agentProc) output() string {
	w := p.cmd.Stdout.(*lockedWriter)
	w.mu.Lock()
	defer w.mu.Unlock()
	return p.log.String()
}

type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(b)
}

func (p *agentProc) wait(t *testing.T, timeout time.Duration) error {
	t.Helper()
	select {
	case <-p.exited:
		return p.err
	case <-time.After(timeout):
		t.Fatalf("nodeagent pid %d did not exit within %v", p.pid, timeout)
		return nil
	}
}

// harnessConfig writes a config that uses the held addresses and touches nothing on
// the host: no hostprep, uplink, spire or steering; the proxy maps a documentation
// address (never dialled) and the relay exports to a file.
func harnessConfig(t *testing.T, addrs map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	hostRoot := filepath.Join(dir, "host")
	os.MkdirAll(hostRoot, 0o755)
	backend, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { backend.Close() })
	cfg := fmt.Sprintf(`node_name: harness
host_root: %s
log: { format: text, level: debug }
health: { listen: "%s" }
shutdown_grace: 3s
proxy:
  listen: ["%s"]
  connect_timeout: 1s
  address_map: { "192.0.2.10": local }
  clusters: { local: { endpoints: ["%s"] } }
otlp:
  grpc_listen: "%s"
  http_listen: "%s"
  exporter: { protocol: file, path: %s }
  max_request_size: 4MiB
  queue: { dir: %s, max_bytes: 16MiB }
  memory_limit: 64MiB
`, hostRoot, addrs["health"], addrs["proxy"], backend.Addr(), addrs["otlp-grpc"], addrs["otlp-http"],
		filepath.Join(dir, "spans.jsonl"), filepath.Join(dir, "queue"))
	file := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(file, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	return file
}

// dialer keeps connecting to addrs until stopped, and counts refusals.
type dialer struct {
	mu       sync.Mutex
	dials    []time.Time
	refused  []string
	resets   map[string]int // by address: accepted, then reset before connect() returned
	failures []string
	stop     chan struct{}
	done     chan struct{}
}

func startDialer(addrs []string) *dialer {
	d := &dialer{stop: make(chan struct{}), done: make(chan struct{}), resets: map[string]int{}}
	go func() {
		defer close(d.done)
		for {
			for _, a := range addrs {
				start := time.Now()
				c, err := net.DialTimeout("tcp", a, 3*time.Second)
				d.mu.Lock()
				switch {
				case err == nil:
					c.Close()
					d.dials = append(d.dials, start)
				case errors.Is(err, syscall.ECONNREFUSED):
					d.refused = append(d.refused, fmt.Sprintf("%s at %s", a, start.Format("15:04:05.000")))
				case errors.Is(err, syscall.ECONNRESET):
					// The handshake completed and the server reset the connection before
					// this goroutine read the connect result: the proxy does that at once
					// to a connection with no original destination.
					d.resets[a]++
					d.dials = append(d.dials, start)
				default:
					d.failures = append(d.failures, fmt.Sprintf("%s: %v", a, err))
				}
				d.mu.Unlock()
			}
			select {
			case <-d.stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
	}()
	return d
}

func (d *dialer) finish() {
	close(d.stop)
	<-d.done
}

// dialsBetween counts successful connects started in [from, to).
func (d *dialer) dialsBetween(from, to time.Time) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	n := 0
	for _, at := range d.dials {
		if !at.Before(from) && at.Before(to) {
			n++
		}
	}
	return n
}

// pendingRequest sends GET path on a new connection (which may wait in the backlog)
// and returns a channel with the status line of the answer.
func pendingRequest(t *testing.T, addr, path string) <-chan string {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 3*time.Second)
	if err != nil {
		t.Fatalf("connect %s while nodeagent is down: %v (systemd would have held the socket)", addr, err)
	}
	fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: nodeagent\r\nConnection: close\r\n\r\n", path)
	ch := make(chan string, 1)
	go func() {
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(60 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			ch <- "error: " + err.Error()
			return
		}
		ch <- strings.TrimSpace(line)
	}()
	return ch
}

func httpStatus(addr, path string) (int, error) {
	client := &http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get("http://" + addr + path)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}

// checkServed checks that nodeagent serves every held socket: each is accepted from
// (nothing else could accept: the test holds the only other descriptor and never
// accepts).
func checkServed(t *testing.T, addrs map[string]string) {
	t.Helper()
	if code, err := httpStatus(addrs["health"], "/healthz"); err != nil || code != 200 {
		t.Errorf("GET /healthz on the passed health socket: %d %v; want 200", code, err)
	}
	if code, err := httpStatus(addrs["otlp-http"], "/v1/traces"); err != nil || code == 0 {
		t.Errorf("GET /v1/traces on the passed otlp-http socket: %v; want an HTTP answer", err)
	}
	// gRPC: after the HTTP/2 client preface the server sends its SETTINGS frame.
	if err := expectBytes(addrs["otlp-grpc"], "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"); err != nil {
		t.Errorf("HTTP/2 preface on the passed otlp-grpc socket: %v; want a SETTINGS frame", err)
	}
	// The proxy accepts and, with no original destination known for this client (no
	// steering here), closes at once: no open relay. EOF proves it accepted.
	c, err := net.DialTimeout("tcp", addrs["proxy"], 3*time.Second)
	if errors.Is(err, syscall.ECONNRESET) {
		return // accepted and reset before connect() returned: closed, as wanted
	}
	if err != nil {
		t.Errorf("connect to the passed proxy socket: %v", err)
		return
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("proxy connection without an original destination: read %v; want it closed by nodeagent", err)
	}
}

func expectBytes(addr, send string) error {
	c, err := net.DialTimeout("tcp", addr, 3*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, send); err != nil {
		return err
	}
	n, err := c.Read(make([]byte, 9))
	if n == 0 {
		return fmt.Errorf("nothing back: %v", err)
	}
	return nil
}

// The binary under a fake NOTIFY_SOCKET and LISTEN_FDS behaves as nodeagent.service
// expects, and a restart behind held sockets refuses no connection.
func TestSocketActivationRestart(t *testing.T) {
	t.Parallel()
	bin := nodeagentBinary(t)
	s := loadSystemd(t)
	_, names := s.fdNames(t) // exactly what the units pass
	held := holdSockets(t, names)
	cfg := harnessConfig(t, held.addrs)
	notify := newNotifySocket(t)
	const watchdog = 2 * time.Second

	start := func() (*agentProc, time.Time) {
		p := startAgent(t, bin, cfg, held, notify, watchdog)
		ready, err := notify.waitFor(p.pid, "READY=1", 60*time.Second, p.exited)
		if err != nil {
			t.Fatalf("%v\nnodeagent output:\n%s", err, p.output())
		}
		return p, ready.at
	}

	a, _ := start()
	if _, err := notify.waitFor(a.pid, "STATUS=", 5*time.Second, a.exited); err != nil {
		t.Errorf("no STATUS= line: %v", err)
	}
	if _, err := notify.waitFor(a.pid, "WATCHDOG=1", 2*watchdog, a.exited); err != nil {
		t.Errorf("WATCHDOG_USEC=%d: %v", watchdog.Microseconds(), err)
	}
	checkServed(t, held.addrs)

	d := startDialer([]string{held.addrs["proxy"], held.addrs["health"], held.addrs["otlp-grpc"], held.addrs["otlp-http"]})
	time.Sleep(200 * time.Millisecond)

	type window struct {
		what     string
		from, to time.Time
	}
	var windows []window

	// A graceful stop (systemctl restart): STOPPING=1, exit 0, start again.
	a.cmd.Process.Signal(syscall.SIGTERM)
	if _, err := notify.waitFor(a.pid, "STOPPING=1", 10*time.Second, a.exited); err != nil {
		t.Errorf("SIGTERM: %v", err)
	}
	if err := a.wait(t, 15*time.Second); err != nil {
		t.Errorf("after SIGTERM nodeagent exited with %v; want 0", err)
	}
	down := time.Now()
	answer := pendingRequest(t, held.addrs["health"], "/readyz")
	time.Sleep(300 * time.Millisecond)
	b, up := start()
	windows = append(windows, window{"SIGTERM restart", down, up})
	// Answered by the restarted process: 200, or 503 while its checks start.
	if got := <-answer; !strings.HasPrefix(got, "HTTP/1.1 200") && !strings.HasPrefix(got, "HTTP/1.1 503") {
		t.Errorf("GET /readyz sent while nodeagent was stopped got %q; want an answer from the restarted one", got)
	}

	// A crash (Restart=on-failure after SIGKILL): no STOPPING=1, start again.
	b.cmd.Process.Kill()
	b.wait(t, 10*time.Second)
	down = time.Now()
	answer = pendingRequest(t, held.addrs["health"], "/healthz")
	time.Sleep(300 * time.Millisecond)
	c, up := start()
	windows = append(windows, window{"SIGKILL restart", down, up})
	if got := <-answer; !strings.HasPrefix(got, "HTTP/1.1 200") {
		t.Errorf("request sent while nodeagent was dead got %q; want HTTP/1.1 200 from the restarted one", got)
	}
	checkServed(t, held.addrs)

	time.Sleep(200 * time.Millisecond)
	d.finish()
	if len(d.refused) > 0 {
		t.Errorf("%d connections refused across restarts; want none: %v", len(d.refused), d.refused[:min(len(d.refused), 10)])
	}
	if len(d.failures) > 0 {
		t.Errorf("%d connects failed: %v", len(d.failures), d.failures[:min(len(d.failures), 10)])
	}
	for a, n := range d.resets {
		if a != held.addrs["proxy"] {
			t.Errorf("%d connects to %s reset; only the proxy resets connections it cannot map", n, a)
		}
	}
	for _, w := range windows {
		n := d.dialsBetween(w.from, w.to)
		t.Logf("%s: no nodeagent for %v, %d connects succeeded meanwhile (queued in the held sockets)", w.what, w.to.Sub(w.from).Round(time.Millisecond), n)
		if n == 0 {
			t.Errorf("%s: no connect happened while nodeagent was down; the test proved nothing", w.what)
		}
	}
	for _, n := range notify.all() {
		if n.pid != a.pid && n.pid != b.pid && n.pid != c.pid {
			t.Errorf("notification %q from pid %d, not the main process: NotifyAccess=main would drop it", n.text, n.pid)
		}
	}

	c.cmd.Process.Signal(syscall.SIGTERM)
	if err := c.wait(t, 15*time.Second); err != nil {
		t.Errorf("final SIGTERM: exit %v; want 0", err)
	}
}
