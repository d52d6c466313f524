package ebpf

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"
)

// hook is one program attached to the cgroup, pinned as links/<name>.
type hook struct {
	name   string
	attach ebpf.AttachType
	prog   func(*steerObjects) *ebpf.Program
}

// hooks in attach order: sockops first, so that every connection the connect
// hooks steer gets its close callback; connect last. Detach runs in reverse.
var hooks = []hook{
	{"sockops", ebpf.AttachCGroupSockOps, func(o *steerObjects) *ebpf.Program { return o.SteerSockops }},
	{"getpeername4", ebpf.AttachCgroupInet4GetPeername, func(o *steerObjects) *ebpf.Program { return o.SteerGetpeername4 }},
	{"getpeername6", ebpf.AttachCgroupInet6GetPeername, func(o *steerObjects) *ebpf.Program { return o.SteerGetpeername6 }},
	{"connect4", ebpf.AttachCGroupInet4Connect, func(o *steerObjects) *ebpf.Program { return o.SteerConnect4 }},
	{"connect6", ebpf.AttachCGroupInet6Connect, func(o *steerObjects) *ebpf.Program { return o.SteerConnect6 }},
}

func mapsDir(bpffs string) string  { return filepath.Join(bpffs, "maps") }
func linksDir(bpffs string) string { return filepath.Join(bpffs, "links") }

// loaded is the kernel state one Run holds: objects, links and where they are.
type loaded struct {
	objs     steerObjects
	links    []link.Link // parallel to hooks
	cgroup   string
	cgroupID uint64
	bpffs    string
}

// load loads the programs, reusing the maps pinned under opts.BPFFS (replacing
// them when their layout changed). Nothing is attached yet.
func load(opts Options, cgroup string, log *slog.Logger) (*loaded, error) {
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, fmt.Errorf("remove memlock rlimit: %w", err)
	}
	if err := ensureBPFFS(opts.BPFFS); err != nil {
		return nil, err
	}
	for _, d := range []string{mapsDir(opts.BPFFS), linksDir(opts.BPFFS)} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("create pin directory: %w", err)
		}
	}
	id, err := cgroupID(cgroup)
	if err != nil {
		return nil, err
	}
	l := &loaded{cgroup: cgroup, cgroupID: id, bpffs: opts.BPFFS}

	spec, err := loadSteer()
	if err != nil {
		return nil, fmt.Errorf("load program spec: %w", err)
	}
	copts := &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: mapsDir(opts.BPFFS)}}
	err = spec.LoadAndAssign(&l.objs, copts)
	if errors.Is(err, ebpf.ErrMapIncompatible) {
		// A different version left maps with another layout: start afresh.
		log.Warn("pinned steering maps are incompatible, replacing them", "dir", mapsDir(opts.BPFFS), "error", err)
		if rerr := removePins(mapsDir(opts.BPFFS)); rerr != nil {
			return nil, rerr
		}
		err = spec.LoadAndAssign(&l.objs, copts)
	}
	if err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return nil, fmt.Errorf("%w: load steering programs: verifier rejected them: %w", errUnsupported, err)
		}
		return nil, fmt.Errorf("load steering programs: %w", err)
	}
	return l, nil
}

// attach attaches each program to the cgroup, replacing the program of a link
// pinned by an earlier run rather than attaching a second time. On error the
// links attached so far stay pinned, for the next attempt to replace.
func (l *loaded) attach(log *slog.Logger) error {
	for _, h := range hooks {
		lk, err := attachOrReplace(h, l, log)
		if err != nil {
			return err
		}
		l.links = append(l.links, lk)
	}
	return nil
}

func attachOrReplace(h hook, l *loaded, log *slog.Logger) (link.Link, error) {
	path := filepath.Join(linksDir(l.bpffs), h.name)
	prog := h.prog(&l.objs)
	old, err := link.LoadPinnedLink(path, nil)
	switch {
	case err == nil:
		info, ierr := old.Info()
		if ierr == nil && info.Cgroup() != nil && info.Cgroup().CgroupId == l.cgroupID &&
			ebpf.AttachType(info.Cgroup().AttachType) == h.attach {
			if uerr := old.Update(prog); uerr == nil {
				log.Info("replaced program of pinned steering link", "hook", h.name, "cgroup", l.cgroup)
				return old, nil
			} else {
				log.Warn("update pinned steering link, attaching anew", "hook", h.name, "error", uerr)
			}
		} else {
			log.Info("removing pinned steering link of another cgroup or hook", "hook", h.name, "path", path)
		}
		_ = old.Unpin()
		_ = old.Close()
	case errors.Is(err, os.ErrNotExist):
	default:
		log.Warn("removing unusable steering pin", "path", path, "error", err)
		if rerr := os.Remove(path); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
			return nil, fmt.Errorf("remove pin %s: %w", path, rerr)
		}
	}
	lk, err := link.AttachCgroup(link.CgroupOptions{Path: l.cgroup, Attach: h.attach, Program: prog})
	if err != nil {
		return nil, fmt.Errorf("attach %s to %s: %w", h.name, l.cgroup, err)
	}
	if err := lk.Pin(path); err != nil {
		_ = lk.Close()
		return nil, fmt.Errorf("pin %s link at %s (needs bpf_link, kernel 5.7): %w", h.name, path, err)
	}
	return lk, nil
}

