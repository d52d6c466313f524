package hostprep

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"regexp"
	"strings"
	"time"

	"github.com/nodeagent/nodeagent/agent/health"
)

type modState int

const (
	modAbsent modState = iota
	modLoaded
	modBuiltin
)

func (s modState) String() string {
	switch s {
	case modLoaded:
		return "loaded"
	case modBuiltin:
		return "built-in"
	default:
		return "not loaded"
	}
}

var validModule = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_-]*$`)

// modprobePaths are where distributions install modprobe, looked up under host_root.
var modprobePaths = []string{"/usr/sbin/modprobe", "/sbin/modprobe", "/usr/bin/modprobe", "/bin/modprobe"}

const modprobeTimeout = 30 * time.Second

// moduleState says whether name is loaded or built in. The kernel names modules with
// underscores in /sys/module; a driver also shows as /sys/bus/pci/drivers/<name> (vfio-pci
// keeps its dash there); modules.builtin lists built-ins that have no /sys/module entry.
func moduleState(o Options, name string) modState {
	canon := strings.ReplaceAll(name, "-", "_")
	if _, err := os.Stat(o.path("/sys/module", canon)); err == nil {
		if _, err := os.Stat(o.path("/sys/module", canon, "initstate")); err == nil {
			return modLoaded
		}
		return modBuiltin
	}
	for _, d := range []string{name, canon, strings.ReplaceAll(name, "_", "-")} {
		if _, err := os.Stat(o.path("/sys/bus/pci/drivers", d)); err == nil {
			return modBuiltin
		}
	}
	if release, err := readTrim(o.path("/proc/sys/kernel/osrelease")); err == nil && release != "" {
		if f, err := os.Open(o.path("/lib/modules", release, "modules.builtin")); err == nil {
			defer f.Close()
			sc := bufio.NewScanner(f)
			for sc.Scan() {
				base := sc.Text()[strings.LastIndexByte(sc.Text(), '/')+1:]
				if strings.ReplaceAll(strings.TrimSuffix(base, ".ko"), "-", "_") == canon {
					return modBuiltin
				}
			}
		}
	}
	return modAbsent
}

// osRelease holds the fields of /etc/os-release that decide module spelling.
type osRelease struct{ id, idLike string }

func readOSRelease(o Options) osRelease {
	var r osRelease
	for _, p := range []string{"/etc/os-release", "/usr/lib/os-release"} {
		b, err := os.ReadFile(o.path(p))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			k, v, ok := strings.Cut(strings.TrimSpace(line), "=")
			if !ok {
				continue
			}
			v = strings.Trim(v, `"'`)
			switch k {
			case "ID":
				r.id = strings.ToLower(v)
			case "ID_LIKE":
				r.idLike = strings.ToLower(v)
			}
		}
		return r
	}
	return r
}

func (r osRelease) rhelFamily() bool {
	for _, f := range append([]string{r.id}, strings.Fields(r.idLike)...) {
		switch f {
		case "rhel", "centos", "fedora", "rocky", "almalinux", "ol", "amzn":
			return true
		}
	}
	return false
}

// distroModuleName is the spelling written to modules_file: the RHEL family's guides
// and tooling write vfio_pci, the others vfio-pci. kmod treats '-' and '_' alike, so this
// only keeps the file the way the host's operators expect to read it.
func distroModuleName(name string, r osRelease) string {
	if r.rhelFamily() {
		return strings.ReplaceAll(name, "-", "_")
	}
	return name
}

// modules loads (in apply mode), persists and verifies the kernel modules.
func (p *pass) modules(ctx context.Context) health.Result {
	o := p.o
	res := health.Result{Name: health.Modules}
	if len(o.Modules) == 0 {
		res.OK = true
		res.Detail = "no modules requested"
		return res
	}
	distro := readOSRelease(o)
	ok := true
	var parts, present []string
	for _, name := range o.Modules {
		if !validModule.MatchString(name) {
			ok = false
			parts = append(parts, fmt.Sprintf("%q: not a module name", name))
			continue
		}
		st := moduleState(o, name)
		if st == modAbsent && p.apply {
			if err := p.modprobe(ctx, name); err != nil {
				ok = false
				parts = append(parts, fmt.Sprintf("%s: %v", name, err))
				continue
			}
			if st = moduleState(o, name); st == modAbsent {
				ok = false
				parts = append(parts, fmt.Sprintf("%s: modprobe succeeded but the kernel shows no /sys/module/%s", name, strings.ReplaceAll(name, "-", "_")))
				continue
			}
			p.m.change("module_load")
			p.log.Info("module loaded", "module", name)
			parts = append(parts, name+": loaded now")
			present = append(present, name)
			continue
		}
		if st == modAbsent {
			ok = false
			parts = append(parts, name+": not loaded (mode check: not loading)")
			continue
		}
		parts = append(parts, name+": "+st.String())
		present = append(present, name)
	}
	parts = append(parts, p.persistModules(present, distro)...)
	res.OK = ok
	res.Detail = strings.Join(parts, "; ")
	return res
}

// modprobe loads name with the host's modprobe, chrooted into host_root.
func (p *pass) modprobe(ctx context.Context, name string) error {
	bin := ""
	for _, c := range modprobePaths {
		if _, err := os.Lstat(p.o.path(c)); err == nil {
			bin = c
			break
		}
	}
	if bin == "" {
		return fmt.Errorf("not loaded, and no modprobe under host_root %s (looked in %s)", p.o.HostRoot, strings.Join(modprobePaths, ", "))
	}
	ctx, cancel := context.WithTimeout(ctx, modprobeTimeout)
	defer cancel()
	stderr, err := p.d.cmd.Run(ctx, p.o.HostRoot, bin, name)
	if err != nil {
		msg := strings.TrimSpace(string(stderr))
		if msg == "" {
			return fmt.Errorf("modprobe %s: %w", name, err)
		}
		return fmt.Errorf("modprobe %s: %w: %s", name, err, msg)
	}
	return nil
}

// persistModules writes (apply) or checks (check) modules_file listing the present modules.
// A module that does not load is not persisted: it would fail every boot.
func (p *pass) persistModules(present []string, distro osRelease) []string {
	o := p.o
	if o.ModulesFile == "" {
		return []string{"warning: not persisted across reboots (modules_file is empty)"}
	}
	path := o.path(o.ModulesFile)
	mf, err := readManaged(path)
	if err != nil {
		return []string{"warning: modules_file: " + err.Error()}
	}
	var block []string
	for _, m := range present {
		block = append(block, distroModuleName(m, distro))
	}
	if !mf.exists && len(block) == 0 {
		return nil
	}
	content := mf.render(mf.before, block, mf.after)
	if !p.apply {
		if !mf.exists || string(content) != string(mf.content) {
			return []string{fmt.Sprintf("warning: %s does not list %s (mode check: not written)", o.ModulesFile, strings.Join(block, ", "))}
		}
		return []string{o.ModulesFile + " up to date"}
	}
	wr, err := writeAtomic(mf, path, content)
	if err != nil {
		p.log.Error("persist modules", "file", path, "error", err)
		return []string{"warning: not persisted: " + p.rel(err)}
	}
	if wr != unchanged {
		p.m.change("modules_file")
		p.log.Info("modules file written", "file", path, "result", wr.String())
	}
	return []string{fmt.Sprintf("%s %s", o.ModulesFile, wr)}
}
