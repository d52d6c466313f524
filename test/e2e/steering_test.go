package e2e

import (
	"bufio"
	"errors"
	"io"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nodeagent/nodeagent/test/privtest"
)

// TestSteeredConnectionReachesTarget: a process in the cgroup dialling mapped
// addresses reaches the mapped targets through the real agent's proxy and sees
// the address it dialled; nothing else is steered; the proxy port is no open
// relay; the counters move.
func TestSteeredConnectionReachesTarget(t *testing.T) {
	t.Parallel()
	w := newWorld(t)
	w.writeConfig(baseMap(), nil)
	a := w.startAgent(false)
	w.waitReady(a)

	// How each series must move over the dials below.
	counts := []struct {
		metric string
		labels map[string]string
		delta  float64
	}{
		{"nodeagent_steering_redirects_total", map[string]string{"family": "ipv4"}, 3},
		{"nodeagent_proxy_connections_total", map[string]string{"mapping": "169.254.1.2", "result": "connected"}, 2},
		{"nodeagent_proxy_connections_total", map[string]string{"mapping": "169.254.1.4:443", "result": "connected"}, 1},
		{"nodeagent_proxy_connections_total", map[string]string{"mapping": "none", "result": "no_original_dst"}, 1},
	}
	before := make([]float64, len(counts))
	for i, c := range counts {
		before[i] = w.metric(c.metric, c.labels)
	}

	w.checkDials(true,
		steered("169.254.1.2:80", targetA),
		steered("169.254.1.2:8443", targetA), // any port of an IP key
		steered("169.254.1.4:443", targetB),
		fails("169.254.1.4:80", unreachable), // another port of an IP:port key
		fails("169.254.1.9:80", unreachable), // unmapped
	)
	w.checkDials(false, fails("169.254.1.2:80", unreachable))

	// Someone dialling the proxy port directly is closed at once, unanswered.
	// The reset can come so fast that connect itself reports it.
	if n, err := directProxyDial(t, w); n != 0 || !closedAtOnce(err) {
		t.Errorf("direct connection to the proxy: got %d bytes, %v; want closed at once (EOF or reset)", n, err)
	}

	for i, c := range counts {
		w.waitMetric(c.metric, c.labels, before[i]+c.delta)
	}
}

// directProxyDial connects to the proxy port from inside the namespace, outside
// the cgroup, sends a line and reads: it returns what was read and the error
// that ended it.
func directProxyDial(t *testing.T, w *world) (int, error) {
	c, err := w.dialInNetns(t.Context(), "tcp", proxyAddr)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	_, _ = io.WriteString(c, "ping\n")
	return bufio.NewReader(c).Read(make([]byte, 64))
}

func closedAtOnce(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)
}

// TestReloadUpdatesMapInPlace: after SIGHUP with a new address map, an added
// address is steered and a removed one is not, with the same links and
// programs attached throughout.
func TestReloadUpdatesMapInPlace(t *testing.T) {
	t.Parallel()
	w := newWorld(t)
	w.writeConfig(baseMap(), nil)
	a := w.startAgent(false)
	w.waitReady(a)
	w.checkDials(true, steered("169.254.1.4:443", targetB), fails("169.254.1.5:80", unreachable))
	links := w.linkIDs()
	progs := w.wantAttached(1)

	next := baseMap()
	delete(next, "169.254.1.4:443")
	next["169.254.1.5"] = targetB
	w.writeConfig(next, nil)
	w.reload(a)

	w.checkDials(true,
		steered("169.254.1.5:80", targetB),
		steered("169.254.1.2:80", targetA),
		fails("169.254.1.4:443", unreachable),
	)
	if got := w.linkIDs(); !maps.Equal(got, links) {
		t.Errorf("pinned links after reload: got %v; want unchanged %v", got, links)
	}
	if got := w.wantAttached(1); !maps.EqualFunc(got, progs, slices.Equal) {
		t.Errorf("attached programs after reload: got %v; want unchanged %v", got, progs)
	}
	w.waitMetric("nodeagent_config_reloads_total", map[string]string{"result": "success"}, 1)
	if code, body, err := w.get("/readyz"); err != nil || code != 200 {
		t.Errorf("/readyz after reload: got %d %q %v; want 200", code, body, err)
	}

	// A broken file changes nothing: the running map stays in force.
	w.writeConfig(map[string]string{"169.254.1.7": "c1"}, func(doc map[string]any) { doc["proxy"].(map[string]any)["listn"] = []string{proxyAddr} })
	a.signal(syscall.SIGHUP)
	for deadline := time.Now().Add(10 * time.Second); w.status().Config.ReloadError == ""; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("/status shows no reload_error 10s after SIGHUP with a broken file")
		}
	}
	w.waitMetric("nodeagent_config_reloads_total", map[string]string{"result": "failure"}, 1)
	w.checkDials(true, steered("169.254.1.5:80", targetB), fails("169.254.1.7:80", unreachable))
	if got := w.linkIDs(); !maps.Equal(got, links) {
		t.Errorf("pinned links after a failed reload: got %v; want unchanged %v", got, links)
	}
}

