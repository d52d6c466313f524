package hostprep

import (
	"context"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nodeagent/nodeagent/agent/health"
	"github.com/nodeagent/nodeagent/hostprep/internal/fakehost"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// newTest returns a Hostprep on the env's fake host.
func newTest(t *testing.T, e *env, o Options) (*Hostprep, *health.Recorder, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	rec := health.NewRecorder()
	h, err := New(o, testLogger(t), reg, rec)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	h.d = e.d
	return h, rec, reg
}

// start runs h until the test ends and fails the test if Run returns an error.
func start(t *testing.T, h *Hostprep) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- h.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run returned %v after cancellation; want nil", err)
			}
		case <-time.After(5 * time.Second):
			t.Errorf("Run did not return within 5s of cancellation")
		}
	})
}

// mustChangeEverything is a host where apply would change every part: no pool, a wrong
// sysctl key, an absent module, no-IOMMU mode allowed but off, bpffs not mounted.
func mustChangeEverything(t *testing.T) (*env, Options) {
	e := newEnv(t, fakehost.Config{NUMANodes: 2, NoIOMMU: "N", Modprobe: true, OSID: "debian", Uplink: "eth1", UplinkNUMA: 1})
	e.host.Put(sysctlFile, "vm_nr.hugepages = 512\n")
	e.host.Put(sysctlFile[:len("etc/sysctl.d/")]+".calico.conf"+tmpInfix+"123", "stale temp from a crash")
	e.host.AddKubelet(100, e.now.Add(-time.Hour))
	o := e.opts(func(o *Options) {
		o.AllowNoIOMMU = true
		o.BPFFS = "/sys/fs/bpf"
		o.UplinkInterface = "eth1"
	})
	return e, o
}

func TestCheckChangesNothing(t *testing.T) {
	e, o := mustChangeEverything(t)
	before := e.host.Snapshot(t)

	results := check(context.Background(), o, e.d)
	var names []string
	for _, r := range results {
		names = append(names, r.Name)
		if r.OK {
			t.Errorf("check %s ok on a host that needs every change; want failing (%q)", r.Name, r.Detail)
		}
	}
	if want := []string{health.Hugepages, health.Modules, health.IOMMU, CheckBPFFS}; !slices.Equal(names, want) {
		t.Errorf("checks %v; want %v", names, want)
	}

	// mode: check as a daemon, through Run
	o.Mode = ModeCheck
	h, rec, _ := newTest(t, e, o)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- h.Run(ctx) }()
	if _, ok := rec.WaitFor(CheckBPFFS, 5*time.Second, func(health.Result) bool { return true }); !ok {
		t.Fatalf("mode check: no bpffs result reported")
	}
	time.Sleep(3 * o.RetryMax) // a few retry passes
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}

	after := e.host.Snapshot(t)
	if !maps.Equal(before, after) {
		for k := range before {
			if before[k] != after[k] {
				t.Errorf("%s changed:\n%q\n->\n%q", k, before[k], after[k])
			}
		}
		for k := range after {
			if _, ok := before[k]; !ok {
				t.Errorf("%s created", k)
			}
		}
	}
	if w := e.host.Writes(); len(w) > 0 {
		t.Errorf("kernel writes %v; want none", w)
	}
	if c := e.mp.Calls(); len(c) > 0 {
		t.Errorf("modprobe calls %v; want none", c)
	}
	if e.mnt.mounts > 0 {
		t.Errorf("%d mounts; want none", e.mnt.mounts)
	}
}

