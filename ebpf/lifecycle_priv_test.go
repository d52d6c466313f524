package ebpf

import (
	"bufio"
	"context"
	"encoding/json"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/nodeagent/nodeagent/agent/health"
)

// attachments counts the programs attached to the cgroup at each hook.
func attachments(t *testing.T, cgroup string) map[string]int {
	t.Helper()
	f, err := os.Open(cgroup)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string]int{}
	for _, h := range hooks {
		res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: h.attach})
		if err != nil {
			t.Fatalf("query %s programs on %s: %v", h.name, cgroup, err)
		}
		out[h.name] = len(res.Programs)
	}
	return out
}

func wantAttachments(t *testing.T, cgroup string, want int) {
	t.Helper()
	for name, n := range attachments(t, cgroup) {
		if n != want {
			t.Errorf("%s attachments on %s: got %d; want %d", name, cgroup, n, want)
		}
	}
}

// pins lists every file under the bpffs directory.
func pins(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	_ = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			out = append(out, p)
		}
		return nil
	})
	return out
}

func pinnedMapID(t *testing.T, path string) ebpf.MapID {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(path, nil)
	if err != nil {
		t.Fatalf("load pinned map %s: %v", path, err)
	}
	defer m.Close()
	info, err := m.Info()
	if err != nil {
		t.Fatal(err)
	}
	id, _ := info.ID()
	return id
}

// TestCrashRestartCleanup: an agent killed with SIGKILL leaves its pins; the
// next one replaces the programs in place (one attachment per hook), reuses the
// maps, and steers; Cleanup then leaves no pins and no attachments.
func TestCrashRestartCleanup(t *testing.T) {
	e := newEnv(t)
	opts := e.options()
	// A stale intercept the restarted agent must drop.
	crashed := opts
	crashed.Intercepts = append(append([]Intercept(nil), opts.Intercepts...), Intercept{Addr: mustAddr("169.254.1.9")})

	b, _ := json.Marshal(crashed)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"=agent", "AGENT_OPTIONS="+string(b))
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ready := make(chan bool, 1)
	go func() {
		line, _ := bufio.NewReader(out).ReadString('\n')
		ready <- strings.HasPrefix(line, "ready")
	}()
	select {
	case ok := <-ready:
		if !ok {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
			t.Fatalf("agent helper did not get ready: %s", stderr.String())
		}
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		t.Fatalf("agent helper timed out: %s", stderr.String())
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()

	// The killed agent's programs stay attached through their pinned links.
	wantAttachments(t, e.cgroup, 1)
	mapID := pinnedMapID(t, filepath.Join(mapsDir(e.bpffs), "orig_by_client"))
	if res := e.dial(e.host, true, dialRequest{Addr: "169.254.1.9:80"}); !strings.HasPrefix(res.Reply, "proxy none") {
		t.Errorf("stale intercept while the agent is dead: got reply %q err %q; want proxy none", res.Reply, res.Err)
	}

	s, _, _, stop := e.start(opts)
	wantAttachments(t, e.cgroup, 1)
	if got := pinnedMapID(t, filepath.Join(mapsDir(e.bpffs), "orig_by_client")); got != mapID {
		t.Errorf("orig_by_client map after restart: got id %d; want reused id %d", got, mapID)
	}
	if res := e.dial(e.host, true, dialRequest{Addr: "169.254.1.2:80"}); res.Reply != "proxy 169.254.1.2:80 | direct 169.254.1.2:80" {
		t.Errorf("after restart: got reply %q err %q", res.Reply, res.Err)
	}
	if res := e.dial(e.host, true, dialRequest{Addr: "169.254.1.9:80"}); res.Reply != "direct 169.254.1.9:80" {
		t.Errorf("stale intercept after restart: got reply %q err %q; want direct", res.Reply, res.Err)
	}
	if res := Check(t.Context(), opts); !res[0].OK || !strings.Contains(res[0].Detail, "5 programs attached") {
		t.Errorf("Check while running: got %+v; want OK, 5 programs attached", res[0])
	}
	_ = s

	// Graceful stop detaches and unpins by default.
	if err := stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	wantAttachments(t, e.cgroup, 0)
	if p := pins(t, e.bpffs); len(p) != 0 {
		t.Errorf("pins after stop: got %v; want none", p)
	}
	if res := e.dial(e.host, true, dialRequest{Addr: "169.254.1.2:80"}); res.Reply != "direct 169.254.1.2:80" {
		t.Errorf("after stop: got reply %q err %q; want direct", res.Reply, res.Err)
	}

	// KeepOnExit leaves everything for Cleanup (`nodeagent run --cleanup`).
	keep := opts
	keep.KeepOnExit = true
	_, _, _, stop = e.start(keep)
	if err := stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	wantAttachments(t, e.cgroup, 1)
	if err := Cleanup(keep); err != nil {
		t.Fatalf("Cleanup: %v", err)
	}
	wantAttachments(t, e.cgroup, 0)
	if p := pins(t, e.bpffs); len(p) != 0 {
		t.Errorf("pins after Cleanup: got %v; want none", p)
	}
	if err := Cleanup(keep); err != nil {
		t.Errorf("second Cleanup: %v", err)
	}
	if res := Check(t.Context(), opts); !res[0].OK || !strings.Contains(res[0].Detail, "not attached") {
		t.Errorf("Check after Cleanup: got %+v; want OK, not attached", res[0])
	}
	_ = health.Steering
}