// TestKill9AndRestart: a killed agent leaves its programs attached (mapped
// destinations then fail closed, refused at the dead proxy port); a new agent
// takes them over in place; `run --cleanup` after another kill removes
// everything.
func TestKill9AndRestart(t *testing.T) {
	t.Parallel()
	w := newWorld(t)
	w.writeConfig(baseMap(), nil)
	a := w.startAgent(false)
	w.waitReady(a)
	w.checkDials(true, steered("169.254.1.2:80", targetA))
	mapID := w.pinnedMapID("orig_by_client")

	a.kill9()
	w.wantAttached(1)
	w.checkDials(true, fails("169.254.1.2:80", "connection refused"))

	b := w.startAgent(false)
	w.waitReady(b)
	w.wantAttached(1)
	if got := w.pinnedMapID("orig_by_client"); got != mapID {
		t.Errorf("orig_by_client map after restart: got id %d; want the pinned one, %d", got, mapID)
	}
	w.checkDials(true, steered("169.254.1.2:80", targetA), steered("169.254.1.4:443", targetB))

	b.kill9()
	w.wantAttached(1)
	if len(w.pins()) == 0 {
		t.Fatal("no pins left by the killed agent: nothing for --cleanup to do")
	}
	cmd := w.ns.Command(binary, "run", "--cleanup", "--config", w.config)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nodeagent run --cleanup: %v\n%s", err, out)
	}
	w.wantAttached(0)
	if p := w.pins(); len(p) != 0 {
		t.Errorf("pins after run --cleanup: got %v; want none", p)
	}
	w.checkDials(true, fails("169.254.1.2:80", unreachable))
}

// TestProxyUpstreamNotResteered: the agent itself runs in the steered cgroup.
// Its upstream connections are made from inside that cgroup, carry the
// upstream mark, and are not steered back to the proxy: steering works.
func TestProxyUpstreamNotResteered(t *testing.T) {
	t.Parallel()
	w := newWorld(t)
	w.writeConfig(baseMap(), nil)
	a := w.startAgent(true)
	w.waitReady(a)
	cg, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(a.pid()), "cgroup"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(cg), "/"+filepath.Base(w.cgroup)+"\n") {
		t.Fatalf("agent's /proc/%d/cgroup: got %q; want it in %s", a.pid(), cg, w.cgroup)
	}
	redirects := map[string]string{"family": "ipv4"}
	before := w.metric("nodeagent_steering_redirects_total", redirects)

	c := w.startClient(true, true, "169.254.1.2:80")
	res := c.results(t)
	if len(res) != 1 || res[0].Err != "" || res[0].Reply != targetA+" ping" || res[0].Peer != "169.254.1.2:80" {
		t.Fatalf("dial 169.254.1.2:80 with the agent in the cgroup: got %+v; want reply %q", res, targetA+" ping")
	}
	// While the client holds its connection, the agent's upstream socket to the
	// endpoint is there to inspect: the agent's, in the cgroup, marked.
	out, err := w.ns.Command("ss", "-Htnep", "state", "established", "dst", targetA).CombinedOutput()
	if err != nil {
		t.Fatalf("ss: %v: %s", err, out)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) != 1 {
		t.Fatalf("sockets to %s: got %q; want one, the agent's upstream", targetA, out)
	}
	for _, want := range []string{"pid=" + strconv.Itoa(a.pid()) + ",", "fwmark:0x6e", "cgroup:/" + filepath.Base(w.cgroup)} {
		if !strings.Contains(lines[0], want) {
			t.Errorf("agent's upstream socket: got %q; want %q in it", lines[0], want)
		}
	}
	c.release(t)
	w.waitMetric("nodeagent_steering_redirects_total", redirects, before+1)
}

