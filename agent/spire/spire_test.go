package spire

import (
	"context"
	"crypto/x509"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/nodeagent/nodeagent/agent/health"
	"github.com/nodeagent/nodeagent/agent/spire/fakeworkload"
)

var (
	testTD     = spiffeid.RequireTrustDomainFromString("example.org")
	testNodeID = spiffeid.RequireFromPath(testTD, "/nodeagent")
)

func testLog(t testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// shortTempDir keeps socket paths under the 108-byte sun_path limit.
func shortTempDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "spt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}

// fixture runs a Spire on a temporary host root with a fake Workload API at its socket.
type fixture struct {
	t    *testing.T
	opts Options
	rec  *health.Recorder
	reg  *prometheus.Registry
	sp   *Spire
	fake *fakeworkload.Server
	ca   *fakeworkload.CA
	stop func()
}

func newFixture(t *testing.T, mod func(*Options)) *fixture {
	t.Helper()
	opts := Options{HostRoot: shortTempDir(t), Socket: DefaultSocket, Resync: time.Second}
	if mod != nil {
		mod(&opts)
	}
	ca, err := fakeworkload.NewCA(testTD)
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{t: t, opts: opts, rec: health.NewRecorder(), reg: prometheus.NewRegistry(), ca: ca}
	f.fake = fakeworkload.New(opts.hostPath(opts.Socket))
	t.Cleanup(f.fake.Stop)
	f.sp, err = New(opts, testLog(t), f.reg, f.rec)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return f
}

func (f *fixture) run() {
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- f.sp.Run(ctx) }()
	var once sync.Once
	f.stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-errc:
				if err != nil {
					f.t.Errorf("Run returned %v; want nil on cancellation", err)
				}
			case <-time.After(10 * time.Second):
				f.t.Errorf("Run did not return within 10s of cancellation")
			}
		})
	}
	f.t.Cleanup(f.stop)
}

func (f *fixture) svid(notBefore, notAfter time.Time) *workload.X509SVID {
	f.t.Helper()
	s, err := f.ca.SVID(testNodeID, notBefore, notAfter)
	if err != nil {
		f.t.Fatal(err)
	}
	return s
}

// waitDetail waits for the spire check to be ok with a detail containing want.
func (f *fixture) waitDetail(ok bool, want string, within time.Duration) health.Result {
	f.t.Helper()
	res, found := f.rec.WaitFor(health.Spire, within, func(r health.Result) bool {
		return r.OK == ok && strings.Contains(r.Detail, want)
	})
	if !found {
		f.t.Fatalf("spire check: got {ok: %v, detail: %q}; want {ok: %v, detail containing %q} within %s", res.OK, res.Detail, ok, want, within)
	}
	return res
}

func TestValidate(t *testing.T) {
	valid := Options{HostRoot: "/", Socket: DefaultSocket, ExposeAt: "/run/spire/sockets/agent.sock"}
	tests := []struct {
		name string
		mod  func(*Options)
		want string // "" valid; else a substring of the error
	}{
		{"valid", func(*Options) {}, ""},
		{"defaults", func(o *Options) { *o = Options{} }, ""},
		{"expose in socket dir", func(o *Options) { o.ExposeAt = "/run/spire/agent-sockets/agent.sock" }, ""},
		{"relative socket", func(o *Options) { o.Socket = "run/api.sock" }, "spire.socket"},
		{"socket in /", func(o *Options) { o.Socket = "/api.sock" }, "spire.socket"},
		{"relative expose", func(o *Options) { o.ExposeAt = "x.sock" }, "spire.expose_at"},
		{"expose is socket", func(o *Options) { o.ExposeAt = DefaultSocket }, "spire.expose_at"},
		{"expose inside socket dir", func(o *Options) { o.ExposeAt = "/run/spire/agent-sockets/sub/a.sock" }, "spire.expose_at"},
		{"expose dir contains socket dir", func(o *Options) { o.ExposeAt = "/run/spire/a.sock" }, "spire.expose_at"},
		{"expose in /", func(o *Options) { o.ExposeAt = "/a.sock" }, "spire.expose_at"},
		{"negative margin", func(o *Options) { o.ExpiryMargin = -time.Second }, "expiry_margin"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			o := valid
			tc.mod(&o)
			err := o.Validate()
			switch {
			case tc.want == "" && err != nil:
				t.Errorf("Validate() = %v; want nil", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Errorf("Validate() = %v; want an error naming %q", err, tc.want)
			}
		})
	}
}

