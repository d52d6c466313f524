package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nodeagent/nodeagent/agent/config"
	"github.com/nodeagent/nodeagent/agent/health"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// fake is a subsystem whose behaviour each test scripts.
type fake struct {
	name    string
	rep     health.Reporter
	runs    atomic.Int32
	run     func(ctx context.Context, n int32, rep health.Reporter) error
	mu      sync.Mutex
	updates []*config.Config
	update  error
	stopped *[]string
	smu     *sync.Mutex
}

func (f *fake) Run(ctx context.Context) error {
	n := f.runs.Add(1)
	err := f.run(ctx, n, f.rep)
	if f.stopped != nil && ctx.Err() != nil {
		f.smu.Lock()
		*f.stopped = append(*f.stopped, f.name)
		f.smu.Unlock()
	}
	return err
}

func (f *fake) Update(cfg *config.Config) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.updates = append(f.updates, cfg)
	return f.update
}

func component1(f *fake, required bool) component {
	return component{
		name:     f.name,
		checks:   []string{f.name},
		enabled:  func(*config.Config) bool { return true },
		required: func(*config.Config) bool { return required },
		build: func(b buildArgs) (instance, error) {
			f.rep = b.rep
			return f, nil
		},
		check: func(context.Context, *config.Config) []health.Result { return nil },
	}
}

// healthy reports OK once and waits.
func healthy(ctx context.Context, _ int32, rep health.Reporter, name string) error {
	rep.Report(health.Result{Name: name, OK: true, Detail: "fine"})
	<-ctx.Done()
	return nil
}

func testConfig(t *testing.T, body string) *config.Config {
	t.Helper()
	path := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

type running struct {
	a      *Agent
	addr   string
	cancel context.CancelFunc
	reload chan struct{}
	done   chan error
}

func startAgent(t *testing.T, cfg *config.Config, comps ...component) *running {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	level := new(slog.LevelVar)
	a := New(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), level)
	a.components = comps
	a.listeners = map[string][]net.Listener{ListenerHealth: {ln}}
	a.startGate = time.Second
	a.minBackoff, a.maxBackoff = 20*time.Millisecond, 100*time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{a: a, addr: ln.Addr().String(), cancel: cancel, reload: make(chan struct{}), done: make(chan error, 1)}
	go func() { r.done <- a.Run(ctx, r.reload) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-r.done:
		case <-time.After(15 * time.Second):
			t.Error("agent did not stop")
		}
	})
	return r
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestReadinessFollowsRequiredChecks(t *testing.T) {
	cfg := testConfig(t, "node_name: n1\n")
	var flip atomic.Bool
	ok := &fake{name: health.Uplink}
	ok.run = func(ctx context.Context, _ int32, rep health.Reporter) error {
		for {
			rep.Report(health.Result{Name: health.Uplink, OK: flip.Load(), Detail: fmt.Sprint("carrier=", flip.Load())})
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(10 * time.Millisecond):
			}
		}
	}
	optional := &fake{name: health.Spire}
	optional.run = func(ctx context.Context, _ int32, rep health.Reporter) error {
		rep.Report(health.Result{Name: health.Spire, OK: false, Detail: "socket absent"})
		<-ctx.Done()
		return nil
	}
	r := startAgent(t, cfg, component1(ok, true), component1(optional, false))
	base := "http://" + r.addr

	waitFor(t, "uplink to report", func() bool { c, _ := get(t, base+"/readyz"); return c == 503 })
	code, body := get(t, base+"/readyz")
	if code != 503 || !strings.Contains(body, "uplink") || strings.Contains(body, "spire") {
		t.Errorf("/readyz = %d %q; want 503 naming uplink only (spire is not required)", code, body)
	}
	flip.Store(true)
	waitFor(t, "ready", func() bool { c, _ := get(t, base+"/readyz"); return c == 200 })
	if code, _ := get(t, base+"/healthz"); code != 200 {
		t.Errorf("/healthz = %d; want 200", code)
	}

	_, body = get(t, base+"/status")
	var doc StatusDoc
	if err := json.Unmarshal([]byte(body), &doc); err != nil {
		t.Fatalf("/status is not JSON: %v\n%s", err, body)
	}
	if doc.Node != "n1" || !doc.Ready || len(doc.Checks) != 2 || doc.Checks[0].Name != "uplink" || doc.Checks[1].Name != "spire" {
		t.Errorf("/status = %+v; want node n1, ready, checks uplink then spire", doc)
	}
	for _, field := range []string{`"node"`, `"version"`, `"ready"`, `"checks"`, `"name"`, `"ok"`, `"required"`, `"detail"`, `"since"`} {
		if !strings.Contains(body, field) {
			t.Errorf("/status lacks field %s", field)
		}
	}
	_, metrics := get(t, base+"/metrics")
	for _, m := range []string{`nodeagent_check_ok{check="uplink"} 1`, `nodeagent_check_ok{check="spire"} 0`, "nodeagent_build_info{", "go_goroutines", "process_resident_memory_bytes"} {
		if !strings.Contains(metrics, m) {
			t.Errorf("/metrics lacks %q", m)
		}
	}
}