// TestGracefulStop: SIGTERM makes the agent exit 0 within shutdown_grace,
// detached and unpinned (keep_on_exit is false by default).
func TestGracefulStop(t *testing.T) {
	t.Parallel()
	w := newWorld(t)
	const grace = 5 * time.Second // shutdown_grace in writeConfig
	w.writeConfig(baseMap(), nil)
	a := w.startAgent(false)
	w.waitReady(a)
	w.checkDials(true, steered("169.254.1.2:80", targetA))
	w.wantAttached(1)

	a.signal(syscall.SIGTERM)
	if code := a.wait(grace); code != 0 {
		t.Errorf("exit code after SIGTERM: got %d; want 0", code)
	}
	w.wantAttached(0)
	if p := w.pins(); len(p) != 0 {
		t.Errorf("pins after SIGTERM: got %v; want none", p)
	}
	w.checkDials(true, fails("169.254.1.2:80", unreachable))
}

// TestReloadKeepsEstablishedConnections: a reload leaves established
// connections alone; those of a removed mapping end at drain_timeout, the
// others keep running.
func TestReloadKeepsEstablishedConnections(t *testing.T) {
	t.Parallel()
	w := newWorld(t)
	// Long enough for the check right after the reload on a loaded machine.
	drain := func(doc map[string]any) { doc["proxy"].(map[string]any)["drain_timeout"] = "3s" }
	w.writeConfig(baseMap(), drain)
	a := w.startAgent(false)
	w.waitReady(a)
	c := w.startClient(true, true, "169.254.1.2:80", "169.254.1.4:443")
	if res := c.results(t); res[0].Reply != targetA+" ping" || res[1].Reply != targetB+" ping" {
		t.Fatalf("held connections: got %+v", res)
	}

	next := baseMap()
	delete(next, "169.254.1.4:443")
	w.writeConfig(next, drain)
	w.reload(a)
	if res := c.again(t); res[0].Reply != targetA+" ping" || res[1].Reply != targetB+" ping" {
		t.Fatalf("held connections right after reload: got %+v; want both answering", res)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		res := c.again(t)
		if res[0].Reply != targetA+" ping" {
			t.Fatalf("connection of a kept mapping after reload: got %+v; want it answering", res[0])
		}
		if res[1].Err != "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("connection of the removed mapping still answers 10s after reload (drain_timeout 3s)")
		}
	}
	c.release(t)
}

// TestGracefulStopDrainsConnections: on SIGTERM readiness turns off first,
// established connections keep working while they drain, and the agent exits
// 0, detached, once they have ended.
func TestGracefulStopDrainsConnections(t *testing.T) {
	t.Parallel()
	w := newWorld(t)
	// Far longer than the checks below take: the agent must still be draining.
	w.writeConfig(baseMap(), func(doc map[string]any) { doc["shutdown_grace"] = "20s" })
	a := w.startAgent(false)
	w.waitReady(a)
	c := w.startClient(true, true, "169.254.1.2:80")
	if res := c.results(t); res[0].Reply != targetA+" ping" {
		t.Fatalf("held connection: got %+v", res)
	}

	a.signal(syscall.SIGTERM)
	for deadline := time.Now().Add(3 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		code, _, err := w.get("/readyz")
		if err == nil && code == 503 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/readyz after SIGTERM: got %d %v; want 503 while draining", code, err)
		}
	}
	if res := c.again(t); res[0].Reply != targetA+" ping" {
		t.Errorf("held connection while draining: got %+v; want it answering", res[0])
	}
	select {
	case <-a.done:
		t.Fatalf("agent exited while a connection was still open and the grace period running: %v", a.err)
	default:
	}
	c.release(t)
	if code := a.wait(5 * time.Second); code != 0 {
		t.Errorf("exit code after SIGTERM: got %d; want 0", code)
	}
	w.wantAttached(0)
	if p := w.pins(); len(p) != 0 {
		t.Errorf("pins after SIGTERM: got %v; want none", p)
	}
}