func TestEvaluate(t *testing.T) {
	ca, err := fakeworkload.NewCA(testTD)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now().Truncate(time.Second)
	ctxFor := func(notBefore, notAfter time.Time) *workloadapi.X509Context {
		w, err := ca.SVID(testNodeID, notBefore, notAfter)
		if err != nil {
			t.Fatal(err)
		}
		s, err := x509svid.ParseRaw(w.X509Svid, w.X509SvidKey)
		if err != nil {
			t.Fatal(err)
		}
		return &workloadapi.X509Context{SVIDs: []*x509svid.SVID{s}, Bundles: bundleSet(ca)}
	}
	hour := ctxFor(now.Add(-10*time.Minute), now.Add(50*time.Minute)) // 1h lifetime: margin 10m
	late := ctxFor(now.Add(-55*time.Minute), now.Add(5*time.Minute))
	expired := ctxFor(now.Add(-61*time.Minute), now.Add(-time.Minute))
	opts := Options{Socket: DefaultSocket}
	tests := []struct {
		name     string
		opts     Options
		st       state
		wantOK   bool
		want     string
		wantNext time.Time
	}{
		{"dir error", opts, state{dirErr: errors.New("read-only file system")}, false, "socket directory /run/spire/agent-sockets: read-only", time.Time{}},
		{"absent", opts, state{}, false, "socket absent: " + DefaultSocket, time.Time{}},
		{"not a socket", opts, state{socketErr: errors.New("is not a socket (-)")}, false, "is not a socket", time.Time{}},
		{"no answer yet", opts, state{socketPresent: true}, false, "waiting for the workload api", time.Time{}},
		{"refused", opts, state{socketPresent: true, api: apiFailing, apiErr: status.Error(codes.Unavailable, "connection refused")}, false, "not serving: unavailable: connection refused", time.Time{}},
		{"no identity", opts, state{socketPresent: true, api: apiNoIdentity}, true, "serving, no identity issued", time.Time{}},
		{"no identity when one is required", Options{Socket: DefaultSocket, RequireIdentity: true}, state{socketPresent: true, api: apiNoIdentity}, false, "no identity issued for nodeagent (permission denied); an identity is required", time.Time{}},
		{"identity", opts, state{socketPresent: true, api: apiIdentity, x509: hour}, true,
			"serving, spiffe://example.org/nodeagent (trust domain example.org), expires " + now.Add(50*time.Minute).UTC().Format(time.RFC3339) + ", bundle 1 authorities",
			now.Add(40 * time.Minute)},
		{"within default margin", opts, state{socketPresent: true, api: apiIdentity, x509: late}, false, "within the 10m0s margin, without rotation", now.Add(5 * time.Minute)},
		{"fixed margin lets it pass", Options{Socket: DefaultSocket, ExpiryMargin: time.Minute}, state{socketPresent: true, api: apiIdentity, x509: late}, true, "serving, spiffe://example.org/nodeagent", now.Add(4 * time.Minute)},
		{"expired", opts, state{socketPresent: true, api: apiIdentity, x509: expired}, false, "expired at", time.Time{}},
		{"expose problem fails a serving socket", Options{Socket: DefaultSocket, ExposeAt: "/run/x/a.sock"}, state{socketPresent: true, api: apiNoIdentity, exposeErr: errors.New("not bind-mounted")}, false, "; expose_at /run/x/a.sock: not bind-mounted", time.Time{}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			res, next := evaluate(tc.opts.withDefaults(), tc.st, now)
			if res.Name != health.Spire || res.OK != tc.wantOK || !strings.Contains(res.Detail, tc.want) {
				t.Errorf("got {%s ok: %v, %q}; want {spire ok: %v, containing %q}", res.Name, res.OK, res.Detail, tc.wantOK, tc.want)
			}
			if !next.Equal(tc.wantNext) {
				t.Errorf("got next evaluation at %v; want %v", next, tc.wantNext)
			}
		})
	}
}

