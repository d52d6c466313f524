package e2e

import (
	"bufio"
	"errors"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
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

	redirects := map[string]string{"family": "ipv4"}
	viaC1 := map[string]string{"mapping": "169.254.1.2", "result": "connected"}
	viaB := map[string]string{"mapping": "169.254.1.4:443", "result": "connected"}
	refused := map[string]string{"mapping": "none", "result": "no_original_dst"}
	before := map[string]float64{}
	for name, m := range map[string]map[string]string{"redirects": redirects, "c1": viaC1, "b": viaB, "refused": refused} {
		if name == "redirects" {
			before[name] = w.metric("nodeagent_steering_redirects_total", m)
		} else {
			before[name] = w.metric("nodeagent_proxy_connections_total", m)
		}
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
	c, err := w.dialInNetns(t.Context(), "tcp", proxyAddr)
	if err != nil {
		t.Fatalf("dial the proxy directly: %v", err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	_, _ = io.WriteString(c, "ping\n")
	n, err := bufio.NewReader(c).Read(make([]byte, 64))
	if n != 0 || !(errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)) {
		t.Errorf("direct connection to the proxy: got %d bytes, %v; want closed at once (EOF or reset)", n, err)
	}

	w.waitMetric("nodeagent_steering_redirects_total", redirects, before["redirects"]+3)
	w.waitMetric("nodeagent_proxy_connections_total", viaC1, before["c1"]+2)
	w.waitMetric("nodeagent_proxy_connections_total", viaB, before["b"]+1)
	w.waitMetric("nodeagent_proxy_connections_total", refused, before["refused"]+1)
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
	loaded := w.status().Config.LoadedAt

	next := baseMap()
	delete(next, "169.254.1.4:443")
	next["169.254.1.5"] = targetB
	w.writeConfig(next, nil)
	a.signal(syscall.SIGHUP)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		st := w.status()
		if st.Config.ReloadError != "" {
			t.Fatalf("reload: %s", st.Config.ReloadError)
		}
		if st.Config.LoadedAt.After(loaded) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/status config.loaded_at still %v 10s after SIGHUP", loaded)
		}
	}

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
