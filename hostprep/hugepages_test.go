package hostprep

import (
	"os"
	"strings"
	"testing"
	"time"

	"github.com/nodeagent/nodeagent/agent/health"
	"github.com/nodeagent/nodeagent/hostprep/internal/fakehost"
)

const (
	poolFile   = "sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
	sysctlFile = "etc/sysctl.d/calico.conf"
	modsFile   = "etc/modules-load.d/calico-vfio-pci.conf"
)

func TestHugepagesApply(t *testing.T) {
	tests := []struct {
		name      string
		cfg       fakehost.Config
		cap       int64 // fake kernel's limit; 0: none
		mut       func(*Options)
		wantOK    bool
		wantPool  string // nr_hugepages after the pass
		wantFile  string // sysctl file content ("" : must not exist)
		wantInDet []string
		wantNoW   bool // no kernel writes at all
	}{
		{
			name: "2MiB default, one node", wantOK: true, wantPool: "512",
			wantFile:  blockBegin + "\nvm.nr_hugepages = 512\n" + blockEnd + "\n",
			wantInDet: []string{"512/512 2MiB pages", "/etc/sysctl.d/calico.conf created"},
		},
		{
			name: "2MiB default, two nodes", cfg: fakehost.Config{NUMANodes: 2}, wantOK: true, wantPool: "512",
			wantFile:  blockBegin + "\nvm.nr_hugepages = 512\n" + blockEnd + "\n",
			wantInDet: []string{"512/512", "node0 256, node1 256"},
		},
		{
			name: "1GiB default: set through sysfs, not persisted by sysctl", cfg: fakehost.Config{DefaultPageKB: 1 << 20},
			wantOK: true, wantPool: "512",
			wantInDet: []string{"512/512", "default hugepage size is 1048576 kB", "hugepagesz=2M hugepages=512"},
		},
		{
			name:   "1GiB default, persisted on the command line",
			cfg:    fakehost.Config{DefaultPageKB: 1 << 20, Cmdline: "ro default_hugepagesz=1G hugepagesz=1G hugepages=2 hugepagesz=2M hugepages=512"},
			wantOK: true, wantPool: "512", wantInDet: []string{"persisted on the kernel command line (512 pages)"},
		},
		{
			name: "partial allocation", cap: 300, wantOK: false, wantPool: "300",
			wantFile:  blockBegin + "\nvm.nr_hugepages = 512\n" + blockEnd + "\n",
			wantInDet: []string{"only 300/512 2MiB pages allocated"},
		},
		{
			name: "larger pool kept", cfg: fakehost.Config{Pool: 1024}, wantOK: true, wantPool: "1024", wantNoW: true,
			wantFile:  blockBegin + "\nvm.nr_hugepages = 1024\n" + blockEnd + "\n",
			wantInDet: []string{"1024/512", "kept the larger existing pool of 1024"},
		},
		{
			name: "larger pool shrunk when allowed", cfg: fakehost.Config{Pool: 1024},
			mut:    func(o *Options) { o.Hugepages.AllowShrink = true },
			wantOK: true, wantPool: "512",
			wantFile: blockBegin + "\nvm.nr_hugepages = 512\n" + blockEnd + "\n",
		},
		{
			name: "negative count", mut: func(o *Options) { o.Hugepages.Count = -3 },
			wantPool: "0", wantNoW: true, wantInDet: []string{"hugepages.count -3 is negative"},
		},
		{
			name: "more pages than memory", cfg: fakehost.Config{MemTotalKB: 1 << 20},
			mut:      func(o *Options) { o.Hugepages.Count = 1000 },
			wantPool: "0", wantNoW: true, wantInDet: []string{"hugepages.count 1000 (2000 MiB) is more than the node's memory (MemTotal 1024 MiB)"},
		},
		{
			name: "count that overflows a byte size", mut: func(o *Options) { o.Hugepages.Count = 1 << 62 },
			wantPool: "0", wantNoW: true, wantInDet: []string{"hugepages.count 4611686018427387904 (9223372036854775808 MiB) is more than the node's memory"},
		},
		{
			name: "missing sysfs pool", cfg: fakehost.Config{No2MPool: true},
			wantNoW: true, wantInDet: []string{"no 2MiB hugepage pool on this kernel"},
		},
		{
			name: "nothing requested", mut: func(o *Options) { o.Hugepages.Count = 0 }, cfg: fakehost.Config{Pool: 4},
			wantOK: true, wantPool: "4", wantNoW: true, wantInDet: []string{"no 2MiB pages requested (pool has 4)"},
		},
		{
			name: "uplink on a node without pages", cfg: fakehost.Config{NUMANodes: 2, Uplink: "eth1", UplinkNUMA: 1},
			mut:    func(o *Options) { o.Hugepages.Count = 1; o.UplinkInterface = "eth1" },
			wantOK: false, wantPool: "1",
			wantFile:  blockBegin + "\nvm.nr_hugepages = 1\n" + blockEnd + "\n",
			wantInDet: []string{"uplink eth1 is on NUMA node 1, which has no 2MiB pages"},
		},
		{
			name: "uplink on a node with pages", cfg: fakehost.Config{NUMANodes: 2, Uplink: "eth1", UplinkNUMA: 1},
			mut:    func(o *Options) { o.UplinkInterface = "eth1" },
			wantOK: true, wantPool: "512",
			wantFile:  blockBegin + "\nvm.nr_hugepages = 512\n" + blockEnd + "\n",
			wantInDet: []string{"uplink eth1 on NUMA node 1 (256 pages there)"},
		},
		{
			name: "uplink without NUMA information", mut: func(o *Options) { o.UplinkInterface = "eth9" },
			wantOK: true, wantPool: "512",
			wantFile:  blockBegin + "\nvm.nr_hugepages = 512\n" + blockEnd + "\n",
			wantInDet: []string{"uplink eth9: NUMA node unknown (interface not found)"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, tt.cfg)
			if tt.cap > 0 {
				e.host.SetCap(tt.cap)
			}
			o := e.opts(func(o *Options) {
				o.Modules = nil
				if tt.mut != nil {
					tt.mut(o)
				}
			})
			res := e.pass(t, o, nil, nil)[health.Hugepages]
			if res.OK != tt.wantOK {
				t.Errorf("ok = %v; want %v (detail %q)", res.OK, tt.wantOK, res.Detail)
			}
			for _, s := range tt.wantInDet {
				if !strings.Contains(res.Detail, s) {
					t.Errorf("detail %q; want it to contain %q", res.Detail, s)
				}
			}
			if tt.wantPool != "" {
				if got := strings.TrimSpace(e.host.Read(poolFile)); got != tt.wantPool {
					t.Errorf("nr_hugepages = %s; want %s", got, tt.wantPool)
				}
			}
			if got := e.host.Read(sysctlFile); got != tt.wantFile {
				t.Errorf("sysctl file:\n%s\nwant:\n%s", got, tt.wantFile)
			}
			if w := e.host.Writes(); tt.wantNoW && len(w) > 0 {
				t.Errorf("kernel writes %v; want none", w)
			}
		})
	}
}