// TestUpdateInPlace: intercepts change live without detaching.
func TestUpdateInPlace(t *testing.T) {
	e := newEnv(t)
	opts := e.options()
	s, _, _, _ := e.start(opts)
	before := linkIDs(t, s)

	next := opts
	next.Intercepts = []Intercept{{Addr: mustAddr("169.254.1.9")}, {Addr: mustAddr("fd00::2")}}
	if err := s.Update(next); err != nil {
		t.Fatalf("Update: %v", err)
	}
	if got := linkIDs(t, s); got != before {
		t.Errorf("links after Update: got %v; want unchanged %v", got, before)
	}
	for addr, want := range map[string]string{
		"169.254.1.9:80": "proxy 169.254.1.9:80 | direct 169.254.1.9:80",
		"169.254.1.2:80": "direct 169.254.1.2:80",
		"[fd00::2]:80":   "proxy [fd00::2]:80 | direct [fd00::2]:80",
	} {
		if res := e.dial(e.host, true, dialRequest{Addr: addr}); res.Reply != want {
			t.Errorf("dial %s after Update: got reply %q err %q; want %q", addr, res.Reply, res.Err, want)
		}
	}
	moved := next
	moved.BPFFS = e.bpffs + "-other"
	if err := s.Update(moved); err != health.ErrNeedsRestart {
		t.Errorf("Update with a new bpffs: got %v; want ErrNeedsRestart", err)
	}
}

func linkIDs(t *testing.T, s *Steering) [5]link.ID {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	var ids [5]link.ID
	for i, l := range s.cur.links {
		info, err := l.Info()
		if err != nil {
			t.Fatal(err)
		}
		ids[i] = info.ID
	}
	return ids
}

// TestRunAgain: Run may be called again on the same Steering after it returned.
func TestRunAgain(t *testing.T) {
	e := newEnv(t)
	s, rec, _, stop := e.start(e.options())
	if err := stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	wantAttachments(t, e.cgroup, 0)
	if _, ok := s.OriginalDst(netip.MustParseAddrPort("127.0.0.1:1")); ok {
		t.Error("OriginalDst after Run returned: got ok; want false")
	}

	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- s.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-errc; err != nil {
			t.Errorf("second Run: %v", err)
		}
		wantAttachments(t, e.cgroup, 0)
	}()
	n := len(rec.History())
	if res, ok := rec.WaitFor(health.Steering, 20*time.Second, func(r health.Result) bool { return r.OK && len(rec.History()) > n }); !ok {
		t.Fatalf("second Run: steering check got %+v; want OK", res)
	}
	e.steer.Store(s)
	wantAttachments(t, e.cgroup, 1)
	if res := e.dial(e.host, true, dialRequest{Addr: "169.254.1.2:80"}); res.Reply != "proxy 169.254.1.2:80 | direct 169.254.1.2:80" {
		t.Errorf("after second Run: got reply %q err %q", res.Reply, res.Err)
	}
}
