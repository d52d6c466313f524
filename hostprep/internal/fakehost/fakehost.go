// Package fakehost builds temporary host_root trees for hostprep's tests: the /proc,
// /sys and /etc files hostprep reads, and a fake kernel behind hostprep's sysfs writer
// that allocates hugepages up to a cap the test sets, as a fragmented machine would.
package fakehost

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Config describes the host to build. Zero values give a one-NUMA-node machine with
// 24 GiB, 2 MiB default pages, an empty pool, no IOMMU and no vfio.
type Config struct {
	DefaultPageKB  int64 // Hugepagesize; 0: 2048
	NUMANodes      int   // node directories under /sys/devices/system/node; 0: 1
	NoNodeDirs     bool  // no /sys/devices/system/node at all
	MemTotalKB     int64 // 0: 24 GiB
	Pool           int64 // 2 MiB pages allocated at start
	No2MPool       bool  // no /sys/kernel/mm/hugepages/hugepages-2048kB (a missing /sys entry)
	IOMMUGroups    int
	NoIOMMU        string // "": vfio not loaded (no parameter file); "N" or "Y"
	OSID, OSIDLike string
	Loaded         []string // modules in /sys/module with an initstate (loadable, loaded)
	Builtin        []string // modules in /sys/module without initstate (built in)
	PCIDrivers     []string // /sys/bus/pci/drivers/<name>
	ModulesBuiltin []string // lines of /lib/modules/<release>/modules.builtin
	Modprobe       bool     // put a /usr/sbin/modprobe file in the tree
	Uplink         string   // an interface under /sys/class/net
	UplinkNUMA     int      // its device/numa_node
	Cmdline        string   // /proc/cmdline
	Btime          int64    // /proc/stat btime; 0: now - 1h
}

// Host is a temporary host_root and its fake kernel.
type Host struct {
	Root string
	cfg  Config

	mu     sync.Mutex
	cap    int64 // most 2 MiB pages the fake kernel can allocate; -1: no limit
	pool   int64
	writes []string
}

// New builds the tree in a temporary directory removed with t.
func New(t testing.TB, cfg Config) *Host {
	t.Helper()
	if cfg.DefaultPageKB == 0 {
		cfg.DefaultPageKB = 2048
	}
	if cfg.NUMANodes == 0 {
		cfg.NUMANodes = 1
	}
	if cfg.MemTotalKB == 0 {
		cfg.MemTotalKB = 24 << 20
	}
	if cfg.Btime == 0 {
		cfg.Btime = time.Now().Add(-time.Hour).Unix()
	}
	h := &Host{Root: t.TempDir(), cfg: cfg, cap: -1, pool: cfg.Pool}
	h.Put("proc/sys/kernel/osrelease", "6.18.0-test\n")
	h.Put("proc/sys/vm/compact_memory", "")
	h.Put("proc/stat", fmt.Sprintf("cpu  1 2 3 4\nbtime %d\nprocesses 10\n", cfg.Btime))
	h.Put("proc/cmdline", cfg.Cmdline+"\n")
	if cfg.OSID != "" {
		h.Put("etc/os-release", fmt.Sprintf("NAME=Test\nID=%s\nID_LIKE=%q\n", cfg.OSID, cfg.OSIDLike))
	}
	for _, m := range cfg.Loaded {
		h.LoadModule(m)
	}
	for _, m := range cfg.Builtin {
		h.Mkdir("sys/module/" + strings.ReplaceAll(m, "-", "_") + "/parameters")
	}
	for _, d := range cfg.PCIDrivers {
		h.Mkdir("sys/bus/pci/drivers/" + d)
	}
	if len(cfg.ModulesBuiltin) > 0 {
		h.Put("lib/modules/6.18.0-test/modules.builtin", strings.Join(cfg.ModulesBuiltin, "\n")+"\n")
	}
	if cfg.Modprobe {
		h.Put("usr/sbin/modprobe", "#!/bin/false\n")
	}
	h.Mkdir("sys/kernel/iommu_groups")
	for i := range cfg.IOMMUGroups {
		h.Mkdir(fmt.Sprintf("sys/kernel/iommu_groups/%d/devices", i))
	}
	if cfg.NoIOMMU != "" {
		h.Put("sys/module/vfio/parameters/enable_unsafe_noiommu_mode", cfg.NoIOMMU+"\n")
		h.Put("sys/module/vfio/initstate", "live\n")
	}
	if cfg.Uplink != "" {
		h.Put("sys/class/net/"+cfg.Uplink+"/device/numa_node", strconv.Itoa(cfg.UplinkNUMA)+"\n")
	}
	h.Put("sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages", "0\n")
	h.mu.Lock()
	h.render()
	h.mu.Unlock()
	return h
}

// Put writes a file under the root, creating directories.
func (h *Host) Put(rel, content string) {
	p := filepath.Join(h.Root, rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		panic(err)
	}
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		panic(err)
	}
}

// Mkdir creates a directory under the root.
func (h *Host) Mkdir(rel string) {
	if err := os.MkdirAll(filepath.Join(h.Root, rel), 0o755); err != nil {
		panic(err)
	}
}