func TestRunLifecycle(t *testing.T) {
	f := newFixture(t, nil)
	f.run()
	f.waitDetail(false, "socket absent: "+DefaultSocket, 5*time.Second)
	if got := testutil.ToFloat64(f.sp.m.socketUp); got != 0 {
		t.Errorf("got socket_up %v with no socket; want 0", got)
	}

	// The directory is there before the agent starts, traversable.
	fi, err := os.Stat(f.opts.hostPath(filepath.Dir(DefaultSocket)))
	if err != nil {
		t.Fatalf("socket directory: %v", err)
	}
	if got := fi.Mode().Perm(); got != 0o755 {
		t.Errorf("got socket directory mode %#o; want 0755", got)
	}

	if err := f.fake.Start(); err != nil {
		t.Fatal(err)
	}
	f.waitDetail(true, "serving, no identity issued", 5*time.Second)
	if got := testutil.ToFloat64(f.sp.m.socketUp); got != 1 {
		t.Errorf("got socket_up %v while serving; want 1", got)
	}

	now := time.Now()
	f.fake.SetX509(f.svid(now.Add(-time.Minute), now.Add(time.Hour)))
	f.waitDetail(true, "serving, spiffe://example.org/nodeagent (trust domain example.org), expires ", 5*time.Second)
	want := float64(now.Add(time.Hour).Unix())
	if got := testutil.ToFloat64(f.sp.m.expiry); got != want {
		t.Errorf("got svid expiry metric %v; want %v", got, want)
	}

	// Killed: the socket stays, nothing answers.
	killed := time.Now()
	f.fake.Kill()
	f.waitDetail(false, "socket present, not serving", 5*time.Second)
	t.Logf("kill detected after %v", time.Since(killed))
	if got := testutil.ToFloat64(f.sp.m.socketUp); got != 0 {
		t.Errorf("got socket_up %v after kill; want 0", got)
	}

	// Restarted: the socket is re-created (new inode) and served again.
	if err := f.fake.Start(); err != nil {
		t.Fatal(err)
	}
	f.waitDetail(true, "serving, spiffe://example.org/nodeagent", 5*time.Second)

	// Removed.
	f.fake.Stop()
	f.waitDetail(false, "socket absent", 5*time.Second)

	f.stop()
	// The directory outlives Run: workloads' hostPath mounts depend on it.
	if _, err := os.Stat(f.opts.hostPath(filepath.Dir(DefaultSocket))); err != nil {
		t.Errorf("socket directory after Run returned: %v; want it kept", err)
	}
}

