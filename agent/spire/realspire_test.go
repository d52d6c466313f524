package spire

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"golang.org/x/sys/unix"

	"github.com/nodeagent/nodeagent/agent/health"
	"github.com/nodeagent/nodeagent/test/peers"
	"github.com/nodeagent/nodeagent/test/privtest"
)

const (
	realNodeID      = "spiffe://example.org/nodeagent"
	realCollectorID = "spiffe://example.org/collector"
	helperGID       = 4242 // the mTLS server helper's gid: selects the collector entry only
	helperEnv       = "NODEAGENT_SPIRE_TEST_HELPER"
)

// agentPID finds the SPIRE agent's pid from the kernel's peer credentials of a
// connection to its socket, the same way the agent attests its own clients.
func agentPID(t *testing.T, socket string) int {
	t.Helper()
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: socket, Net: "unix"})
	if err != nil {
		t.Fatalf("dial agent socket: %v", err)
	}
	defer func() { _ = c.Close() }()
	raw, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		t.Fatal(err)
	}
	if credErr != nil {
		t.Fatalf("SO_PEERCRED: %v", credErr)
	}
	exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", cred.Pid))
	if filepath.Base(exe) != "spire-agent" {
		t.Fatalf("peer of %s is pid %d (%s); want spire-agent", socket, cred.Pid, exe)
	}
	return int(cred.Pid)
}

func TestRealSpire(t *testing.T) {
	sp := peers.StartSpire(t, "")
	privileged := os.Geteuid() == 0

	opts := Options{HostRoot: "/", Socket: sp.AgentSocket, Resync: time.Second}
	if privileged {
		// A directory of its own: published by a bind mount.
		expDir, err := os.MkdirTemp("", "spx")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = os.RemoveAll(expDir) })
		t.Cleanup(func() {
			for unix.Unmount(expDir, unix.MNT_DETACH) == nil {
			}
		})
		opts.ExposeAt = filepath.Join(expDir, "api.sock")
	} else {
		opts.ExposeAt = filepath.Join(filepath.Dir(sp.AgentSocket), "workload.sock")
	}
	t.Logf("socket %s, expose_at %s", opts.Socket, opts.ExposeAt)

	// The agent is not running yet when nodeagent starts.
	sp.StopAgent(t)
	rec := health.NewRecorder()
	reg := prometheus.NewRegistry()
	s, err := New(opts, testLog(t), reg, rec)
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{t: t, opts: opts, rec: rec, reg: reg, sp: s}
	f.run()
	f.waitDetail(false, "socket absent: "+sp.AgentSocket, 10*time.Second)

	sp.StartAgent(t)
	f.waitDetail(true, "serving, no identity issued", 15*time.Second)

	// An entry for this process (uid and gid, so the helper below does not match it).
	sp.CreateEntry(t, realNodeID, "unix:uid:"+strconv.Itoa(os.Getuid()), "unix:gid:"+strconv.Itoa(os.Getgid()))
	res := f.waitDetail(true, "serving, "+realNodeID+" (trust domain example.org), expires ", 30*time.Second)
	t.Logf("spire check: %s", res.Detail)
	if got := testutil.ToFloat64(s.m.expiry); got < float64(time.Now().Add(30*time.Minute).Unix()) {
		t.Errorf("got svid expiry metric %v; want about an hour from now (1h ttl)", got)
	}
	if got := testutil.ToFloat64(s.m.socketUp); got != 1 {
		t.Errorf("got socket_up %v; want 1", got)
	}
	if r := Check(context.Background(), opts); !r[0].OK || !strings.Contains(r[0].Detail, realNodeID) {
		t.Errorf("one-shot Check: got %+v; want ok with %s", r[0], realNodeID)
	}
	f.fake = nil
	reachesReal(t, opts.ExposeAt, realNodeID)

	// Killing the agent fails the check within a few seconds.
	pid := agentPID(t, sp.AgentSocket)
	killed := time.Now()
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatalf("kill spire-agent %d: %v", pid, err)
	}
	f.waitDetail(false, "not serving", 5*time.Second)
	t.Logf("agent SIGKILL detected after %v", time.Since(killed).Round(time.Millisecond))
	for deadline := time.Now().Add(10 * time.Second); sp.AgentRunning(); {
		if time.Now().After(deadline) {
			t.Fatalf("spire-agent %d still running 10s after SIGKILL", pid)
		}
		time.Sleep(20 * time.Millisecond)
	}

	// Restarted: it re-creates its socket; the check recovers and the published path
	// reaches the new socket.
	restarted := time.Now()
	sp.StartAgent(t)
	f.waitDetail(true, "serving, "+realNodeID, 30*time.Second)
	t.Logf("recovered %v after the agent restart began", time.Since(restarted).Round(time.Millisecond))
	if newPID := agentPID(t, sp.AgentSocket); newPID == pid {
		t.Fatalf("agent pid unchanged (%d) after restart", pid)
	}
	reachesReal(t, opts.ExposeAt, realNodeID)

	if privileged {
		t.Run("mTLS", func(t *testing.T) { testRealMTLS(t, sp, s) })
	} else {
		t.Run("mTLS", func(t *testing.T) { privtest.Skip(t, "the mTLS server helper needs root to run with another gid") })
	}
}

