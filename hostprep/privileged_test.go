package hostprep

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nodeagent/nodeagent/agent/health"
	"github.com/nodeagent/nodeagent/hostprep/internal/fakehost"
	"github.com/nodeagent/nodeagent/test/privtest"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
)

const realPool = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"

// realPoolSize reads the real 2 MiB pool, skipping the test when the kernel has none,
// and restores the value it read when the test ends, whether or not it passed.
func realPoolSize(t *testing.T) int64 {
	t.Helper()
	privtest.Root(t)
	orig, err := readInt(realPool)
	if err != nil {
		privtest.Skip(t, "no 2MiB hugepage pool: "+err.Error())
	}
	t.Cleanup(func() {
		if err := os.WriteFile(realPool, []byte(strconv.FormatInt(orig, 10)), 0); err != nil {
			t.Errorf("restore %s to %d: %v", realPool, orig, err)
			return
		}
		if got, _ := readInt(realPool); got != orig {
			t.Errorf("%s = %d after restore; want %d", realPool, got, orig)
		}
	})
	return orig
}

// TestPrivilegedHugepagePool sets a small pool on this machine's kernel through the real
// sysfs file with the full Run loop, checks /proc/meminfo, and mounts a real bpffs on a
// temporary directory. The persistent file goes to a temporary directory, not /etc.
func TestPrivilegedHugepagePool(t *testing.T) {
	orig := realPoolSize(t)
	tmp := t.TempDir()
	bpf := filepath.Join(tmp, "bpf")
	t.Cleanup(func() {
		if ok, _ := (realMounter{}).IsBPFFS(bpf); ok {
			if err := unix.Unmount(bpf, 0); err != nil {
				t.Errorf("unmount %s: %v", bpf, err)
			}
		}
	})
	want := orig + 8
	o := Options{
		HostRoot:     "/",
		Hugepages:    Hugepages{Count: int(want), SysctlFile: filepath.Join(tmp, "sysctl.d", "calico.conf")},
		BPFFS:        bpf,
		RetryInitial: 50 * time.Millisecond,
		RetryMax:     200 * time.Millisecond,
	}
	reg := prometheus.NewRegistry()
	rec := health.NewRecorder()
	h, err := New(o, testLogger(t), reg, rec)
	if err != nil {
		t.Fatal(err)
	}
	began := time.Now()
	start(t, h)
	res, ok := rec.WaitFor(health.Hugepages, 20*time.Second, func(r health.Result) bool { return r.OK })
	if !ok {
		t.Fatalf("hugepages %+v; want ok with %d pages", res, want)
	}
	t.Logf("pool %d -> %d reported ok after %v: %s", orig, want, time.Since(began), res.Detail)
	if got, _ := readInt(realPool); got != want {
		t.Errorf("%s = %d; want %d", realPool, got, want)
	}
	mi, err := readMeminfo("/proc/meminfo")
	if err != nil {
		t.Fatal(err)
	}
	if mi["Hugepagesize"] == pageKB {
		if mi["HugePages_Total"] != want {
			t.Errorf("/proc/meminfo HugePages_Total = %d; want %d", mi["HugePages_Total"], want)
		}
		b, _ := os.ReadFile(o.Hugepages.SysctlFile)
		if !strings.Contains(string(b), "\nvm.nr_hugepages = "+strconv.FormatInt(want, 10)+"\n") {
			t.Errorf("sysctl file %q; want vm.nr_hugepages = %d", b, want)
		}
	} else {
		t.Logf("default hugepage size is %d kB: /proc/meminfo shows the other pool", mi["Hugepagesize"])
	}
	if res, ok := rec.WaitFor(CheckBPFFS, 10*time.Second, func(r health.Result) bool { return r.OK }); !ok {
		t.Errorf("bpffs %+v; want mounted", res)
	}
	if ok, err := (realMounter{}).IsBPFFS(bpf); !ok || err != nil {
		t.Errorf("%s is bpffs: %v, %v; want true", bpf, ok, err)
	}
}

