package hostprep

import (
	"context"
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nodeagent/nodeagent/agent/health"
	"github.com/nodeagent/nodeagent/hostprep/internal/fakehost"
)

// fakeModprobe records every command and "loads" the module in the fake host, unless
// the module is listed in fail, whose value is the stderr it prints.
type fakeModprobe struct {
	host *fakehost.Host
	fail map[string]string

	mu    sync.Mutex
	calls []string // "root|argv..."
}

func (f *fakeModprobe) Run(_ context.Context, root string, argv ...string) ([]byte, error) {
	f.mu.Lock()
	f.calls = append(f.calls, root+"|"+strings.Join(argv, " "))
	f.mu.Unlock()
	name := argv[len(argv)-1]
	if msg, ok := f.fail[name]; ok {
		return []byte(msg + "\n"), errors.New("exit status 1")
	}
	f.host.LoadModule(name)
	return nil, nil
}

func (f *fakeModprobe) Calls() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.calls...)
}

// fakeMounter keeps a set of bpffs mount points.
type fakeMounter struct {
	mu      sync.Mutex
	mounted map[string]bool
	mounts  int
}

func (m *fakeMounter) IsBPFFS(path string) (bool, error) {
	if _, err := os.Stat(path); err != nil {
		return false, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.mounted[path], nil
}

func (m *fakeMounter) MountBPFFS(path string) error {
	if err := os.MkdirAll(path, 0o700); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.mounted == nil {
		m.mounted = map[string]bool{}
	}
	m.mounted[path] = true
	m.mounts++
	return nil
}

type env struct {
	host *fakehost.Host
	mp   *fakeModprobe
	mnt  *fakeMounter
	now  time.Time
	d    deps
}

func newEnv(t *testing.T, cfg fakehost.Config) *env {
	t.Helper()
	h := fakehost.New(t, cfg)
	e := &env{host: h, mp: &fakeModprobe{host: h}, mnt: &fakeMounter{}, now: time.Now()}
	e.d = deps{sysfs: h, cmd: e.mp, mnt: e.mnt, now: func() time.Time { return e.now }}
	return e
}

// opts returns options for the env's host with short retry periods.
func (e *env) opts(mut func(*Options)) Options {
	o := Options{
		Mode:         ModeApply,
		HostRoot:     e.host.Root,
		Hugepages:    Hugepages{Count: 512, SysctlFile: "/etc/sysctl.d/calico.conf"},
		Modules:      []string{"vfio-pci"},
		ModulesFile:  "/etc/modules-load.d/calico-vfio-pci.conf",
		RetryInitial: 5 * time.Millisecond,
		RetryMax:     20 * time.Millisecond,
		Reverify:     20 * time.Millisecond,
	}
	if mut != nil {
		mut(&o)
	}
	return o.withDefaults()
}

// pass runs one apply (or check) pass and returns the results by name.
func (e *env) pass(t *testing.T, o Options, st *runState, m *metrics) map[string]health.Result {
	t.Helper()
	if st == nil {
		st = &runState{}
	}
	p := &pass{o: o, d: e.d, log: testLogger(t), m: m, apply: o.Mode != ModeCheck, st: st}
	out := map[string]health.Result{}
	for _, r := range p.all(context.Background()) {
		out[r.Name] = r
	}
	return out
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(b), "\n"))
	return len(b), nil
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return !errors.Is(err, fs.ErrNotExist)
}

func chmod(path string, mode os.FileMode) error { return os.Chmod(path, mode) }