// TestGracefulStopAtGraceEnd: a connection that outlives shutdown_grace is
// closed when it runs out (the designed end of a drain, not a failure), and the
// agent exits 0, detached and unpinned.
func TestGracefulStopAtGraceEnd(t *testing.T) {
	t.Parallel()
	w := newWorld(t)
	const grace = 2 * time.Second
	w.writeConfig(baseMap(), func(doc map[string]any) { doc["shutdown_grace"] = grace.String() })
	a := w.startAgent(false)
	w.waitReady(a)
	c := w.startClient(true, true, "169.254.1.2:80")
	if res := c.results(t); res[0].Reply != targetA+" ping" {
		t.Fatalf("held connection: got %+v", res)
	}
	start := time.Now()
	a.signal(syscall.SIGTERM)
	code := a.wait(grace + 3*time.Second)
	t.Logf("exit code %d after %v (shutdown_grace %v)", code, time.Since(start), grace)
	if code != 0 {
		t.Errorf("exit code after SIGTERM with a connection outliving shutdown_grace: got %d; want 0", code)
	}
	if res := c.again(t); res[0].Err == "" {
		t.Errorf("held connection after the agent exited: got %+v; want closed", res[0])
	}
	c.release(t)
	w.wantAttached(0)
	if p := w.pins(); len(p) != 0 {
		t.Errorf("pins after SIGTERM: got %v; want none", p)
	}
}

// TestKeepOnExit: with steering.keep_on_exit a graceful stop leaves the
// programs attached (mapped destinations then fail closed at the dead proxy
// port), the next agent takes them over, and `run --cleanup` removes them.
func TestKeepOnExit(t *testing.T) {
	t.Parallel()
	w := newWorld(t)
	w.writeConfig(baseMap(), func(doc map[string]any) { doc["steering"].(map[string]any)["keep_on_exit"] = true })
	a := w.startAgent(false)
	w.waitReady(a)
	links := w.linkIDs()
	a.signal(syscall.SIGTERM)
	if code := a.wait(5 * time.Second); code != 0 {
		t.Fatalf("exit code after SIGTERM: got %d; want 0", code)
	}
	w.wantAttached(1)
	w.checkDials(true, fails("169.254.1.2:80", "connection refused"))

	b := w.startAgent(false)
	w.waitReady(b)
	w.wantAttached(1)
	if got := w.linkIDs(); !maps.Equal(got, links) {
		t.Errorf("pinned links after restart: got %v; want the kept ones %v", got, links)
	}
	w.checkDials(true, steered("169.254.1.2:80", targetA))
	b.signal(syscall.SIGTERM)
	if code := b.wait(5 * time.Second); code != 0 {
		t.Fatalf("exit code after SIGTERM: got %d; want 0", code)
	}
	if out, err := w.ns.Command(binary, "run", "--cleanup", "--config", w.config).CombinedOutput(); err != nil {
		t.Fatalf("nodeagent run --cleanup: %v\n%s", err, out)
	}
	w.wantAttached(0)
	if p := w.pins(); len(p) != 0 {
		t.Errorf("pins after run --cleanup: got %v; want none", p)
	}
}