// TestPrivilegedCheckOnRealHost runs the one-shot Check against the real host with a
// pool that differs from the current one: it must report and change nothing.
func TestPrivilegedCheckOnRealHost(t *testing.T) {
	orig := realPoolSize(t)
	tmp := t.TempDir()
	o := Options{
		HostRoot:    "/",
		Hugepages:   Hugepages{Count: int(orig) + 8, SysctlFile: filepath.Join(tmp, "calico.conf")},
		Modules:     []string{"vfio-pci"},
		ModulesFile: filepath.Join(tmp, "modules.conf"),
		BPFFS:       filepath.Join(tmp, "bpf"),
	}
	results := Check(context.Background(), o)
	for _, r := range results {
		t.Logf("%s ok=%v: %s", r.Name, r.OK, r.Detail)
	}
	if got, _ := readInt(realPool); got != orig {
		t.Errorf("%s = %d after Check; want %d unchanged", realPool, got, orig)
	}
	if entries, _ := os.ReadDir(tmp); len(entries) != 0 {
		t.Errorf("Check created %d entries in %s; want none", len(entries), tmp)
	}
	if len(results) != 4 || results[0].OK {
		t.Errorf("results %+v; want 4 with a failing hugepages check", results)
	}
}

// TestPrivilegedModprobeChroot runs a stand-in modprobe for real, chrooted into a
// temporary host_root, and reports its stderr when it fails.
func TestPrivilegedModprobeChroot(t *testing.T) {
	privtest.Root(t)
	h := fakehost.New(t, fakehost.Config{OSID: "centos", OSIDLike: "rhel fedora", IOMMUGroups: 1})
	h.Put("fake-host-root", "")
	goBin, err := exec.LookPath("go") // go test puts its GOROOT/bin first on PATH
	if err != nil {
		t.Fatalf("find the go command to build the fake modprobe: %v", err)
	}
	build := exec.Command(goBin, "build", "-o", filepath.Join(h.Root, "usr/sbin/modprobe"), "./testdata/fakemodprobe")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build fake modprobe: %v\n%s", err, out)
	}
	o := Options{
		HostRoot:    h.Root,
		Modules:     []string{"vfio-pci", "nosuch"},
		ModulesFile: "/etc/modules-load.d/calico-vfio-pci.conf",
	}.withDefaults()
	p := &pass{o: o, d: realDeps(), log: testLogger(t), apply: true, st: &runState{}}
	res := p.modules(context.Background())
	for _, want := range []string{
		"vfio-pci: loaded now",
		"nosuch: modprobe nosuch: exit status 1: modprobe: FATAL: Module nosuch not found in directory /lib/modules/6.18.0-test",
	} {
		if !strings.Contains(res.Detail, want) {
			t.Errorf("detail %q; want it to contain %q", res.Detail, want)
		}
	}
	if res.OK {
		t.Errorf("modules ok with an unknown module; want failing")
	}
	if got, want := h.Read(modsFile), blockBegin+"\nvfio_pci\n"+blockEnd+"\n"; got != want {
		t.Errorf("modules file %q; want %q (vfio_pci on CentOS, nosuch not persisted)", got, want)
	}
}

func TestExecRunnerStderr(t *testing.T) {
	stderr, err := (execRunner{}).Run(context.Background(), "/", "/bin/sh", "-c", "echo 'modprobe: ERROR: could not insert' >&2; exit 3")
	if err == nil || !strings.Contains(err.Error(), "exit status 3") {
		t.Errorf("err = %v; want exit status 3", err)
	}
	if got := strings.TrimSpace(string(stderr)); got != "modprobe: ERROR: could not insert" {
		t.Errorf("stderr %q; want the command's stderr", got)
	}
}

func TestKernelFilesNeverCreate(t *testing.T) {
	p := filepath.Join(t.TempDir(), "nr_hugepages")
	if err := (kernelFiles{}).WriteFile(p, []byte("8")); err == nil {
		t.Errorf("write to a missing kernel file: nil error; want not exist")
	}
	if exists(p) {
		t.Errorf("kernel writer created %s", p)
	}
}
