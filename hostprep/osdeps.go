package hostprep

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// The host is reached through these small interfaces so tests can swap a fake kernel
// (a temporary host_root where a write to nr_hugepages allocates what the test allows),
// a recording modprobe and a fake mount table. The real implementations are tested as root.

// sysfsWriter writes a kernel control file under /sys or /proc.
type sysfsWriter interface {
	WriteFile(path string, data []byte) error
}

// commandRunner runs a host command. root is host_root: when it is not "/", the command
// runs chrooted into it so it sees the host's files (/lib/modules for modprobe). It
// returns the command's stderr, also when it fails.
type commandRunner interface {
	Run(ctx context.Context, root string, argv ...string) (stderr []byte, err error)
}

// mounter checks and mounts bpffs.
type mounter interface {
	IsBPFFS(path string) (bool, error)
	MountBPFFS(path string) error
}

// deps bundles the host access of one Hostprep.
type deps struct {
	sysfs sysfsWriter
	cmd   commandRunner
	mnt   mounter
	now   func() time.Time
}

func realDeps() deps {
	return deps{sysfs: kernelFiles{}, cmd: execRunner{}, mnt: realMounter{}, now: time.Now}
}

// kernelFiles writes existing files only: a missing /sys entry is an error, never a
// new regular file that would pretend the kernel took the value.
type kernelFiles struct{}

func (kernelFiles) WriteFile(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		return err
	}
	_, werr := f.Write(data)
	cerr := f.Close()
	if werr != nil {
		return fmt.Errorf("write %s: %w", path, werr)
	}
	if cerr != nil {
		return fmt.Errorf("close %s: %w", path, cerr)
	}
	return nil
}

// execRunner runs argv[0] (an absolute path as seen inside root).
type execRunner struct{}

func (execRunner) Run(ctx context.Context, root string, argv ...string) ([]byte, error) {
	if len(argv) == 0 {
		return nil, errors.New("no command")
	}
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C"}
	if root != "" && root != "/" {
		cmd.SysProcAttr = &syscall.SysProcAttr{Chroot: root}
		cmd.Dir = "/"
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	cmd.WaitDelay = time.Second
	err := cmd.Run()
	return stderr.Bytes(), err
}

type realMounter struct{}

func (realMounter) IsBPFFS(path string) (bool, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return false, fmt.Errorf("statfs %s: %w", path, err)
	}
	return uint32(st.Type) == unix.BPF_FS_MAGIC, nil
}

func (realMounter) MountBPFFS(path string) error {
	if err := os.MkdirAll(path, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", path, err)
	}
	if err := unix.Mount("bpf", path, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount bpf at %s: %w", path, err)
	}
	return nil
}

// readTrim reads a small kernel file and trims it.
func readTrim(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(b)), nil
}
