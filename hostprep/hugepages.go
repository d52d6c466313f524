package hostprep

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/nodeagent/nodeagent/agent/health"
)

const (
	pageKB = 2048 // the pool hostprep manages: 2 MiB pages
	// pool2M is the 2 MiB pool's directory. vm.nr_hugepages sizes the *default* pool,
	// which may be the 1 GiB one, so the pool is always set through this directory.
	pool2M     = "/sys/kernel/mm/hugepages/hugepages-2048kB"
	nodeDir    = "/sys/devices/system/node"
	sysctlKey  = "vm.nr_hugepages"
	compactMem = "/proc/sys/vm/compact_memory"
)

// numaPages is one NUMA node's share of the 2 MiB pool.
type numaPages struct {
	node        int
	total, free int64
}

// hugeState is what the kernel says about the 2 MiB pool.
type hugeState struct {
	total, free   int64       // the 2 MiB pool, from sysfs
	defaultKB     int64       // Hugepagesize from /proc/meminfo: the default pool's page size
	meminfoTotal  int64       // HugePages_Total from /proc/meminfo: the default pool
	memTotalKB    int64       // MemTotal
	memFreeKB     int64       // MemFree
	nodes         []numaPages // per NUMA node; empty when the kernel shows none
	uplinkNode    int         // NUMA node of the uplink NIC; -1 unknown or none
	uplinkKnown   bool
	uplinkMissing string // why the uplink's node is unknown
}

func readInt(path string) (int64, error) {
	s, err := readTrim(path)
	if err != nil {
		return 0, err
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("parse %s: %w", path, err)
	}
	return n, nil
}

// readMeminfo returns the kB (or page count) values of /proc/meminfo by name.
func readMeminfo(path string) (map[string]int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	m := map[string]int64{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		name, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		fields := strings.Fields(rest)
		if len(fields) == 0 {
			continue
		}
		if n, err := strconv.ParseInt(fields[0], 10, 64); err == nil {
			m[name] = n
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	return m, nil
}

func readHuge(o Options) (hugeState, error) {
	var s hugeState
	var err error
	if s.total, err = readInt(o.path(pool2M, "nr_hugepages")); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return s, fmt.Errorf("no 2MiB hugepage pool on this kernel (%s is missing)", filepath.Join(pool2M, "nr_hugepages"))
		}
		return s, fmt.Errorf("read 2MiB pool: %w", err)
	}
	if s.free, err = readInt(o.path(pool2M, "free_hugepages")); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return s, fmt.Errorf("read 2MiB pool: %w", err)
	}
	mi, err := readMeminfo(o.path("/proc/meminfo"))
	if err != nil {
		return s, fmt.Errorf("read meminfo: %w", err)
	}
	s.defaultKB, s.meminfoTotal, s.memTotalKB, s.memFreeKB = mi["Hugepagesize"], mi["HugePages_Total"], mi["MemTotal"], mi["MemFree"]
	if s.memTotalKB == 0 {
		return s, fmt.Errorf("read meminfo: %s has no MemTotal", o.path("/proc/meminfo"))
	}

	dirs, _ := filepath.Glob(o.path(nodeDir, "node*"))
	for _, d := range dirs {
		id, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(d), "node"))
		if err != nil {
			continue
		}
		p := filepath.Join(d, "hugepages", "hugepages-2048kB")
		n := numaPages{node: id}
		if n.total, err = readInt(filepath.Join(p, "nr_hugepages")); err != nil {
			continue // a node without memory, or no per-node pools: not shown
		}
		n.free, _ = readInt(filepath.Join(p, "free_hugepages"))
		s.nodes = append(s.nodes, n)
	}
	sort.Slice(s.nodes, func(i, j int) bool { return s.nodes[i].node < s.nodes[j].node })

	s.uplinkNode = -1
	if o.UplinkInterface != "" {
		p := o.path("/sys/class/net", o.UplinkInterface, "device", "numa_node")
		n, err := readInt(p)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			if _, lerr := os.Lstat(o.path("/sys/class/net", o.UplinkInterface)); lerr != nil {
				s.uplinkMissing = "interface not found"
			} else {
				s.uplinkMissing = "no device NUMA node (virtual interface?)"
			}
		case err != nil:
			s.uplinkMissing = err.Error()
		case n < 0:
			s.uplinkMissing = "no NUMA affinity"
		default:
			s.uplinkNode, s.uplinkKnown = int(n), true
		}
	}
	return s, nil
}