func TestPartialAllocationCompactsAndAsksAgain(t *testing.T) {
	e := newEnv(t, fakehost.Config{})
	e.host.SetCap(100)
	res := e.pass(t, e.opts(func(o *Options) { o.Modules = nil }), nil, nil)[health.Hugepages]
	if res.OK {
		t.Fatalf("ok with 100 of 512 pages: %q", res.Detail)
	}
	want := []string{poolFile + "=512", "proc/sys/vm/compact_memory=1", poolFile + "=512"}
	if got := e.host.Writes(); strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("kernel writes %v; want %v", got, want)
	}
}

func TestMeminfoDisagreementReported(t *testing.T) {
	e := newEnv(t, fakehost.Config{Pool: 8})
	e.host.Put("proc/meminfo", "MemTotal: 25165824 kB\nMemFree: 1000 kB\nHugePages_Total: 6\nHugepagesize: 2048 kB\n")
	res := e.pass(t, e.opts(func(o *Options) { o.Modules = nil; o.Hugepages.Count = 8; o.Mode = ModeCheck }), nil, nil)[health.Hugepages]
	if want := "/proc/meminfo HugePages_Total 6 differs from sysfs 8"; !strings.Contains(res.Detail, want) {
		t.Errorf("detail %q; want %q", res.Detail, want)
	}
}