func TestApplyEverythingThenUnchanged(t *testing.T) {
	e, o := mustChangeEverything(t)
	st := &runState{}
	first := e.pass(t, o, st, nil)
	for name, r := range first {
		if !r.OK {
			t.Errorf("%s failed after apply: %q", name, r.Detail)
		}
	}
	if d := first[health.Hugepages].Detail; !strings.Contains(d, "kubelet (pid 100)") {
		t.Errorf("hugepages detail %q; want a kubelet restart warning", d)
	}
	if exists(filepath.Join(e.host.Root, "etc/sysctl.d/.calico.conf"+tmpInfix+"123")) {
		t.Errorf("stale temporary file not removed")
	}
	snap := e.host.Snapshot(t)
	writes := len(e.host.Writes())
	second := e.pass(t, o, st, nil)
	if !maps.Equal(snap, e.host.Snapshot(t)) {
		t.Errorf("second apply changed the host")
	}
	if n := len(e.host.Writes()); n != writes {
		t.Errorf("second apply made %d kernel writes; want 0", n-writes)
	}
	for _, name := range []string{health.Hugepages, health.Modules} {
		if !strings.Contains(second[name].Detail, "unchanged") {
			t.Errorf("%s detail on second apply %q; want \"unchanged\"", name, second[name].Detail)
		}
	}
}

func TestHostRootMissing(t *testing.T) {
	o := Options{HostRoot: filepath.Join(t.TempDir(), "nope"), Hugepages: Hugepages{Count: 8}, Modules: []string{"vfio-pci"}}
	e := newEnv(t, fakehost.Config{})
	for _, r := range check(context.Background(), o, e.d) {
		if r.OK || !strings.Contains(r.Detail, "host_root "+o.HostRoot) {
			t.Errorf("%s: ok %v, detail %q; want failing and naming host_root", r.Name, r.OK, r.Detail)
		}
	}
	o.Mode = ModeApply
	res := e.pass(t, o.withDefaults(), nil, nil)
	if r := res[health.Hugepages]; r.OK {
		t.Errorf("apply with a missing host_root: hugepages ok; want failing")
	}
	if exists(o.HostRoot) {
		t.Errorf("apply created the missing host_root")
	}
}

func TestRunRetriesUntilAllocated(t *testing.T) {
	e := newEnv(t, fakehost.Config{})
	e.host.SetCap(100)
	o := e.opts(func(o *Options) { o.Modules = nil; o.Hugepages.Count = 200 })
	h, rec, reg := newTest(t, e, o)
	start(t, h)
	res, ok := rec.WaitFor(health.Hugepages, 5*time.Second, func(r health.Result) bool { return !r.OK })
	if !ok || !strings.Contains(res.Detail, "only 100/200") {
		t.Fatalf("hugepages %+v; want failing with only 100/200", res)
	}
	// retried with backoff: the kernel is asked again
	deadline := time.Now().Add(5 * time.Second)
	for countPoolWrites(e.host.Writes()) < 4 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if n := countPoolWrites(e.host.Writes()); n < 4 {
		t.Fatalf("%d pool writes; want retries", n)
	}
	e.host.SetCap(-1) // memory freed up
	res, ok = rec.WaitFor(health.Hugepages, 5*time.Second, func(r health.Result) bool { return r.OK })
	if !ok || !strings.HasPrefix(res.Detail, "200/200 2MiB pages") {
		t.Fatalf("hugepages %+v; want 200/200 after memory freed", res)
	}
	if got := testutil.ToFloat64(mustGauge(t, h, "total", "allocated")); got != 200 {
		t.Errorf("allocated gauge %v; want 200", got)
	}
	_ = reg
}

func countPoolWrites(w []string) int {
	n := 0
	for _, s := range w {
		if strings.HasPrefix(s, poolFile+"=") {
			n++
		}
	}
	return n
}

func mustGauge(t *testing.T, h *Hostprep, node, state string) prometheus.Collector {
	t.Helper()
	g, err := h.m.hugepages.GetMetricWithLabelValues(node, state)
	if err != nil {
		t.Fatal(err)
	}
	return g
}

func TestRunNoticesDrift(t *testing.T) {
	e := newEnv(t, fakehost.Config{})
	o := e.opts(func(o *Options) { o.Modules = nil; o.Hugepages.Count = 64 })
	h, rec, _ := newTest(t, e, o)
	start(t, h)
	if res, ok := rec.WaitFor(health.Hugepages, 5*time.Second, func(r health.Result) bool { return r.OK }); !ok {
		t.Fatalf("hugepages %+v; want ok", res)
	}
	e.host.SetPool(10) // someone lowered the pool
	deadline := time.Now().Add(5 * time.Second)
	for testutil.ToFloat64(h.m.changes.WithLabelValues("hugepages_pool")) < 2 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if got := testutil.ToFloat64(h.m.changes.WithLabelValues("hugepages_pool")); got != 2 {
		t.Fatalf("changes_total{what=hugepages_pool} = %v; want 2 (set, then restored after drift)", got)
	}
	if got := strings.TrimSpace(e.host.Read(poolFile)); got != "64" {
		t.Errorf("nr_hugepages = %s after drift; want 64 restored", got)
	}
}