// hugepages sets (in apply mode), persists and verifies the 2 MiB pool.
func (p *pass) hugepages() health.Result {
	o := p.o
	res := health.Result{Name: health.Hugepages}
	want := o.Hugepages.Count
	p.m.setRequested(max(want, 0))
	if want < 0 {
		res.Detail = fmt.Sprintf("hugepages.count %d is negative: nothing applied", want)
		return res
	}
	s, err := readHuge(o)
	if err != nil {
		res.Detail = err.Error()
		return res
	}
	if int64(want) > s.memTotalKB/pageKB { // divided, not multiplied: no overflow
		res.Detail = fmt.Sprintf("hugepages.count %d (%d MiB) is more than the node's memory (MemTotal %d MiB): nothing applied; pool has %d",
			want, uint64(want)*2, s.memTotalKB/1024, s.total)
		p.m.setPool(s)
		return res
	}
	if want == 0 {
		p.m.setPool(s)
		res.OK = true
		res.Detail = fmt.Sprintf("no 2MiB pages requested (pool has %d)", s.total)
		return res
	}

	var notes []string
	target := int64(want)
	if s.total > target && !o.Hugepages.AllowShrink {
		target = s.total
		notes = append(notes, fmt.Sprintf("kept the larger existing pool of %d (allow_shrink is false)", s.total))
	}
	if p.apply && s.total != target {
		before := s.total
		s, err = p.setPool(target)
		if err != nil {
			res.Detail = p.rel(err)
			return res
		}
		if s.total != before {
			p.m.change("hugepages_pool")
			p.st.poolChangedAt = p.d.now()
			p.log.Info("hugepage pool changed", "from", before, "to", s.total, "requested", target)
		}
	}
	p.m.setPool(s)

	notes = append(notes, p.persistHugepages(s, target)...)
	if w := p.kubeletWarning(); w != "" {
		notes = append(notes, w)
	}

	res.OK = s.total >= int64(want)
	if res.OK {
		res.Detail = fmt.Sprintf("%d/%d 2MiB pages (%d free)", s.total, want, s.free)
	} else {
		if p.apply {
			res.Detail = fmt.Sprintf("only %d/%d 2MiB pages allocated (%d free, MemFree %d MiB: memory short or fragmented)",
				s.total, want, s.free, s.memFreeKB/1024)
		} else {
			res.Detail = fmt.Sprintf("only %d/%d 2MiB pages allocated (mode check: not applied)", s.total, want)
		}
	}
	if len(s.nodes) > 1 {
		var per []string
		for _, n := range s.nodes {
			per = append(per, fmt.Sprintf("node%d %d", n.node, n.total))
		}
		res.Detail += "; " + strings.Join(per, ", ")
	}
	if o.UplinkInterface != "" {
		if !s.uplinkKnown {
			res.Detail += fmt.Sprintf("; uplink %s: NUMA node unknown (%s)", o.UplinkInterface, s.uplinkMissing)
		} else {
			var on *numaPages
			for i := range s.nodes {
				if s.nodes[i].node == s.uplinkNode {
					on = &s.nodes[i]
				}
			}
			switch {
			case on == nil:
				res.Detail += fmt.Sprintf("; uplink %s on NUMA node %d", o.UplinkInterface, s.uplinkNode)
			case on.total == 0:
				res.OK = false
				res.Detail += fmt.Sprintf("; uplink %s is on NUMA node %d, which has no 2MiB pages", o.UplinkInterface, s.uplinkNode)
			default:
				res.Detail += fmt.Sprintf("; uplink %s on NUMA node %d (%d pages there)", o.UplinkInterface, s.uplinkNode, on.total)
			}
		}
	}
	if s.defaultKB == pageKB && s.meminfoTotal != s.total {
		res.Detail += fmt.Sprintf("; /proc/meminfo HugePages_Total %d differs from sysfs %d", s.meminfoTotal, s.total)
	}
	if len(notes) > 0 {
		res.Detail += "; " + strings.Join(notes, "; ")
	}
	return res
}