func TestSysctlFile(t *testing.T) {
	tests := []struct {
		name, in, want string
		defaultKB      int64
		wantInDet      []string
	}{
		{
			name: "wrong key of the copied guide corrected",
			in:   "vm_nr.hugepages = 512\n",
			want: "# vm_nr.hugepages = 512  # nodeagent: vm_nr.hugepages is not a sysctl key; vm.nr_hugepages is set below\n" +
				blockBegin + "\nvm.nr_hugepages = 512\n" + blockEnd + "\n",
			wantInDet: []string{`corrected /etc/sysctl.d/calico.conf: "vm_nr.hugepages" is not a sysctl key`},
		},
		{
			name: "foreign lines kept, block replaced in place",
			in: "# tuned by ops\nnet.core.somaxconn = 4096\n" + blockBegin + "\nvm.nr_hugepages = 64\n" + blockEnd +
				"\nkernel.pid_max=4194304\n",
			want: "# tuned by ops\nnet.core.somaxconn = 4096\n" + blockBegin + "\nvm.nr_hugepages = 512\n" + blockEnd +
				"\nkernel.pid_max=4194304\n",
			wantInDet: []string{"/etc/sysctl.d/calico.conf updated"},
		},
		{
			name: "foreign vm.nr_hugepages superseded",
			in:   "vm.nr_hugepages=128\nvm.swappiness = 10\n",
			want: "# vm.nr_hugepages=128  # nodeagent: superseded by the block below\nvm.swappiness = 10\n" +
				blockBegin + "\nvm.nr_hugepages = 512\n" + blockEnd + "\n",
		},
		{
			name: "1GiB default: foreign vm.nr_hugepages sizes the 1GiB pool and is kept, old block removed",
			in:   "vm.nr_hugepages = 4\n" + blockBegin + "\nvm.nr_hugepages = 512\n" + blockEnd + "\n",
			want: "vm.nr_hugepages = 4\n", defaultKB: 1 << 20,
		},
		{
			name: "duplicate and unterminated blocks collapse into one",
			in: "a.b = 1\n" + blockBegin + "\nvm.nr_hugepages = 1\n" + blockEnd + "\n" + blockBegin + "\nvm.nr_hugepages = 2\n" +
				blockEnd + "\nc.d = 2\n" + blockBegin + "\nvm.nr_hugepages = 3\n",
			want: "a.b = 1\n" + blockBegin + "\nvm.nr_hugepages = 512\n" + blockEnd + "\nc.d = 2\n",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, fakehost.Config{DefaultPageKB: tt.defaultKB})
			e.host.Put(sysctlFile, tt.in)
			o := e.opts(func(o *Options) { o.Modules = nil })
			res := e.pass(t, o, nil, nil)[health.Hugepages]
			if got := e.host.Read(sysctlFile); got != tt.want {
				t.Errorf("file:\n%s\nwant:\n%s", got, tt.want)
			}
			for _, s := range tt.wantInDet {
				if !strings.Contains(res.Detail, s) {
					t.Errorf("detail %q; want it to contain %q", res.Detail, s)
				}
			}
			// a second run changes nothing and says so
			res = e.pass(t, o, nil, nil)[health.Hugepages]
			if got := e.host.Read(sysctlFile); got != tt.want {
				t.Errorf("second run changed the file:\n%s", got)
			}
			if tt.defaultKB == 0 && !strings.Contains(res.Detail, "calico.conf unchanged") {
				t.Errorf("second run detail %q; want \"unchanged\"", res.Detail)
			}
		})
	}
}

func TestSysctlFileReadOnly(t *testing.T) {
	e := newEnv(t, fakehost.Config{})
	e.host.Put(sysctlFile, "vm_nr.hugepages = 512\n")
	if err := chmod(e.host.Root+"/"+sysctlFile, 0o444); err != nil {
		t.Fatal(err)
	}
	before := e.host.Snapshot(t)
	res := e.pass(t, e.opts(func(o *Options) { o.Modules = nil }), nil, nil)[health.Hugepages]
	if want := "warning: not persisted: /etc/sysctl.d/calico.conf: file is read-only"; !strings.Contains(res.Detail, want) {
		t.Errorf("detail %q; want it to contain %q", res.Detail, want)
	}
	if !res.OK {
		t.Errorf("ok = false; want true: the pool is allocated, only persisting failed (%q)", res.Detail)
	}
	after := e.host.Snapshot(t)
	for _, rel := range []string{sysctlFile, "etc/sysctl.d"} {
		if before[rel] != after[rel] {
			t.Errorf("%s changed: %q; want %q", rel, after[rel], before[rel])
		}
	}
	for rel := range after {
		if strings.Contains(rel, tmpInfix) {
			t.Errorf("temporary file %s left behind", rel)
		}
	}
}

func TestKubeletRestartWarning(t *testing.T) {
	e := newEnv(t, fakehost.Config{})
	e.host.AddKubelet(4242, e.now.Add(-10*time.Minute))
	o := e.opts(func(o *Options) { o.Modules = nil })
	st := &runState{}
	res := e.pass(t, o, st, nil)[health.Hugepages]
	want := "warning: kubelet (pid 4242) started"
	if !strings.Contains(res.Detail, want) || !strings.Contains(res.Detail, "restart it so it advertises hugepages-2Mi") {
		t.Errorf("detail %q; want a kubelet restart warning", res.Detail)
	}
	// the kubelet restarts after the change: the warning goes
	e.host.AddKubelet(4242, e.now.Add(5*time.Second))
	res = e.pass(t, o, st, nil)[health.Hugepages]
	if strings.Contains(res.Detail, "kubelet") {
		t.Errorf("detail %q after the kubelet restarted; want no warning", res.Detail)
	}
}