func TestUpdateAppliesLive(t *testing.T) {
	e := newEnv(t, fakehost.Config{})
	o := e.opts(func(o *Options) { o.Modules = nil; o.Hugepages.Count = 8; o.Reverify = time.Hour })
	h, rec, _ := newTest(t, e, o)
	start(t, h)
	if res, ok := rec.WaitFor(health.Hugepages, 5*time.Second, func(r health.Result) bool { return r.OK }); !ok {
		t.Fatalf("hugepages %+v; want ok", res)
	}
	o.Hugepages.Count = 16
	if err := h.Update(o); err != nil {
		t.Fatalf("Update: %v; want nil (applied live)", err)
	}
	if res, ok := rec.WaitFor(health.Hugepages, 5*time.Second, func(r health.Result) bool {
		return r.OK && strings.HasPrefix(r.Detail, "16/16")
	}); !ok {
		t.Fatalf("hugepages %+v after Update; want 16/16 (without waiting for the hour-long reverify)", res)
	}
}

func TestRunReportsOnlyChanges(t *testing.T) {
	e := newEnv(t, fakehost.Config{Loaded: []string{"vfio_pci"}, IOMMUGroups: 1})
	o := e.opts(func(o *Options) { o.Hugepages.Count = 8 })
	h, rec, _ := newTest(t, e, o)
	start(t, h)
	// the first pass creates the files, the second finds them unchanged; later passes
	// report nothing new
	if _, ok := rec.WaitFor(health.Hugepages, 5*time.Second, func(r health.Result) bool { return strings.Contains(r.Detail, "unchanged") }); !ok {
		t.Fatalf("no \"unchanged\" hugepages report")
	}
	time.Sleep(10 * o.Reverify)
	counts := map[string]int{}
	for _, r := range rec.History() {
		counts[r.Name]++
	}
	want := map[string]int{health.Hugepages: 2, health.Modules: 2, health.IOMMU: 1}
	if !maps.Equal(counts, want) {
		t.Errorf("reports per check %v; want %v", counts, want)
	}
}