// TestSteeredIPv6: an IPv6 mapped destination goes to the proxy's IPv6
// loopback listener (connect6, getpeername6) and reaches its target.
func TestSteeredIPv6(t *testing.T) {
	t.Parallel()
	w := newWorld(t)
	m := baseMap()
	m["fd00::2"] = "c1"
	m["[fd00::4]:443"] = targetB
	w.writeConfig(m, func(doc map[string]any) {
		doc["proxy"].(map[string]any)["listen"] = []string{proxyAddr, "[::1]:15001"}
	})
	a := w.startAgent(false)
	w.waitReady(a)
	before := w.metric("nodeagent_steering_redirects_total", map[string]string{"family": "ipv6"})
	w.checkDials(true,
		steered("[fd00::2]:80", targetA),
		steered("[fd00::4]:443", targetB),
		fails("[fd00::4]:80", unreachable),
		fails("[fd00::9]:80", unreachable),
		steered("169.254.1.2:80", targetA),
	)
	w.checkDials(false, fails("[fd00::2]:80", unreachable))
	w.waitMetric("nodeagent_steering_redirects_total", map[string]string{"family": "ipv6"}, before+2)
}

// TestDeadTargetResetsClient: when the mapped target refuses, the steered
// client is closed promptly (after max_connect_attempts), not left hanging,
// and the failure is counted.
func TestDeadTargetResetsClient(t *testing.T) {
	t.Parallel()
	w := newWorld(t)
	m := baseMap()
	m["169.254.1.6"] = "127.0.0.9:9" // nobody listens there
	w.writeConfig(m, nil)
	a := w.startAgent(false)
	w.waitReady(a)
	failed := map[string]string{"mapping": "169.254.1.6", "result": "connect_failed"}
	before := w.metric("nodeagent_proxy_connections_total", failed)
	// The reset can come before connect returns (the refusal takes microseconds on
	// loopback) or on the first read; the helper's read has a 5s deadline, and a
	// timeout would mean the proxy left the client hanging.
	got := w.dial(true, "169.254.1.6:80")
	if e := got[0].Err; !strings.Contains(e, "connection reset by peer") && !strings.HasSuffix(e, "EOF") {
		t.Errorf("dial 169.254.1.6:80 (dead target): got reply %q error %q; want a reset or EOF", got[0].Reply, e)
	}
	w.waitMetric("nodeagent_proxy_connections_total", failed, before+1)
	// The agent stays ready: a dead host:port target is not a failing check.
	if code, _, err := w.get("/readyz"); err != nil || code != 200 {
		t.Errorf("/readyz with a dead target: got %d %v; want 200", code, err)
	}
}

// TestPodSteeredToPodRedirect: a socket in another network namespace (a pod,
// joined to the test "host" namespace by a veth pair) in the cgroup is sent to
// steering.pod_redirect, where the real proxy listens on the node address.
func TestPodSteeredToPodRedirect(t *testing.T) {
	t.Parallel()
	w := newWorld(t)
	pod := privtest.NewNetns(t)
	for _, c := range []*exec.Cmd{
		w.ns.Command("ip", "link", "add", "natest-h", "type", "veth", "peer", "name", "natest-p", "netns", pod.Name),
		w.ns.Command("ip", "addr", "add", "10.99.0.1/24", "dev", "natest-h"),
		w.ns.Command("ip", "link", "set", "natest-h", "up"),
		pod.Command("ip", "addr", "add", "10.99.0.2/24", "dev", "natest-p"),
		pod.Command("ip", "link", "set", "natest-p", "up"),
	} {
		if out, err := c.CombinedOutput(); err != nil {
			t.Fatalf("%s: %v: %s", strings.Join(c.Args, " "), err, out)
		}
	}
	const podRedirect = "10.99.0.1:15001"
	w.writeConfig(baseMap(), func(doc map[string]any) {
		doc["steering"].(map[string]any)["pod_redirect"] = podRedirect
		doc["proxy"].(map[string]any)["listen"] = []string{proxyAddr, podRedirect}
	})
	a := w.startAgent(false)
	w.waitReady(a)

	w.checkDialsIn(pod, true,
		steered("169.254.1.2:80", targetA),
		steered("169.254.1.4:443", targetB),
		fails("169.254.1.9:80", unreachable),
	)
	w.checkDialsIn(pod, false, fails("169.254.1.2:80", unreachable))
	// A host socket still goes to the loopback listener.
	w.checkDials(true, steered("169.254.1.2:80", targetA))
}
