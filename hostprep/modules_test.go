package hostprep

import (
	"strings"
	"testing"

	"github.com/nodeagent/nodeagent/agent/health"
	"github.com/nodeagent/nodeagent/hostprep/internal/fakehost"
)

func TestModules(t *testing.T) {
	const notFound = "modprobe: FATAL: Module nosuch not found in directory /lib/modules/6.18.0-test"
	tests := []struct {
		name      string
		cfg       fakehost.Config
		modules   []string
		mode      Mode
		wantOK    bool
		wantCalls []string // modprobe argv, root replaced by ROOT
		wantFile  string   // modules file ("" : must not exist)
		wantInDet []string
	}{
		{
			name: "already loaded", cfg: fakehost.Config{Loaded: []string{"vfio_pci"}, Modprobe: true},
			modules: []string{"vfio-pci"}, wantOK: true,
			wantFile:  blockBegin + "\nvfio-pci\n" + blockEnd + "\n",
			wantInDet: []string{"vfio-pci: loaded", "calico-vfio-pci.conf created"},
		},
		{
			name: "built in, seen as a PCI driver", cfg: fakehost.Config{PCIDrivers: []string{"vfio-pci"}},
			modules: []string{"vfio-pci"}, wantOK: true,
			wantFile:  blockBegin + "\nvfio-pci\n" + blockEnd + "\n",
			wantInDet: []string{"vfio-pci: built-in"},
		},
		{
			name: "built in, with /sys/module parameters", cfg: fakehost.Config{Builtin: []string{"vfio"}},
			modules: []string{"vfio"}, wantOK: true, wantInDet: []string{"vfio: built-in"},
			wantFile: blockBegin + "\nvfio\n" + blockEnd + "\n",
		},
		{
			name: "built in, listed in modules.builtin", cfg: fakehost.Config{ModulesBuiltin: []string{"kernel/drivers/uio/uio_pci_generic.ko"}},
			modules: []string{"uio-pci-generic"}, wantOK: true, wantInDet: []string{"uio-pci-generic: built-in"},
			wantFile: blockBegin + "\nuio-pci-generic\n" + blockEnd + "\n",
		},
		{
			name: "absent, loaded through the host's modprobe", cfg: fakehost.Config{Modprobe: true, OSID: "debian"},
			modules: []string{"vfio-pci"}, wantOK: true,
			wantCalls: []string{"ROOT|/usr/sbin/modprobe vfio-pci"},
			wantFile:  blockBegin + "\nvfio-pci\n" + blockEnd + "\n",
			wantInDet: []string{"vfio-pci: loaded now"},
		},
		{
			name: "RHEL family spells it vfio_pci", cfg: fakehost.Config{Modprobe: true, OSID: "rocky", OSIDLike: "rhel centos fedora"},
			modules: []string{"vfio-pci"}, wantOK: true,
			wantCalls: []string{"ROOT|/usr/sbin/modprobe vfio-pci"},
			wantFile:  blockBegin + "\nvfio_pci\n" + blockEnd + "\n",
		},
		{
			name: "unknown module: modprobe's stderr, not persisted", cfg: fakehost.Config{Modprobe: true, Loaded: []string{"vfio"}},
			modules: []string{"vfio", "nosuch"}, wantOK: false,
			wantCalls: []string{"ROOT|/usr/sbin/modprobe nosuch"},
			wantFile:  blockBegin + "\nvfio\n" + blockEnd + "\n",
			wantInDet: []string{"nosuch: modprobe nosuch: exit status 1: " + notFound, "vfio: loaded"},
		},
		{
			name: "no modprobe on the host", modules: []string{"vfio-pci"}, wantOK: false,
			wantInDet: []string{"vfio-pci: not loaded, and no modprobe under host_root"},
		},
		{
			name: "not a module name", cfg: fakehost.Config{Modprobe: true}, modules: []string{"-r", "../x"}, wantOK: false,
			wantInDet: []string{`"-r": not a module name`, `"../x": not a module name`},
		},
		{
			name: "check mode loads nothing and writes nothing", cfg: fakehost.Config{Modprobe: true}, mode: ModeCheck,
			modules: []string{"vfio-pci"}, wantOK: false,
			wantInDet: []string{"vfio-pci: not loaded (mode check: not loading)"},
		},
		{
			name: "none requested", modules: nil, wantOK: true, wantInDet: []string{"no modules requested"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, tt.cfg)
			e.mp.fail = map[string]string{"nosuch": notFound}
			o := e.opts(func(o *Options) {
				o.Hugepages.Count = 0
				o.Modules = tt.modules
				if tt.mode != "" {
					o.Mode = tt.mode
				}
			})
			res := e.pass(t, o, nil, nil)[health.Modules]
			if res.OK != tt.wantOK {
				t.Errorf("ok = %v; want %v (detail %q)", res.OK, tt.wantOK, res.Detail)
			}
			for _, s := range tt.wantInDet {
				if !strings.Contains(res.Detail, s) {
					t.Errorf("detail %q; want it to contain %q", res.Detail, s)
				}
			}
			var calls []string
			for _, c := range e.mp.Calls() {
				calls = append(calls, strings.Replace(c, e.host.Root, "ROOT", 1))
			}
			if strings.Join(calls, "\n") != strings.Join(tt.wantCalls, "\n") {
				t.Errorf("modprobe calls %q; want %q", calls, tt.wantCalls)
			}
			if got := e.host.Read(modsFile); got != tt.wantFile {
				t.Errorf("modules file:\n%s\nwant:\n%s", got, tt.wantFile)
			}
			if tt.wantOK && tt.mode != ModeCheck && len(tt.modules) > 0 {
				// second run: nothing loaded again, file unchanged
				n := len(e.mp.Calls())
				res = e.pass(t, o, nil, nil)[health.Modules]
				if len(e.mp.Calls()) != n {
					t.Errorf("second run called modprobe again: %q", e.mp.Calls())
				}
				if !strings.Contains(res.Detail, "calico-vfio-pci.conf unchanged") {
					t.Errorf("second run detail %q; want \"unchanged\"", res.Detail)
				}
			}
		})
	}
}