func TestPanicRestartsOnlyThatSubsystem(t *testing.T) {
	cfg := testConfig(t, "node_name: n1\n")
	crashy := &fake{name: health.Proxy}
	crashy.run = func(ctx context.Context, n int32, rep health.Reporter) error {
		if n == 1 {
			panic("boom")
		}
		return healthy(ctx, n, rep, health.Proxy)
	}
	steady := &fake{name: health.Uplink}
	steady.run = func(ctx context.Context, n int32, rep health.Reporter) error {
		return healthy(ctx, n, rep, health.Uplink)
	}
	r := startAgent(t, cfg, component1(steady, true), component1(crashy, true))

	waitFor(t, "the panic to be reported", func() bool {
		for _, res := range r.a.status.Snapshot().Checks {
			if res.Name == health.Proxy && strings.Contains(res.Detail, "panic: boom") {
				return true
			}
		}
		return crashy.runs.Load() >= 2
	})
	waitFor(t, "the restarted subsystem to be healthy", func() bool { return r.a.status.Snapshot().Ready })
	if got := crashy.runs.Load(); got != 2 {
		t.Errorf("crashy ran %d times; want 2", got)
	}
	if got := steady.runs.Load(); got != 1 {
		t.Errorf("steady ran %d times; want 1 (a panic elsewhere must not restart it)", got)
	}
	if got := testutil.ToFloat64(r.a.restarts.WithLabelValues(health.Proxy)); got != 1 {
		t.Errorf("restarts{proxy} = %v; want 1", got)
	}
}

func TestFailingRunRetriesWithBackoff(t *testing.T) {
	cfg := testConfig(t, "node_name: n1\n")
	f := &fake{name: health.Steering}
	f.run = func(ctx context.Context, n int32, rep health.Reporter) error {
		if n < 3 {
			return fmt.Errorf("bpf: operation not permitted")
		}
		return healthy(ctx, n, rep, health.Steering)
	}
	r := startAgent(t, cfg, component1(f, true))
	waitFor(t, "ready after retries", func() bool { return r.a.status.Snapshot().Ready })
	if got := f.runs.Load(); got != 3 {
		t.Errorf("runs = %d; want 3", got)
	}
}