// setPool writes target to the 2 MiB pool and reads back what the kernel allocated.
// When it allocated fewer, it compacts memory once and asks again.
func (p *pass) setPool(target int64) (hugeState, error) {
	path := p.o.path(pool2M, "nr_hugepages")
	val := []byte(strconv.FormatInt(target, 10))
	if err := p.d.sysfs.WriteFile(path, val); err != nil {
		return hugeState{}, fmt.Errorf("set 2MiB pool to %d: %w", target, err)
	}
	s, err := readHuge(p.o)
	if err != nil {
		return s, err
	}
	if s.total < target {
		p.log.Warn("kernel allocated fewer hugepages than asked; compacting memory and asking again",
			"requested", target, "allocated", s.total)
		if err := p.d.sysfs.WriteFile(p.o.path(compactMem), []byte("1")); err != nil {
			p.log.Warn("compact memory", "error", err)
		}
		if err := p.d.sysfs.WriteFile(path, val); err != nil {
			return s, fmt.Errorf("set 2MiB pool to %d: %w", target, err)
		}
		return readHuge(p.o)
	}
	return s, nil
}

// persistHugepages writes (apply) or checks (check) the sysctl file and returns notes
// for the check's detail.
func (p *pass) persistHugepages(s hugeState, target int64) []string {
	o := p.o
	default2M := s.defaultKB == pageKB
	cmdline := cmdlinePages(o)
	var notes []string
	if !default2M {
		if cmdline >= target {
			notes = append(notes, fmt.Sprintf("persisted on the kernel command line (%d pages)", cmdline))
		} else {
			notes = append(notes, fmt.Sprintf("warning: not persisted across reboots: the default hugepage size is %d kB, so vm.nr_hugepages would size that pool; add `hugepagesz=2M hugepages=%d` to the kernel command line",
				s.defaultKB, target))
		}
	}
	if o.Hugepages.SysctlFile == "" {
		if default2M && cmdline < target {
			notes = append(notes, "warning: not persisted across reboots (hugepages.sysctl_file is empty)")
		}
		return notes
	}
	path := o.path(o.Hugepages.SysctlFile)
	mf, err := readManaged(path)
	if err != nil {
		return append(notes, "warning: sysctl_file: "+err.Error())
	}
	before, fixes := fixSysctlLines(mf.before, default2M)
	after, fixes2 := fixSysctlLines(mf.after, default2M)
	fixes = append(fixes, fixes2...)
	var block []string
	if default2M {
		block = []string{fmt.Sprintf("%s = %d", sysctlKey, target)}
	}
	content := mf.render(before, block, after)
	if !mf.exists && len(block) == 0 {
		return notes // nothing to persist and nothing to fix: no empty file
	}
	if !p.apply {
		if !mf.exists || string(content) != string(mf.content) {
			for _, f := range fixes {
				notes = append(notes, "warning: "+o.Hugepages.SysctlFile+": "+f)
			}
			if default2M && cmdline < target {
				notes = append(notes, fmt.Sprintf("warning: %s does not set %s = %d (mode check: not written)", o.Hugepages.SysctlFile, sysctlKey, target))
			}
		}
		return notes
	}
	wr, err := writeAtomic(mf, path, content)
	if err != nil {
		p.log.Error("persist hugepages", "file", path, "error", err)
		return append(notes, fmt.Sprintf("warning: not persisted: %s", p.rel(err)))
	}
	if wr != unchanged {
		p.m.change("sysctl_file")
		p.log.Info("sysctl file written", "file", path, "result", wr.String(), "corrected", fixes)
	}
	for _, f := range fixes {
		notes = append(notes, "corrected "+o.Hugepages.SysctlFile+": "+f+", commented out")
	}
	if default2M {
		notes = append(notes, fmt.Sprintf("%s %s", o.Hugepages.SysctlFile, wr))
	}
	return notes
}

// rel shortens an error text's host_root prefix so details show host paths.
func (p *pass) rel(err error) string {
	if p.o.HostRoot == "/" {
		return err.Error()
	}
	return strings.ReplaceAll(err.Error(), strings.TrimSuffix(p.o.HostRoot, "/"), "")
}