func TestModulesFileKeepsForeignLines(t *testing.T) {
	e := newEnv(t, fakehost.Config{Loaded: []string{"vfio_pci"}})
	e.host.Put(modsFile, "# operator's\nuio\n")
	e.pass(t, e.opts(func(o *Options) { o.Hugepages.Count = 0 }), nil, nil)
	want := "# operator's\nuio\n" + blockBegin + "\nvfio-pci\n" + blockEnd + "\n"
	if got := e.host.Read(modsFile); got != want {
		t.Errorf("modules file:\n%s\nwant:\n%s", got, want)
	}
}

func TestIOMMU(t *testing.T) {
	tests := []struct {
		name      string
		cfg       fakehost.Config
		allow     bool
		mode      Mode
		wantOK    bool
		wantParam string // enable_unsafe_noiommu_mode afterwards
		wantInDet []string
	}{
		{name: "IOMMU on", cfg: fakehost.Config{IOMMUGroups: 3}, wantOK: true, wantInDet: []string{"IOMMU on (3 groups): vfio-pci can bind devices"}},
		{name: "no IOMMU, vfio not loaded", wantInDet: []string{"vfio module", "intel_iommu=on", "amd_iommu=on"}},
		{
			name: "no IOMMU, no-IOMMU mode not allowed", cfg: fakehost.Config{NoIOMMU: "N"}, wantParam: "N",
			wantInDet: []string{"vfio-pci cannot bind a device", "intel_iommu=on", "hostprep.allow_noiommu: true", "unsafe"},
		},
		{
			name: "no IOMMU, no-IOMMU mode allowed: turned on", cfg: fakehost.Config{NoIOMMU: "N"}, allow: true,
			wantOK: true, wantParam: "Y", wantInDet: []string{"turned on vfio no-IOMMU mode", "unsafe"},
		},
		{
			name: "no IOMMU, allowed, but mode check", cfg: fakehost.Config{NoIOMMU: "N"}, allow: true, mode: ModeCheck,
			wantParam: "N", wantInDet: []string{"mode check: not turning it on"},
		},
		{
			name: "no-IOMMU mode already on", cfg: fakehost.Config{NoIOMMU: "Y"}, allow: true,
			wantOK: true, wantParam: "Y", wantInDet: []string{"vfio no-IOMMU mode is on"},
		},
		{
			name: "no-IOMMU mode turned on by someone else", cfg: fakehost.Config{NoIOMMU: "Y"},
			wantOK: true, wantParam: "Y", wantInDet: []string{"turned on outside nodeagent"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, tt.cfg)
			o := e.opts(func(o *Options) {
				o.Hugepages.Count = 0
				o.Modules = nil
				o.AllowNoIOMMU = tt.allow
				if tt.mode != "" {
					o.Mode = tt.mode
				}
			})
			res := e.pass(t, o, nil, nil)[health.IOMMU]
			if res.OK != tt.wantOK {
				t.Errorf("ok = %v; want %v (detail %q)", res.OK, tt.wantOK, res.Detail)
			}
			for _, s := range tt.wantInDet {
				if !strings.Contains(res.Detail, s) {
					t.Errorf("detail %q; want it to contain %q", res.Detail, s)
				}
			}
			if got := strings.TrimSpace(e.host.Read("sys/module/vfio/parameters/enable_unsafe_noiommu_mode")); got != tt.wantParam {
				t.Errorf("enable_unsafe_noiommu_mode = %q; want %q", got, tt.wantParam)
			}
		})
	}
}

func TestBPFFS(t *testing.T) {
	for _, mode := range []Mode{ModeApply, ModeCheck} {
		t.Run(string(mode), func(t *testing.T) {
			e := newEnv(t, fakehost.Config{})
			o := e.opts(func(o *Options) { o.Mode = mode; o.Hugepages.Count = 0; o.Modules = nil; o.BPFFS = "/sys/fs/bpf" })
			res := e.pass(t, o, nil, nil)[CheckBPFFS]
			wantOK := mode == ModeApply
			if res.OK != wantOK {
				t.Errorf("ok = %v; want %v (detail %q)", res.OK, wantOK, res.Detail)
			}
			if wantMounts := map[Mode]int{ModeApply: 1}[mode]; e.mnt.mounts != wantMounts {
				t.Errorf("mounts = %d; want %d", e.mnt.mounts, wantMounts)
			}
			if mode == ModeApply {
				res = e.pass(t, o, nil, nil)[CheckBPFFS]
				if res.Detail != "bpffs mounted at /sys/fs/bpf" || e.mnt.mounts != 1 {
					t.Errorf("second pass: detail %q, mounts %d; want already mounted, 1 mount", res.Detail, e.mnt.mounts)
				}
			}
		})
	}
	e := newEnv(t, fakehost.Config{})
	if _, ok := e.pass(t, e.opts(nil), nil, nil)[CheckBPFFS]; ok {
		t.Errorf("bpffs reported with BPFFS empty; want no bpffs check")
	}
}
