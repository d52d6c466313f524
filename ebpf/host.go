package ebpf

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"

	"golang.org/x/sys/unix"
)

// errNoCgroup2 means the host has no cgroup v2 hierarchy mounted (cgroup v1 only).
var errNoCgroup2 = errors.New("no cgroup2 mount in /proc/mounts (cgroup v1-only host): steering needs cgroup v2")

// cgroup2Mount returns the first cgroup2 mount point listed in mounts.
func cgroup2Mount(mounts io.Reader) (string, error) {
	sc := bufio.NewScanner(mounts)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) >= 3 && f[2] == "cgroup2" {
			return unescapeMount(f[1]), nil
		}
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("read mounts: %w", err)
	}
	return "", errNoCgroup2
}

// unescapeMount undoes the octal escapes (\040 for a space) of /proc/mounts.
func unescapeMount(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) && isOctal(s[i+1]) && isOctal(s[i+2]) && isOctal(s[i+3]) {
			b.WriteByte((s[i+1]-'0')<<6 | (s[i+2]-'0')<<3 | (s[i+3] - '0'))
			i += 3
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isOctal(c byte) bool { return c >= '0' && c <= '7' }

// resolveCgroup returns the cgroup v2 directory to attach to, as this process
// sees it. The mount is looked up in the mount table of the host's init
// (host_root/proc/1/mounts), not this process's own: in a container that has a
// cgroup namespace, its own /sys/fs/cgroup shows only the container's subtree,
// and attaching there would steer nothing but the agent.
func resolveCgroup(hostRoot, cgroup string) (string, error) {
	f, err := os.Open(filepath.Join(hostRoot, "proc/1/mounts"))
	if err != nil {
		f, err = os.Open(filepath.Join(hostRoot, "proc/mounts"))
	}
	if err != nil {
		return "", fmt.Errorf("find cgroup v2 mount: %w", err)
	}
	defer f.Close()
	mnt, err := cgroup2Mount(f)
	if err != nil {
		return "", err
	}
	root := filepath.Join(hostRoot, mnt)
	path := root
	switch {
	case cgroup == "":
	case filepath.IsAbs(cgroup):
		path = filepath.Clean(cgroup)
	default:
		path = filepath.Join(root, cgroup)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return "", fmt.Errorf("cgroup %s: %w", path, err)
	}
	if st.Type != unix.CGROUP2_SUPER_MAGIC {
		return "", fmt.Errorf("cgroup %s is not on a cgroup v2 filesystem", path)
	}
	return path, nil
}

// cgroupID returns the id of the cgroup v2 directory at path (its inode number,
// which is what bpf_link info reports).
func cgroupID(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("stat cgroup %s: %w", path, err)
	}
	return st.Ino, nil
}

// isBPFFS reports whether path is on a bpf filesystem.
func isBPFFS(path string) (bool, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return false, err
	}
	return st.Type == unix.BPF_FS_MAGIC, nil
}

// sysBPF is where the kernel provides an empty directory for the bpf filesystem.
const sysBPF = "/sys/fs/bpf"

// ensureBPFFS makes dir exist on a bpf filesystem. When dir is under
// /sys/fs/bpf and nothing is mounted there yet (a host where systemd did not
// mount it), a bpf filesystem is mounted on /sys/fs/bpf first, as systemd
// would. Anywhere else a missing bpf filesystem is an error.
func ensureBPFFS(dir string) error {
	dir = filepath.Clean(dir)
	anc := dir
	for {
		if _, err := os.Stat(anc); err == nil {
			break
		} else if !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("stat %s: %w", anc, err)
		}
		parent := filepath.Dir(anc)
		if parent == anc {
			break
		}
		anc = parent
	}
	ok, err := isBPFFS(anc)
	if err != nil {
		return fmt.Errorf("statfs %s: %w", anc, err)
	}
	if !ok {
		if anc != sysBPF {
			return fmt.Errorf("bpffs %s: %s is not on a bpf filesystem", dir, anc)
		}
		if err := unix.Mount("bpf", sysBPF, "bpf", 0, "mode=0700"); err != nil {
			return fmt.Errorf("mount bpf filesystem on %s: %w", sysBPF, err)
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	return nil
}

// netnsCookie returns the SO_NETNS_COOKIE (kernel 5.14) of the network namespace
// at path, or of this process's own namespace when path is empty.
func netnsCookie(path string) (uint64, error) {
	if path == "" {
		return socketNetnsCookie()
	}
	type result struct {
		c   uint64
		err error
	}
	ch := make(chan result, 1)
	go func() {
		// The thread is never unlocked: it exits with the goroutine, so no
		// other goroutine runs in the other namespace.
		runtime.LockOSThread()
		f, err := os.Open(path)
		if err != nil {
			ch <- result{err: fmt.Errorf("open netns %s: %w", path, err)}
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			ch <- result{err: fmt.Errorf("enter netns %s: %w", path, err)}
			return
		}
		c, err := socketNetnsCookie()
		ch <- result{c, err}
	}()
	r := <-ch
	return r.c, r.err
}

func socketNetnsCookie() (uint64, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		fd, err = unix.Socket(unix.AF_INET6, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	}
	if err != nil {
		return 0, fmt.Errorf("socket for netns cookie: %w", err)
	}
	defer unix.Close(fd)
	c, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	if err != nil {
		return 0, fmt.Errorf("getsockopt SO_NETNS_COOKIE (kernel 5.14): %w", err)
	}
	return c, nil
}