func TestMetrics(t *testing.T) {
	e := newEnv(t, fakehost.Config{NUMANodes: 2})
	o := e.opts(func(o *Options) { o.Modules = nil; o.Hugepages.Count = 100 })
	h, _, reg := newTest(t, e, o)
	// series exist from New on, before any I/O
	if n := testutil.CollectAndCount(reg, "nodeagent_hostprep_hugepages"); n != 3 {
		t.Errorf("%d hugepages series after New; want 3 (total requested/allocated/free)", n)
	}
	if n := testutil.CollectAndCount(reg, "nodeagent_hostprep_changes_total"); n != len(changeKinds) {
		t.Errorf("%d changes series after New; want %d", n, len(changeKinds))
	}
	e.host.SetCap(99)
	p := &pass{o: h.options(), d: e.d, log: h.log, m: h.m, apply: true, st: &h.st}
	p.all(context.Background())
	want := `
# HELP nodeagent_hostprep_hugepages 2 MiB hugepages: requested (node="total" only), allocated and free, node="total" for the whole pool and "0", "1", ... per NUMA node.
# TYPE nodeagent_hostprep_hugepages gauge
nodeagent_hostprep_hugepages{node="0",state="allocated"} 50
nodeagent_hostprep_hugepages{node="0",state="free"} 50
nodeagent_hostprep_hugepages{node="1",state="allocated"} 49
nodeagent_hostprep_hugepages{node="1",state="free"} 49
nodeagent_hostprep_hugepages{node="total",state="allocated"} 99
nodeagent_hostprep_hugepages{node="total",state="free"} 99
nodeagent_hostprep_hugepages{node="total",state="requested"} 100
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "nodeagent_hostprep_hugepages"); err != nil {
		t.Error(err)
	}
	for what, n := range map[string]float64{"hugepages_pool": 1, "sysctl_file": 1, "module_load": 0} {
		if got := testutil.ToFloat64(h.m.changes.WithLabelValues(what)); got != n {
			t.Errorf("changes_total{what=%q} = %v; want %v", what, got, n)
		}
	}
	// a second New on the same registry fails clearly
	if _, err := New(o, nil, reg, nil); err == nil {
		t.Errorf("second New on the same registry: nil error; want a registration error")
	}
}

func TestNewDoesNoIO(t *testing.T) {
	root := filepath.Join(t.TempDir(), "host")
	if _, err := New(Options{HostRoot: root, Hugepages: Hugepages{Count: 8, SysctlFile: "/etc/x.conf"}, BPFFS: "/sys/fs/bpf"}, nil, prometheus.NewRegistry(), nil); err != nil {
		t.Fatal(err)
	}
	if exists(root) {
		t.Errorf("New created %s", root)
	}
}

func TestWriteAtomic(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "sub", "f.conf")
	mf, err := readManaged(path)
	if err != nil {
		t.Fatal(err)
	}
	wr, err := writeAtomic(mf, path, []byte("a\n"))
	if err != nil || wr != created {
		t.Fatalf("first write: %v, %v; want created", wr, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		t.Fatal(err)
	}
	mf, _ = readManaged(path)
	if wr, err = writeAtomic(mf, path, []byte("a\n")); err != nil || wr != unchanged {
		t.Errorf("same content: %v, %v; want unchanged", wr, err)
	}
	if wr, err = writeAtomic(mf, path, []byte("b\n")); err != nil || wr != updated {
		t.Errorf("new content: %v, %v; want updated", wr, err)
	}
	st, _ := os.Stat(path)
	if st.Mode().Perm() != 0o600 {
		t.Errorf("mode %v after rewrite; want 0600 kept", st.Mode().Perm())
	}
	if err := os.Mkdir(filepath.Join(dir, "d"), 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := readManaged(filepath.Join(dir, "d")); err == nil {
		t.Errorf("readManaged of a directory: nil error; want not a regular file")
	}
	entries, _ := os.ReadDir(filepath.Dir(path))
	if len(entries) != 1 {
		t.Errorf("directory holds %d entries; want only f.conf", len(entries))
	}
}

func TestPathStaysUnderHostRoot(t *testing.T) {
	o := Options{HostRoot: "/host"}
	for _, tt := range []struct {
		parts []string
		want  string
	}{
		{[]string{"/etc/sysctl.d/calico.conf"}, "/host/etc/sysctl.d/calico.conf"},
		{[]string{"/../../etc/passwd"}, "/host/etc/passwd"},
		{[]string{"/sys/class/net", "../../../../root", "device"}, "/host/root/device"},
		{[]string{"etc/x"}, "/host/etc/x"},
	} {
		if got := o.path(tt.parts...); got != tt.want {
			t.Errorf("path(%q) = %q; want %q", tt.parts, got, tt.want)
		}
	}
}

func TestSysctlFileSymlinkNotFollowed(t *testing.T) {
	e := newEnv(t, fakehost.Config{})
	e.host.Put("etc/sysctl.conf", "kernel.x = 1\n")
	e.host.Mkdir("etc/sysctl.d")
	if err := os.Symlink("/etc/sysctl.conf", filepath.Join(e.host.Root, sysctlFile)); err != nil {
		t.Fatal(err)
	}
	before := e.host.Snapshot(t)
	res := e.pass(t, e.opts(func(o *Options) { o.Modules = nil }), nil, nil)[health.Hugepages]
	if !strings.Contains(res.Detail, "is a symbolic link: not following it") {
		t.Errorf("detail %q; want a symlink warning", res.Detail)
	}
	after := e.host.Snapshot(t)
	for _, rel := range []string{sysctlFile, "etc/sysctl.conf"} {
		if before[rel] != after[rel] {
			t.Errorf("%s changed: %q -> %q", rel, before[rel], after[rel])
		}
	}
}