func TestReloadWithBrokenFileKeepsRunningConfig(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(path, []byte("node_name: n1\nlog: {level: info}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	f := &fake{name: health.Uplink}
	f.run = func(ctx context.Context, n int32, rep health.Reporter) error {
		return healthy(ctx, n, rep, health.Uplink)
	}
	r := startAgent(t, cfg, component1(f, true))
	waitFor(t, "ready", func() bool { return r.a.status.Snapshot().Ready })

	if err := os.WriteFile(path, []byte("node_name: n1\nlog: {level: chatty}\nbogus: 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	r.reload <- struct{}{}
	waitFor(t, "the reload error in /status", func() bool {
		doc := r.a.status.Snapshot()
		return doc.Config != nil && doc.Config.ReloadError != ""
	})
	doc := r.a.status.Snapshot()
	if !strings.Contains(doc.Config.ReloadError, "bogus: unknown key") || !strings.Contains(doc.Config.ReloadError, "log.level") {
		t.Errorf("reload_error = %q; want both problems", doc.Config.ReloadError)
	}
	if !doc.Ready {
		t.Error("a failed reload made the agent unready")
	}
	if got := testutil.ToFloat64(r.a.reloadOK); got != 0 {
		t.Errorf("nodeagent_config_last_reload_successful = %v; want 0", got)
	}
	if len(f.updates) != 0 {
		t.Errorf("subsystem got %d updates from a broken file; want 0", len(f.updates))
	}

	// A good file applies live and clears the error.
	if err := os.WriteFile(path, []byte("node_name: n1\nlog: {level: debug}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	r.reload <- struct{}{}
	waitFor(t, "the good reload", func() bool {
		doc := r.a.status.Snapshot()
		return doc.Config != nil && doc.Config.ReloadError == ""
	})
	if got := r.a.level.Level(); got != slog.LevelDebug {
		t.Errorf("log level after reload = %v; want debug", got)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.updates) != 1 {
		t.Errorf("subsystem got %d updates; want 1", len(f.updates))
	}
}

func TestReloadRestartsWhenUpdateNeedsIt(t *testing.T) {
	path := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(path, []byte("node_name: n1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, _ := config.Load(path)
	f := &fake{name: health.Uplink, update: health.ErrNeedsRestart}
	f.run = func(ctx context.Context, n int32, rep health.Reporter) error {
		return healthy(ctx, n, rep, health.Uplink)
	}
	r := startAgent(t, cfg, component1(f, true))
	waitFor(t, "first run", func() bool { return f.runs.Load() == 1 })
	r.reload <- struct{}{}
	waitFor(t, "the restart", func() bool { return f.runs.Load() == 2 })
}

func TestShutdownUnreadyFirstThenReverseOrder(t *testing.T) {
	cfg := testConfig(t, "node_name: n1\nshutdown_grace: 5s\n")
	var order []string
	var mu sync.Mutex
	var sawUnready atomic.Bool
	var st *Status
	mk := func(name string) *fake {
		f := &fake{name: name, stopped: &order, smu: &mu}
		f.run = func(ctx context.Context, n int32, rep health.Reporter) error {
			rep.Report(health.Result{Name: name, OK: true})
			<-ctx.Done()
			if !st.Snapshot().Ready {
				sawUnready.Store(true)
			}
			return nil
		}
		return f
	}
	a, b, c := mk(health.Hugepages), mk(health.Uplink), mk(health.OTLP)
	r := startAgent(t, cfg, component1(a, true), component1(b, true), component1(c, true))
	st = r.a.status
	waitFor(t, "ready", func() bool { return st.Snapshot().Ready })
	r.cancel()
	if err := <-r.done; err != nil {
		t.Fatalf("Run: %v", err)
	}
	r.done <- nil // for the cleanup
	mu.Lock()
	defer mu.Unlock()
	if got, want := strings.Join(order, ","), "otlp,uplink,hugepages"; got != want {
		t.Errorf("stop order %s; want %s", got, want)
	}
	if !sawUnready.Load() {
		t.Error("subsystems were stopped while the agent still reported ready")
	}
}

func TestShutdownGraceBoundsASlowSubsystem(t *testing.T) {
	cfg := testConfig(t, "node_name: n1\nshutdown_grace: 200ms\n")
	stuck := &fake{name: health.Proxy}
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	stuck.run = func(ctx context.Context, n int32, rep health.Reporter) error {
		rep.Report(health.Result{Name: health.Proxy, OK: true})
		<-release
		return nil
	}
	r := startAgent(t, cfg, component1(stuck, true))
	waitFor(t, "ready", func() bool { return r.a.status.Snapshot().Ready })
	start := time.Now()
	r.cancel()
	err := <-r.done
	r.done <- nil
	if err == nil || !strings.Contains(err.Error(), "proxy did not stop in time") {
		t.Errorf("Run = %v; want the slow subsystem named", err)
	}
	if elapsed := time.Since(start); elapsed > 5*time.Second {
		t.Errorf("shutdown took %v with a 200ms grace", elapsed)
	}
}

func TestNotifySocketReadyThenStopping(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	t.Setenv("NOTIFY_SOCKET", sock)
	msgs := make(chan string, 64)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				return
			}
			msgs <- string(buf[:n])
		}
	}()

	cfg := testConfig(t, "node_name: n1\n")
	f := &fake{name: health.Uplink}
	f.run = func(ctx context.Context, n int32, rep health.Reporter) error {
		return healthy(ctx, n, rep, health.Uplink)
	}
	r := startAgent(t, cfg, component1(f, true))

	var seen []string
	next := func(want string) {
		t.Helper()
		deadline := time.After(10 * time.Second)
		for {
			select {
			case m := <-msgs:
				seen = append(seen, m)
				if strings.Contains(m, want) {
					return
				}
			case <-deadline:
				t.Fatalf("no %q; saw %q", want, seen)
			}
		}
	}
	next("READY=1")
	r.cancel()
	next("STOPPING=1")
	for _, m := range seen {
		if strings.HasPrefix(m, "STATUS=") && strings.Contains(m, "ready: all 1 checks pass") {
			return
		}
	}
	t.Errorf("no STATUS= summary among %q", seen)
}

func TestAllowFromLimitsStatusNotProbes(t *testing.T) {
	cfg := testConfig(t, "node_name: n1\nhealth: {listen: 127.0.0.1:9874, allow_from: [10.0.0.0/8]}\n")
	r := startAgent(t, cfg)
	base := "http://" + r.addr
	if code, _ := get(t, base+"/status"); code != http.StatusForbidden {
		t.Errorf("/status from 127.0.0.1 = %d; want 403", code)
	}
	if code, _ := get(t, base+"/healthz"); code != 200 {
		t.Errorf("/healthz = %d; want 200", code)
	}
}
