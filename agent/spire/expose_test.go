package spire

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nodeagent/nodeagent/agent/health"
	"github.com/nodeagent/nodeagent/test/privtest"
)

// reaches checks that a Workload API client dialling path gets the fake's identity.
func (f *fixture) reaches(path string) {
	f.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	x, err := fetchOnce(ctx, path)
	if err != nil {
		f.t.Fatalf("fetch x509 context through %s: %v", path, err)
	}
	if got := x.DefaultSVID().ID; got != testNodeID {
		f.t.Fatalf("fetch through %s: got %s; want %s", path, got, testNodeID)
	}
}

// peerIsConnector connects to path from a separate process (socat) and checks that
// the fake Workload API sees that process — not nodeagent, not a relay — as the peer
// (SO_PEERCRED), which is what SPIRE's workload attestation relies on.
func (f *fixture) peerIsConnector(path string) {
	f.t.Helper()
	socat, err := exec.LookPath("socat")
	if err != nil {
		privtest.Skip(f.t, "socat not installed (apt-get install socat)")
	}
	cmd := exec.Command(socat, "-u", "OPEN:/dev/null", "UNIX-CONNECT:"+path)
	if out, err := cmd.CombinedOutput(); err != nil {
		f.t.Fatalf("socat connect to %s: %v: %s", path, err, out)
	}
	pid := int32(cmd.Process.Pid)
	deadline := time.Now().Add(5 * time.Second)
	for {
		for _, c := range f.fake.Peers() {
			if c.Pid == pid {
				if c.Pid == int32(os.Getpid()) {
					f.t.Fatalf("peer pid is the test process")
				}
				return
			}
		}
		if time.Now().After(deadline) {
			f.t.Fatalf("fake workload api never saw peer pid %d; got peers %+v", pid, f.fake.Peers())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestExposeSameDirectory(t *testing.T) {
	f := newFixture(t, func(o *Options) { o.ExposeAt = "/run/spire/agent-sockets/agent.sock" })
	f.run()
	f.waitDetail(false, "socket absent", 5*time.Second)
	link := f.opts.hostPath(f.opts.ExposeAt)
	if got, err := os.Readlink(link); err != nil || got != "api.sock" {
		t.Fatalf("readlink %s: got %q, %v; want relative target \"api.sock\"", link, got, err)
	}

	if err := f.fake.Start(); err != nil {
		t.Fatal(err)
	}
	f.fake.SetX509(f.svid(time.Now().Add(-time.Minute), time.Now().Add(time.Hour)))
	f.waitDetail(true, "serving, spiffe://example.org/nodeagent", 5*time.Second)
	f.reaches(link)
	f.peerIsConnector(link)

	// The agent re-creates its socket: the same path reaches the new one.
	f.fake.Stop()
	f.waitDetail(false, "socket absent", 5*time.Second)
	if err := f.fake.Start(); err != nil {
		t.Fatal(err)
	}
	f.waitDetail(true, "serving", 5*time.Second)
	f.reaches(link)

	// A symlink pointed elsewhere is repaired.
	if err := os.Remove(link); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/nonexistent", link); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		if got, _ := os.Readlink(link); got == "api.sock" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("symlink %s not repaired within 5s", link)
		}
		time.Sleep(20 * time.Millisecond)
	}
	f.reaches(link)

	// Something that is not ours is refused and reported, never replaced. It is
	// renamed over the link in one step: removing the link first would race with the
	// repair above, and writing through a repaired link would open the socket.
	foreign := filepath.Join(filepath.Dir(link), ".foreign")
	if err := os.WriteFile(foreign, []byte("not ours"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(foreign, link); err != nil {
		t.Fatal(err)
	}
	f.waitDetail(false, "expose_at /run/spire/agent-sockets/agent.sock: expose_at: "+link+" exists and is not a symlink", 5*time.Second)
	if b, err := os.ReadFile(link); err != nil || string(b) != "not ours" {
		t.Errorf("got %q, %v at %s; want the foreign file untouched", b, err, link)
	}
}

func TestExposeBindMount(t *testing.T) {
	privtest.Root(t)
	f := newFixture(t, func(o *Options) { o.ExposeAt = "/run/spire/sockets/agent.sock" })
	expDir := f.opts.hostPath("/run/spire/sockets")
	t.Cleanup(func() {
		for {
			// Unmount every bind stacked there (the test makes a stale one too).
			if err := unix.Unmount(expDir, unix.MNT_DETACH); err != nil {
				return
			}
		}
	})
	f.run()
	f.waitDetail(false, "socket absent", 5*time.Second)
	if same, err := sameFile(expDir, f.opts.hostPath("/run/spire/agent-sockets")); err != nil || !same {
		t.Fatalf("got %s the same directory as the socket's: %v, %v; want true", expDir, same, err)
	}

	if err := f.fake.Start(); err != nil {
		t.Fatal(err)
	}
	f.fake.SetX509(f.svid(time.Now().Add(-time.Minute), time.Now().Add(time.Hour)))
	f.waitDetail(true, "serving, spiffe://example.org/nodeagent", 5*time.Second)
	exposed := f.opts.hostPath(f.opts.ExposeAt)
	f.reaches(exposed)
	f.peerIsConnector(exposed)

	// Killed and restarted (socket re-created): the exposed path reaches the new socket.
	f.fake.Kill()
	f.waitDetail(false, "not serving", 5*time.Second)
	if err := f.fake.Start(); err != nil {
		t.Fatal(err)
	}
	f.waitDetail(true, "serving", 5*time.Second)
	f.reaches(exposed)

	// The socket directory itself is deleted and re-created: the bind now shows the
	// deleted directory; it is replaced by a bind of the new one.
	f.fake.Stop()
	// Run re-publishes the symlink into the directory as it is being emptied, so the
	// removal may need another go.
	var err error
	for range 50 {
		if err = os.RemoveAll(f.opts.hostPath("/run/spire/agent-sockets")); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		same, _ := sameFile(expDir, f.opts.hostPath("/run/spire/agent-sockets"))
		if same {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("bind of the re-created socket directory not restored within 5s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := f.fake.Start(); err != nil {
		t.Fatal(err)
	}
	f.waitDetail(true, "serving", 5*time.Second)
	f.reaches(exposed)
}

func TestExposeRefusesNonEmptyDirectory(t *testing.T) {
	privtest.Root(t)
	f := newFixture(t, func(o *Options) { o.ExposeAt = "/run/spire/sockets/agent.sock" })
	expDir := f.opts.hostPath("/run/spire/sockets")
	if err := os.MkdirAll(expDir, 0o755); err != nil {
		t.Fatal(err)
	}
	stale := filepath.Join(expDir, "old-agent.sock")
	if err := os.WriteFile(stale, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(expDir, unix.MNT_DETACH) })
	f.run()
	f.waitDetail(false, "is not empty; refusing to hide its contents", 5*time.Second)
	if _, err := os.Stat(stale); err != nil {
		t.Errorf("stat %s: %v; want the directory's contents visible, not hidden by a mount", stale, err)
	}
}

func TestUpdateExposeAtRemovesPrevious(t *testing.T) {
	tests := []struct {
		name       string
		privileged bool
		from, to   string
	}{
		{"symlink to symlink", false, "/run/spire/agent-sockets/agent.sock", "/run/spire/agent-sockets/other.sock"},
		{"bind to none", true, "/run/spire/sockets/agent.sock", ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if tc.privileged {
				privtest.Root(t)
			}
			f := newFixture(t, func(o *Options) { o.ExposeAt = tc.from })
			oldDir := f.opts.hostPath(filepath.Dir(tc.from))
			t.Cleanup(func() { _ = unix.Unmount(oldDir, unix.MNT_DETACH) })
			f.run()
			f.waitDetail(false, "socket absent", 5*time.Second)
			if _, err := os.Lstat(f.opts.hostPath(filepath.Join(filepath.Dir(DefaultSocket), filepath.Base(tc.from)))); err != nil && !tc.privileged {
				t.Fatalf("exposure of %s missing: %v", tc.from, err)
			}
			f.stop()

			o := f.opts
			o.ExposeAt = tc.to
			if err := f.sp.Update(o); !errors.Is(err, health.ErrNeedsRestart) {
				t.Fatalf("Update(expose_at) = %v; want ErrNeedsRestart", err)
			}
			f.opts = o
			f.rec = health.NewRecorder()
			f.sp.rep = f.rec
			f.run()
			f.waitDetail(false, "socket absent", 5*time.Second)
			oldLink := f.opts.hostPath(filepath.Join(filepath.Dir(DefaultSocket), filepath.Base(tc.from)))
			if filepath.Base(tc.from) != filepath.Base(DefaultSocket) {
				if _, err := os.Lstat(oldLink); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("lstat %s: %v; want the previous symlink removed", oldLink, err)
				}
			}
			if filepath.Dir(tc.from) != filepath.Dir(DefaultSocket) {
				if root, err := isMountRoot(oldDir); err != nil || root {
					t.Errorf("%s still a mount point (%v, %v); want the previous bind removed", oldDir, root, err)
				}
			}
			if tc.to != "" {
				if got, err := os.Readlink(f.opts.hostPath(tc.to)); err != nil || got != "api.sock" {
					t.Errorf("readlink %s: %q, %v; want \"api.sock\"", tc.to, got, err)
				}
			}
		})
	}
}