// fixSysctlLines comments out foreign lines that would mislead: keys that look like
// vm.nr_hugepages but are not (sysctl ignores `vm_nr.hugepages`, the key of a widely
// copied guide), and, when the default pool is the 2 MiB one, other vm.nr_hugepages
// lines, which nodeagent's block supersedes.
func fixSysctlLines(lines []string, default2M bool) ([]string, []string) {
	var out, fixes []string
	for _, line := range lines {
		key, _, ok := sysctlLine(line)
		switch {
		case !ok:
			out = append(out, line)
		case isWrongHugepagesKey(key):
			out = append(out, "# "+line+"  # nodeagent: "+key+" is not a sysctl key; vm.nr_hugepages is set below")
			fixes = append(fixes, fmt.Sprintf("%q is not a sysctl key (sysctl ignores it)", key))
		case default2M && (key == "vm.nr_hugepages" || key == "vm/nr_hugepages"):
			out = append(out, "# "+line+"  # nodeagent: superseded by the block below")
			fixes = append(fixes, fmt.Sprintf("%q conflicts with nodeagent's vm.nr_hugepages", strings.TrimSpace(line)))
		default:
			out = append(out, line)
		}
	}
	return out, fixes
}

// sysctlLine parses `key = value` as sysctl.d(5) does; comments and blanks are not ok.
func sysctlLine(line string) (key, value string, ok bool) {
	t := strings.TrimSpace(line)
	if t == "" || t[0] == '#' || t[0] == ';' {
		return "", "", false
	}
	k, v, found := strings.Cut(t, "=")
	if !found {
		return "", "", false
	}
	k = strings.TrimPrefix(strings.TrimSpace(k), "-")
	return k, strings.TrimSpace(v), true
}

func isWrongHugepagesKey(key string) bool {
	if key == "vm.nr_hugepages" || key == "vm/nr_hugepages" {
		return false
	}
	n := strings.NewReplacer(".", "", "/", "", "_", "", "-", "").Replace(strings.ToLower(key))
	switch n {
	case "vmnrhugepages", "vmnrhugepage", "vmhugepages", "nrhugepages", "vmnrhugepagess":
		return true
	}
	return false
}

// cmdlinePages returns how many 2 MiB pages the kernel command line reserves at boot:
// `hugepages=N` counts for the size of the `hugepagesz=` before it, or for the default
// size (`default_hugepagesz=`, else 2 MiB on x86) when none came before.
func cmdlinePages(o Options) int64 {
	s, err := readTrim(o.path("/proc/cmdline"))
	if err != nil {
		return 0
	}
	defaultIs2M := true
	for _, f := range strings.Fields(s) {
		if v, ok := strings.CutPrefix(f, "default_hugepagesz="); ok {
			defaultIs2M = is2M(v)
		}
	}
	var pages int64
	size2M := defaultIs2M
	for _, f := range strings.Fields(s) {
		if v, ok := strings.CutPrefix(f, "hugepagesz="); ok {
			size2M = is2M(v)
		}
		if v, ok := strings.CutPrefix(f, "hugepages="); ok && size2M {
			// "N" or a per-node list "0:N,1:M"
			for _, part := range strings.Split(v, ",") {
				_, num, found := strings.Cut(part, ":")
				if !found {
					num = part
				}
				if n, err := strconv.ParseInt(num, 10, 64); err == nil {
					pages += n
				}
			}
		}
	}
	return pages
}

func is2M(v string) bool {
	v = strings.ToUpper(v)
	return v == "2M" || v == "2048K" || v == "2097152"
}

// kubeletWarning tells the operator to restart the kubelet when it started before the
// pool last changed: it reads hugepage capacity only at its start.
func (p *pass) kubeletWarning() string {
	changed := p.st.poolChangedAt
	if changed.IsZero() {
		return ""
	}
	for _, k := range findKubelets(p.o) {
		if k.start.Before(changed.Truncate(time.Second)) {
			return fmt.Sprintf("warning: kubelet (pid %d) started %s, before the pool changed at %s: restart it so it advertises hugepages-2Mi",
				k.pid, k.start.UTC().Format(time.RFC3339), changed.UTC().Format(time.RFC3339))
		}
	}
	return ""
}