func TestRunRotationAndExpiry(t *testing.T) {
	f := newFixture(t, nil)
	if err := os.MkdirAll(filepath.Dir(f.fake.Path()), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := f.fake.Start(); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	first := f.svid(now.Add(-time.Minute), now.Add(time.Hour))
	f.fake.SetX509(first)
	f.run()
	f.waitDetail(true, "expires "+now.Add(time.Hour).UTC().Format(time.RFC3339), 5*time.Second)

	// Rotation: a new SVID with a later expiry is picked up from the stream.
	f.fake.SetX509(f.svid(now, now.Add(2*time.Hour)))
	f.waitDetail(true, "expires "+now.Add(2*time.Hour).UTC().Format(time.RFC3339), 5*time.Second)
	if got := testutil.ToFloat64(f.sp.m.rotations); got != 1 {
		t.Errorf("got %v rotations; want 1", got)
	}

	// A short SVID that is not rotated: lifetime 24s, default margin 4s. It is fine
	// first, fails by the passing of time alone once within the margin, then expires.
	now = time.Now().Truncate(time.Second) // certificates carry whole seconds
	f.fake.SetX509(f.svid(now.Add(-12*time.Second), now.Add(12*time.Second)))
	f.waitDetail(true, "serving, spiffe://example.org/nodeagent", 6*time.Second)
	f.waitDetail(false, "within the 4s margin, without rotation", 12*time.Second)
	f.waitDetail(false, "expired at", 8*time.Second)

	// Rotation recovers it.
	now = time.Now()
	f.fake.SetX509(f.svid(now.Add(-time.Minute), now.Add(time.Hour)))
	f.waitDetail(true, "serving, spiffe://example.org/nodeagent", 5*time.Second)
	if got := testutil.ToFloat64(f.sp.m.rotations); got != 3 {
		t.Errorf("got %v rotations; want 3", got)
	}

	// Identity withdrawn: the agent still serves.
	f.fake.SetX509()
	f.waitDetail(true, "serving, no identity issued", 5*time.Second)
	if got := testutil.ToFloat64(f.sp.m.expiry); got != 0 {
		t.Errorf("got svid expiry metric %v without identity; want 0", got)
	}
}

func TestUpdateMarginLive(t *testing.T) {
	f := newFixture(t, nil)
	if err := os.MkdirAll(filepath.Dir(f.fake.Path()), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := f.fake.Start(); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	f.fake.SetX509(f.svid(now.Add(-50*time.Minute), now.Add(10*time.Minute))) // margin 10m: failing
	f.run()
	f.waitDetail(false, "within the 10m0s margin", 5*time.Second)
	o := f.opts
	o.ExpiryMargin = time.Minute
	if err := f.sp.Update(o); err != nil {
		t.Fatalf("Update(margin) = %v; want nil (live)", err)
	}
	f.waitDetail(true, "serving, spiffe://example.org/nodeagent", 5*time.Second) // at the next resync
	o.Socket = "/run/other/api.sock"
	if err := f.sp.Update(o); !errors.Is(err, health.ErrNeedsRestart) {
		t.Errorf("Update(socket) = %v; want ErrNeedsRestart", err)
	}
}

func TestRunDirectory(t *testing.T) {
	f := newFixture(t, nil)
	dir := f.opts.hostPath(filepath.Dir(DefaultSocket))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	f.run()
	f.waitDetail(false, "socket absent", 5*time.Second)
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o755 {
		t.Fatalf("got socket directory %v, %v; want mode 0755", fi, err)
	}

	// Deleted under us: re-created, and watched again.
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := os.Stat(dir); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("socket directory not re-created within 5s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := f.fake.Start(); err != nil {
		t.Fatal(err)
	}
	f.fake.SetX509(f.svid(time.Now().Add(-time.Minute), time.Now().Add(time.Hour)))
	f.waitDetail(true, "serving, spiffe://example.org/nodeagent", 5*time.Second)
}

func TestCheck(t *testing.T) {
	root := shortTempDir(t)
	opts := Options{HostRoot: root, Socket: DefaultSocket}
	ctx := context.Background()
	check := func() health.Result {
		t.Helper()
		res := Check(ctx, opts)
		if len(res) != 1 || res[0].Name != health.Spire {
			t.Fatalf("Check returned %+v; want one spire result", res)
		}
		return res[0]
	}

	// Nothing there: fails, and changes nothing.
	if res := check(); res.OK || !strings.Contains(res.Detail, "socket directory /run/spire/agent-sockets") {
		t.Errorf("got %+v; want a failure naming the missing directory", res)
	}
	if _, err := os.Stat(opts.hostPath("/run")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Check created %s (stat: %v); it must change nothing", opts.hostPath("/run"), err)
	}

	if err := os.MkdirAll(opts.hostPath(filepath.Dir(DefaultSocket)), 0o755); err != nil {
		t.Fatal(err)
	}
	if res := check(); res.OK || !strings.Contains(res.Detail, "socket absent") {
		t.Errorf("got %+v; want socket absent", res)
	}

	fake := fakeworkload.New(opts.hostPath(DefaultSocket))
	if err := fake.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(fake.Stop)
	if res := check(); !res.OK || !strings.Contains(res.Detail, "serving, no identity") {
		t.Errorf("got %+v; want serving without identity", res)
	}
	ca, err := fakeworkload.NewCA(testTD)
	if err != nil {
		t.Fatal(err)
	}
	svid, err := ca.SVID(testNodeID, time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	fake.SetX509(svid)
	if res := check(); !res.OK || !strings.Contains(res.Detail, "serving, spiffe://example.org/nodeagent") {
		t.Errorf("got %+v; want serving with identity", res)
	}
	fake.Kill()
	if res := check(); res.OK || !strings.Contains(res.Detail, "not serving") {
		t.Errorf("got %+v; want not serving", res)
	}

	// ExposeAt that was never published: Check reports it and does not publish it.
	opts.ExposeAt = "/run/spire/agent-sockets/agent.sock"
	if res := check(); res.OK || !strings.Contains(res.Detail, "expose_at") {
		t.Errorf("got %+v; want an expose_at failure", res)
	}
	if _, err := os.Lstat(opts.hostPath(opts.ExposeAt)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Check published %s (lstat: %v); it must change nothing", opts.ExposeAt, err)
	}
}

func TestNewRegistersMetricsOnce(t *testing.T) {
	reg := prometheus.NewRegistry()
	if _, err := New(Options{}, testLog(t), reg, health.Discard); err != nil {
		t.Fatalf("New: %v", err)
	}
	n, err := testutil.GatherAndCount(reg)
	if err != nil {
		t.Fatal(err)
	}
	if n != 3 {
		t.Errorf("got %d metric series after New; want 3 (initialised to 0)", n)
	}
	if _, err := New(Options{}, testLog(t), reg, health.Discard); err == nil {
		t.Errorf("second New on the same registry: got nil error; want a registration error")
	}
	if _, err := New(Options{Socket: "relative"}, testLog(t), prometheus.NewRegistry(), health.Discard); err == nil {
		t.Errorf("New with invalid options: got nil error; want one")
	}
}

func bundleSet(ca *fakeworkload.CA) *x509bundle.Set {
	return x509bundle.NewSet(x509bundle.FromX509Authorities(testTD, []*x509.Certificate{ca.Cert()}))
}

func TestRunMissingHostRoot(t *testing.T) {
	f := newFixture(t, func(o *Options) { o.HostRoot = filepath.Join(o.HostRoot, "missing") })
	f.run()
	f.waitDetail(false, "host_root", 5*time.Second)
	if _, err := os.Stat(f.opts.HostRoot); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stat %s: %v; want it still missing (nothing created under a wrong host_root)", f.opts.HostRoot, err)
	}
}