func TestNoKubeletWarningWithoutChange(t *testing.T) {
	e := newEnv(t, fakehost.Config{Pool: 512})
	e.host.AddKubelet(77, e.now.Add(-time.Minute))
	res := e.pass(t, e.opts(func(o *Options) { o.Modules = nil }), nil, nil)[health.Hugepages]
	if strings.Contains(res.Detail, "kubelet") {
		t.Errorf("detail %q; want no kubelet warning when the pool did not change", res.Detail)
	}
}

func TestStartTicks(t *testing.T) {
	tests := []struct {
		stat string
		want int64
		ok   bool
	}{
		{"1 (systemd) S 0 1 1 0 -1 4194560 1 2 3 4 5 6 7 8 20 0 1 0 17 1000 2 18446744073709551615", 17, true},
		{"9 (a) b) (c) R 1 9 9 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 99 0 0 0", 99, true},
		{"9 (short) R 1", 0, false},
		{"garbage", 0, false},
	}
	for _, tt := range tests {
		got, ok := startTicks([]byte(tt.stat))
		if got != tt.want || ok != tt.ok {
			t.Errorf("startTicks(%q) = %d, %v; want %d, %v", tt.stat, got, ok, tt.want, tt.ok)
		}
	}
}

func TestCmdlinePages(t *testing.T) {
	tests := []struct {
		cmdline string
		want    int64
	}{
		{"ro quiet", 0},
		{"hugepages=256", 256},
		{"default_hugepagesz=1G hugepages=4", 0},
		{"default_hugepagesz=1G hugepagesz=2M hugepages=64", 64},
		{"hugepagesz=1G hugepages=4 hugepagesz=2M hugepages=0:100,1:28", 128},
	}
	for _, tt := range tests {
		e := newEnv(t, fakehost.Config{Cmdline: tt.cmdline})
		if got := cmdlinePages(Options{HostRoot: e.host.Root}); got != tt.want {
			t.Errorf("cmdlinePages(%q) = %d; want %d", tt.cmdline, got, tt.want)
		}
	}
}

func TestWrongKeyDetection(t *testing.T) {
	for key, want := range map[string]bool{
		"vm_nr.hugepages": true, "vm.nr_hugepage": true, "vm_nr_hugepages": true, "vm.hugepages": true,
		"vm.nr_hugepages": false, "vm/nr_hugepages": false, "vm.nr_hugepages_mempolicy": false,
		"vm.nr_overcommit_hugepages": false, "net.core.somaxconn": false,
	} {
		if got := isWrongHugepagesKey(key); got != want {
			t.Errorf("isWrongHugepagesKey(%q) = %v; want %v", key, got, want)
		}
	}
}

func TestCheckModeReportsWrongKey(t *testing.T) {
	e := newEnv(t, fakehost.Config{Pool: 512})
	e.host.Put(sysctlFile, "vm_nr.hugepages = 512\n")
	res := e.pass(t, e.opts(func(o *Options) { o.Modules = nil; o.Mode = ModeCheck }), nil, nil)[health.Hugepages]
	for _, want := range []string{
		`warning: /etc/sysctl.d/calico.conf: "vm_nr.hugepages" is not a sysctl key (sysctl ignores it)`,
		"warning: /etc/sysctl.d/calico.conf does not set vm.nr_hugepages = 512 (mode check: not written)",
	} {
		if !strings.Contains(res.Detail, want) {
			t.Errorf("detail %q; want it to contain %q", res.Detail, want)
		}
	}
	if !res.OK {
		t.Errorf("ok = false with 512/512 allocated; want true (persistence problems are warnings)")
	}
	if got := e.host.Read(sysctlFile); got != "vm_nr.hugepages = 512\n" {
		t.Errorf("mode check changed the file: %q", got)
	}
}

// failingKernel refuses every write, as a kernel does without CAP_SYS_ADMIN.
type failingKernel struct{}

func (failingKernel) WriteFile(path string, _ []byte) error {
	return &os.PathError{Op: "open", Path: path, Err: os.ErrPermission}
}

func TestPoolWriteRefused(t *testing.T) {
	e := newEnv(t, fakehost.Config{})
	e.d.sysfs = failingKernel{}
	res := e.pass(t, e.opts(func(o *Options) { o.Modules = nil }), nil, nil)[health.Hugepages]
	want := "set 2MiB pool to 512: open /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages: permission denied"
	if res.OK || res.Detail != want {
		t.Errorf("ok %v, detail %q; want failing with %q", res.OK, res.Detail, want)
	}
	if got := e.host.Read(sysctlFile); got != "" {
		t.Errorf("sysctl file written after the pool write failed: %q", got)
	}
}