// Read returns a file under the root ("" when missing).
func (h *Host) Read(rel string) string {
	b, _ := os.ReadFile(filepath.Join(h.Root, rel))
	return string(b)
}

// LoadModule makes name show as a loaded module, as modprobe would.
func (h *Host) LoadModule(name string) {
	h.Put("sys/module/"+strings.ReplaceAll(name, "-", "_")+"/initstate", "live\n")
}

// SetCap limits how many 2 MiB pages the fake kernel allocates; -1 removes the limit.
func (h *Host) SetCap(n int64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.cap = n
}

// SetPool changes the allocated pool behind hostprep's back (drift, another tool).
func (h *Host) SetPool(n int64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.pool = n
	h.render()
}

// Writes returns the kernel writes made so far, as "rel/path=value".
func (h *Host) Writes() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]string(nil), h.writes...)
}

// AddKubelet adds a kubelet process that started at start.
func (h *Host) AddKubelet(pid int, start time.Time) {
	ticks := start.Sub(time.Unix(h.cfg.Btime, 0)) * 100 / time.Second
	dir := fmt.Sprintf("proc/%d/", pid)
	h.Put(dir+"comm", "kubelet\n")
	h.Put(dir+"cmdline", "/usr/bin/kubelet\x00--config=/var/lib/kubelet/config.yaml\x00")
	// comm with a space and a parenthesis, as the kernel allows; starttime is field 22
	h.Put(dir+"stat", fmt.Sprintf("%d (kubelet) S 1 %d %d 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 12 0 %d 1000000 500 18446744073709551615\n",
		pid, pid, pid, int64(ticks)))
}

// WriteFile is the fake kernel behind hostprep's sysfs writer. A write to the 2 MiB
// pool allocates up to the cap and updates the per-node files and /proc/meminfo; other
// files must exist, as under /sys, and take the value as written (vfio's no-IOMMU
// parameter reads back Y after 1).
func (h *Host) WriteFile(path string, data []byte) error {
	rel, err := filepath.Rel(h.Root, path)
	if err != nil || strings.HasPrefix(rel, "..") {
		return fmt.Errorf("fake kernel: write outside the host root: %s", path)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if _, err := os.Stat(path); err != nil {
		return &fs.PathError{Op: "open", Path: path, Err: fs.ErrNotExist}
	}
	h.writes = append(h.writes, rel+"="+string(data))
	switch rel {
	case "sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages":
		n, err := strconv.ParseInt(strings.TrimSpace(string(data)), 10, 64)
		if err != nil || n < 0 {
			return &fs.PathError{Op: "write", Path: path, Err: fmt.Errorf("invalid argument")}
		}
		if h.cap >= 0 && n > h.cap {
			n = h.cap
		}
		h.pool = n
		h.render()
		return nil
	case "sys/module/vfio/parameters/enable_unsafe_noiommu_mode":
		v := strings.TrimSpace(string(data))
		if v == "1" || v == "Y" || v == "y" {
			v = "Y"
		} else {
			v = "N"
		}
		return os.WriteFile(path, []byte(v+"\n"), 0o644)
	}
	return os.WriteFile(path, data, 0o644)
}

// render writes the pool's state to sysfs and meminfo; h.mu held.
func (h *Host) render() {
	c := h.cfg
	if !c.No2MPool {
		h.Put("sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages", fmt.Sprintf("%d\n", h.pool))
		h.Put("sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages", fmt.Sprintf("%d\n", h.pool))
		if !c.NoNodeDirs {
			for i := range c.NUMANodes {
				share := h.pool / int64(c.NUMANodes)
				if int64(i) < h.pool%int64(c.NUMANodes) {
					share++
				}
				d := fmt.Sprintf("sys/devices/system/node/node%d/hugepages/hugepages-2048kB/", i)
				h.Put(d+"nr_hugepages", fmt.Sprintf("%d\n", share))
				h.Put(d+"free_hugepages", fmt.Sprintf("%d\n", share))
			}
		}
	}
	var total int64
	if c.DefaultPageKB == 2048 {
		total = h.pool
	}
	h.Put("proc/meminfo", fmt.Sprintf(
		"MemTotal:       %8d kB\nMemFree:        %8d kB\nHugePages_Total:   %d\nHugePages_Free:    %d\nHugePages_Rsvd:        0\nHugePages_Surp:        0\nHugepagesize:       %d kB\nHugetlb:        %8d kB\n",
		c.MemTotalKB, c.MemTotalKB-h.pool*2048-1<<20, total, total, c.DefaultPageKB, h.pool*2048))
}

// Snapshot returns every file, directory and symlink under the root with its mode and
// content, to prove a run changed nothing.
func (h *Host) Snapshot(t testing.TB) map[string]string {
	t.Helper()
	snap := map[string]string{}
	err := filepath.WalkDir(h.Root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(h.Root, p)
		entry := info.Mode().String()
		switch {
		case info.Mode()&fs.ModeSymlink != 0:
			target, _ := os.Readlink(p)
			entry += " -> " + target
		case info.Mode().IsRegular():
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			entry += " " + string(b)
		}
		snap[rel] = entry
		return nil
	})
	if err != nil {
		t.Fatalf("snapshot %s: %v", h.Root, err)
	}
	return snap
}
