package privtest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/vishvananda/netns"
)

var nsSeq atomic.Int64

// Netns is a named network namespace made for one test (visible at /run/netns/Name,
// so `nsenter --net=Path` reaches it). It starts with only a down loopback: no route
// out, so nothing dialled inside it can leave the machine.
type Netns struct {
	Name   string
	Path   string
	Handle netns.NsHandle
}

// NewNetns creates a namespace, brings its loopback up, and removes it when t ends,
// whether or not t passed.
func NewNetns(t testing.TB) *Netns {
	t.Helper()
	Root(t)
	name := fmt.Sprintf("natest-%d-%d", os.Getpid(), nsSeq.Add(1))
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		Skip(t, fmt.Sprintf("ip netns add: %v: %s", err, strings.TrimSpace(string(out))))
	}
	path := filepath.Join("/run/netns", name)
	h, err := netns.GetFromPath(path)
	if err != nil {
		_ = exec.Command("ip", "netns", "del", name).Run()
		t.Fatalf("open %s: %v", path, err)
	}
	ns := &Netns{Name: name, Path: path, Handle: h}
	t.Cleanup(func() {
		h.Close()
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", name, err, out)
		}
	})
	if err := ns.Do(func() error {
		return exec.Command("ip", "link", "set", "lo", "up").Run()
	}); err != nil {
		t.Fatalf("loopback up in %s: %v", name, err)
	}
	return ns
}

// Do runs fn on an OS thread that has entered only the namespace's network namespace
// (the mount namespace, and so the cgroup and bpffs mounts, stay as they are).
// Sockets opened in fn stay in the namespace after Do returns.
func (n *Netns) Do(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		// The thread is not unlocked: it dies with the goroutine, so no other
		// goroutine ever runs in the wrong namespace.
		runtime.LockOSThread()
		if err := netns.Set(n.Handle); err != nil {
			errc <- fmt.Errorf("setns %s: %w", n.Name, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// Command returns cmd wrapped in `nsenter --net=PATH` so the child runs in the
// namespace but keeps the host's mounts.
func (n *Netns) Command(name string, args ...string) *exec.Cmd {
	return exec.Command("nsenter", append([]string{"--net=" + n.Path, "--", name}, args...)...)
}