// close releases this process's handles; pinned objects stay.
func (l *loaded) close() {
	for i := len(l.links) - 1; i >= 0; i-- {
		_ = l.links[i].Close()
	}
	l.links = nil
	_ = l.objs.Close()
}

// detach detaches and unpins everything and releases the handles.
func (l *loaded) detach() error {
	var errs []error
	for i := len(l.links) - 1; i >= 0; i-- {
		errs = append(errs, detachLink(l.links[i], hooks[i].name))
	}
	l.links = nil
	_ = l.objs.Close()
	errs = append(errs, removeAll(l.bpffs))
	return errors.Join(errs...)
}

func detachLink(lk link.Link, name string) error {
	var errs []error
	if err := lk.Detach(); err != nil && !errors.Is(err, link.ErrNotSupported) {
		errs = append(errs, fmt.Errorf("detach %s: %w", name, err))
	}
	if err := lk.Unpin(); err != nil {
		errs = append(errs, fmt.Errorf("unpin %s: %w", name, err))
	}
	if err := lk.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close %s link: %w", name, err))
	}
	return errors.Join(errs...)
}

// Cleanup detaches every program pinned under opts.BPFFS and removes every pin
// and pin directory there: what `nodeagent run --cleanup` does. It needs no
// running instance and succeeds when there is nothing to clean.
func Cleanup(opts Options) error {
	opts = opts.withDefaults()
	if _, err := os.Stat(opts.BPFFS); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	var errs []error
	ents, err := os.ReadDir(linksDir(opts.BPFFS))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("read %s: %w", linksDir(opts.BPFFS), err))
	}
	// Detach connect hooks before sockops, as in detach.
	order := map[string]int{}
	for i, h := range hooks {
		order[h.name] = len(hooks) - i
	}
	sortByOrder(ents, order)
	for _, e := range ents {
		path := filepath.Join(linksDir(opts.BPFFS), e.Name())
		lk, err := link.LoadPinnedLink(path, nil)
		if err != nil {
			errs = append(errs, fmt.Errorf("open pinned link %s: %w", path, err))
			continue
		}
		errs = append(errs, detachLink(lk, e.Name()))
	}
	errs = append(errs, removeAll(opts.BPFFS))
	return errors.Join(errs...)
}

func sortByOrder(ents []os.DirEntry, order map[string]int) {
	for i := 1; i < len(ents); i++ {
		for j := i; j > 0 && order[ents[j].Name()] > order[ents[j-1].Name()]; j-- {
			ents[j], ents[j-1] = ents[j-1], ents[j]
		}
	}
}

// removePins removes every pinned object in dir (not dir itself).
func removePins(dir string) error {
	ents, err := os.ReadDir(dir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("read %s: %w", dir, err)
	}
	var errs []error
	for _, e := range ents {
		if err := os.Remove(filepath.Join(dir, e.Name())); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove pin: %w", err))
		}
	}
	return errors.Join(errs...)
}

// removeAll removes the pins and the pin directories under bpffs, and bpffs
// itself. The bpf filesystem stays mounted.
func removeAll(bpffs string) error {
	var errs []error
	for _, d := range []string{mapsDir(bpffs), linksDir(bpffs)} {
		errs = append(errs, removePins(d))
		if err := os.Remove(d); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove %s: %w", d, err))
		}
	}
	if ok, _ := isBPFFS(bpffs); ok {
		// The mount point itself (a test's temporary bpffs) cannot be removed.
		if err := os.Remove(bpffs); err != nil && !errors.Is(err, os.ErrNotExist) && !errors.Is(err, unix.EBUSY) {
			errs = append(errs, fmt.Errorf("remove %s: %w", bpffs, err))
		}
	}
	return errors.Join(errs...)
}