// reachesReal fetches the X.509 context through path as this process.
func reachesReal(t *testing.T, path, want string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	x, err := fetchOnce(ctx, path)
	if err != nil {
		t.Fatalf("fetch through %s: %v", path, err)
	}
	if got := x.DefaultSVID().ID.String(); got != want {
		t.Fatalf("fetch through %s: got %s; want %s", path, got, want)
	}
}

// testRealMTLS: a TLS server with the collector's real SVID (a second entry, matched by
// the helper process's gid) that authorises only the node's SPIFFE ID; the node's
// client config reaches it and refuses a server with a wrong ID.
func testRealMTLS(t *testing.T, sp *peers.Spire, s *Spire) {
	sp.CreateEntry(t, realCollectorID, "unix:gid:"+strconv.Itoa(helperGID))

	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperMTLSServer$", "-test.count=1")
	cmd.Env = append(os.Environ(), helperEnv+"=1", "HELPER_SOCKET="+sp.AgentSocket, "HELPER_AUTHORIZE="+realNodeID)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 0, Gid: helperGID}, Pdeathsig: syscall.SIGKILL}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start mtls server helper: %v", err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	lines := bufio.NewScanner(stdout)
	addrc := make(chan string, 1)
	go func() {
		for lines.Scan() {
			if a, ok := strings.CutPrefix(lines.Text(), "ADDR "); ok {
				addrc <- a
				_, _ = io.Copy(io.Discard, stdout)
				return
			}
		}
		close(addrc)
	}()
	var addr string
	select {
	case a, ok := <-addrc:
		if !ok {
			t.Fatalf("mtls server helper exited without an address: %s", stderr.String())
		}
		addr = a
	case <-time.After(60 * time.Second):
		t.Fatalf("mtls server helper gave no address within 60s: %s", stderr.String())
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cfg, err := s.MTLSClientConfig(ctx, spiffeid.RequireFromString(realCollectorID))
	if err != nil {
		t.Fatal(err)
	}
	var reply string
	deadline := time.Now().Add(20 * time.Second)
	for {
		reply, err = tlsRoundTrip(addr, cfg)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("mTLS to the collector with the node's SVID: %v (helper: %s)", err, stderr.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	if want := "peer " + realNodeID; reply != want {
		t.Errorf("server answered %q; want %q", reply, want)
	}
	t.Logf("mTLS with real SVIDs: %s", reply)

	wrongCfg, err := s.MTLSClientConfig(ctx, spiffeid.RequireFromString("spiffe://example.org/not-the-collector"))
	if err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(20 * time.Second)
	for {
		_, err = tlsRoundTrip(addr, wrongCfg)
		if err != nil && strings.Contains(err.Error(), "unexpected ID") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("mTLS to the collector while expecting another ID: got %v; want an unexpected ID refusal", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func tlsRoundTrip(addr string, cfg *tls.Config) (string, error) {
	d := &tls.Dialer{Config: cfg, NetDialer: &net.Dialer{Timeout: 5 * time.Second}}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return "", err
	}
	defer func() { _ = c.Close() }()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSpace(line), err
}

// TestHelperMTLSServer is not a test: run by testRealMTLS as a separate process with
// another gid, it serves TLS with its own SVID from the Workload API, authorising only
// HELPER_AUTHORIZE, and answers each accepted client with "peer <its SPIFFE ID>".
func TestHelperMTLSServer(t *testing.T) {
	if os.Getenv(helperEnv) != "1" {
		t.Skip("helper process for TestRealSpire")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	src, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(clientOptions(os.Getenv("HELPER_SOCKET"))...))
	cancel()
	if err != nil {
		fmt.Fprintf(os.Stderr, "x509 source: %v\n", err)
		os.Exit(1)
	}
	defer func() { _ = src.Close() }()
	allowed := spiffeid.RequireFromString(os.Getenv("HELPER_AUTHORIZE"))
	lis, err := tls.Listen("tcp", "127.0.0.1:0", tlsconfig.MTLSServerConfig(src, src, tlsconfig.AuthorizeID(allowed)))
	if err != nil {
		fmt.Fprintf(os.Stderr, "listen: %v\n", err)
		os.Exit(1)
	}
	if svid, err := src.GetX509SVID(); err == nil {
		fmt.Fprintf(os.Stderr, "helper serving as %s\n", svid.ID)
	}
	fmt.Printf("ADDR %s\n", lis.Addr())
	for {
		c, err := lis.Accept()
		if err != nil {
			os.Exit(0)
		}
		go func() {
			defer func() { _ = c.Close() }()
			tc := c.(*tls.Conn)
			_ = tc.SetDeadline(time.Now().Add(10 * time.Second))
			if err := tc.Handshake(); err != nil {
				return
			}
			id, err := x509svid.IDFromCert(tc.ConnectionState().PeerCertificates[0])
			if err != nil {
				return
			}
			_, _ = fmt.Fprintf(tc, "peer %s\n", id)
		}()
	}
}
