package spire

// Publishing the socket at ExposeAt.
//
// NEVER RELAY THE SOCKET'S BYTES. The SPIRE agent attests the process at the other end
// of each Workload API connection from the kernel's peer credentials (SO_PEERCRED: pid,
// uid, gid) and issues that process's identities. If nodeagent accepted connections at
// ExposeAt and copied bytes to the real socket, the agent would see nodeagent as the
// peer of every connection and hand every workload nodeagent's identity (or deny them
// all). So ExposeAt is published by the file system only: connecting to it must reach
// the SPIRE agent's own listening socket, with the workload as the kernel-visible peer.
//
// How, and why not a plain absolute symlink:
//
//   - ExposeAt in the socket's own directory: a relative symlink `base(ExposeAt) ->
//     base(Socket)` next to the socket. It resolves by name on every connect, so it
//     follows the agent when it re-creates its socket, and being relative it resolves
//     the same in every mount namespace that sees the directory: the host, nodeagent's
//     /host view in the DaemonSet, and a pod that mounts the directory by hostPath.
//   - ExposeAt in another directory: the socket's directory is bind-mounted onto
//     dir(ExposeAt) (same inode, so the agent's re-created socket is there at once),
//     plus the relative symlink above inside the socket directory when the file names
//     differ. An absolute symlink would not do: a pod that mounts only dir(ExposeAt)
//     resolves an absolute target inside its own root, where nothing is, and in the
//     DaemonSet (HostRoot /host) a target written as nodeagent sees it (/host/run/...)
//     would not exist on the host at all. The bind mount needs CAP_SYS_ADMIN in the
//     host's mount namespace: in the DaemonSet nodeagent is privileged and mounts
//     the host's / at /host with mountPropagation: Bidirectional, so the bind made at
//     /host/<dir> propagates to the host. Pods that mount dir(ExposeAt) before the bind
//     exists need mountPropagation: HostToContainer to see it (the socket directory must
//     exist before the SPIRE agent starts for the same reason).
//
// The exposure is host state meant to outlive nodeagent restarts (like the socket
// directory itself): Run leaves it in place when it returns, and makes it right again
// on start (a stale empty bind of a deleted directory is unmounted first).

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// checkExposePaths validates an ExposeAt against the socket path (both clean, absolute).
func checkExposePaths(socket, exposeAt string) error {
	if exposeAt == socket {
		return fmt.Errorf("%q is spire.socket itself", exposeAt)
	}
	sockDir, expDir := filepath.Dir(socket), filepath.Dir(exposeAt)
	if sockDir == expDir {
		return nil
	}
	if expDir == "/" {
		return fmt.Errorf("%q must be in a directory of its own, not /", exposeAt)
	}
	if within(expDir, sockDir) || within(sockDir, expDir) {
		return fmt.Errorf("directory of %q must be the socket's directory %q or unrelated to it, not inside it or containing it", exposeAt, sockDir)
	}
	return nil
}

// within reports whether p is strictly below dir.
func within(p, dir string) bool {
	return strings.HasPrefix(p, strings.TrimSuffix(dir, "/")+"/")
}

// hostRootExists refuses to create anything when the host root itself is missing
// (a wrong host_root would otherwise grow a fake /run inside the container).
func hostRootExists(root string) error {
	fi, err := os.Stat(root)
	if err != nil {
		return fmt.Errorf("host_root: %w", err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("host_root %s is not a directory", root)
	}
	return nil
}

// ensureDir creates dir (a path as this process sees it) and its missing parents with
// mode 0755 (whatever the umask), and adds r-x for group and others to an existing dir
// that lacks them, so non-root workloads can traverse to the socket. It reports whether
// it changed anything.
func ensureDir(dir string) (bool, error) {
	fi, err := os.Stat(dir)
	switch {
	case err == nil:
		if !fi.IsDir() {
			return false, fmt.Errorf("%s exists and is not a directory", dir)
		}
		if perm := fi.Mode().Perm(); perm&0o755 != 0o755 {
			if err := os.Chmod(dir, perm|0o755); err != nil {
				return false, fmt.Errorf("make %s traversable: %w", dir, err)
			}
			return true, nil
		}
		return false, nil
	case errors.Is(err, os.ErrNotExist):
		if parent := filepath.Dir(dir); parent != dir {
			if _, err := ensureDirExists(parent); err != nil {
				return false, err
			}
		}
		if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			return false, fmt.Errorf("create %s: %w", dir, err)
		}
		if err := os.Chmod(dir, 0o755); err != nil {
			return false, fmt.Errorf("chmod %s: %w", dir, err)
		}
		return true, nil
	default:
		return false, fmt.Errorf("stat %s: %w", dir, err)
	}
}

// ensureDirExists creates missing directories with mode 0755 but leaves the mode of
// existing ones alone (they are the host's: /run, /var/run).
func ensureDirExists(dir string) (bool, error) {
	if fi, err := os.Stat(dir); err == nil {
		if !fi.IsDir() {
			return false, fmt.Errorf("%s exists and is not a directory", dir)
		}
		return false, nil
	}
	return ensureDir(dir)
}

// publish makes ExposeAt reach the socket (idempotent). Only file system objects are
// made — see the comment at the top of this file: the socket's bytes are never relayed.
func publish(o Options) error {
	socket, exposeAt := filepath.Clean(o.Socket), filepath.Clean(o.ExposeAt)
	sockDir, expDir := filepath.Dir(socket), filepath.Dir(exposeAt)
	sockBase, expBase := filepath.Base(socket), filepath.Base(exposeAt)
	hostSockDir, hostExpDir := o.hostPath(sockDir), o.hostPath(expDir)

	if sockDir != expDir {
		if _, err := ensureDirExists(hostExpDir); err != nil {
			return fmt.Errorf("expose_at: %w", err)
		}
		same, err := sameFile(hostExpDir, hostSockDir)
		if err != nil {
			return fmt.Errorf("expose_at: %w", err)
		}
		if !same {
			if err := bindDir(hostSockDir, hostExpDir); err != nil {
				return fmt.Errorf("expose_at: %w", err)
			}
		}
	}
	if expBase != sockBase {
		if err := ensureSymlink(filepath.Join(hostSockDir, expBase), sockBase); err != nil {
			return fmt.Errorf("expose_at: %w", err)
		}
	}
	return nil
}

// bindDir bind-mounts src onto dst, first detaching a stale bind at dst (an empty
// mount root, as a bind of a since-deleted socket directory looks). A non-empty dst is
// refused rather than hidden.
func bindDir(src, dst string) error {
	root, err := isMountRoot(dst)
	if err != nil {
		return err
	}
	empty, err := isEmptyDir(dst)
	if err != nil {
		return err
	}
	if root && empty {
		if err := unix.Unmount(dst, unix.MNT_DETACH); err != nil {
			return fmt.Errorf("unmount stale bind at %s: %w", dst, err)
		}
		if empty, err = isEmptyDir(dst); err != nil {
			return err
		}
	}
	if !empty {
		return fmt.Errorf("%s is not empty; refusing to hide its contents under a bind of %s", dst, src)
	}
	if err := unix.Mount(src, dst, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind %s onto %s: %w", src, dst, err)
	}
	return nil
}

// ensureSymlink makes link a symlink to target, replacing a symlink elsewhere
// atomically; any other file at link is refused.
func ensureSymlink(link, target string) error {
	fi, err := os.Lstat(link)
	switch {
	case err == nil && fi.Mode()&os.ModeSymlink != 0:
		if cur, err := os.Readlink(link); err == nil && cur == target {
			return nil
		}
	case err == nil:
		return fmt.Errorf("%s exists and is not a symlink (%s); refusing to replace it", link, fi.Mode().Type())
	case !errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("lstat %s: %w", link, err)
	}
	tmp := link + ".nodeagent-tmp"
	_ = os.Remove(tmp)
	if err := os.Symlink(target, tmp); err != nil {
		return fmt.Errorf("symlink %s -> %s: %w", tmp, target, err)
	}
	if err := os.Rename(tmp, link); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("rename %s to %s: %w", tmp, link, err)
	}
	return nil
}

// verifyExposed checks, changing nothing, that ExposeAt reaches the socket.
func verifyExposed(o Options) error {
	socket, exposeAt := filepath.Clean(o.Socket), filepath.Clean(o.ExposeAt)
	sockDir, expDir := filepath.Dir(socket), filepath.Dir(exposeAt)
	sockBase, expBase := filepath.Base(socket), filepath.Base(exposeAt)
	if sockDir != expDir {
		same, err := sameFile(o.hostPath(expDir), o.hostPath(sockDir))
		if err != nil {
			return err
		}
		if !same {
			return fmt.Errorf("%s is not the socket directory %s (not bind-mounted)", expDir, sockDir)
		}
	}
	if expBase != sockBase {
		link := filepath.Join(o.hostPath(sockDir), expBase)
		cur, err := os.Readlink(link)
		if err != nil {
			return fmt.Errorf("%s is not a symlink to %s: %w", filepath.Join(sockDir, expBase), sockBase, err)
		}
		if cur != sockBase {
			return fmt.Errorf("%s points to %q, not %q", filepath.Join(sockDir, expBase), cur, sockBase)
		}
	}
	// End to end, when the socket is there: ExposeAt resolves to the very same inode.
	if _, err := os.Stat(o.hostPath(socket)); err == nil {
		same, err := sameFile(o.hostPath(exposeAt), o.hostPath(socket))
		if err != nil {
			return err
		}
		if !same {
			return fmt.Errorf("%s does not resolve to %s", exposeAt, socket)
		}
	}
	return nil
}

func sameFile(a, b string) (bool, error) {
	var sa, sb unix.Stat_t
	if err := unix.Stat(a, &sa); err != nil {
		return false, fmt.Errorf("stat %s: %w", a, err)
	}
	if err := unix.Stat(b, &sb); err != nil {
		return false, fmt.Errorf("stat %s: %w", b, err)
	}
	return sa.Dev == sb.Dev && sa.Ino == sb.Ino, nil
}

func isMountRoot(p string) (bool, error) {
	var stx unix.Statx_t
	if err := unix.Statx(unix.AT_FDCWD, p, unix.AT_SYMLINK_NOFOLLOW, unix.STATX_BASIC_STATS, &stx); err != nil {
		return false, fmt.Errorf("statx %s: %w", p, err)
	}
	if stx.Attributes_mask&unix.STATX_ATTR_MOUNT_ROOT == 0 {
		return false, fmt.Errorf("statx %s: kernel does not report mount roots (needs Linux 5.8)", p)
	}
	return stx.Attributes&unix.STATX_ATTR_MOUNT_ROOT != 0, nil
}

func isEmptyDir(p string) (bool, error) {
	f, err := os.Open(p)
	if err != nil {
		return false, fmt.Errorf("open %s: %w", p, err)
	}
	defer func() { _ = f.Close() }()
	names, err := f.Readdirnames(1)
	if len(names) > 0 {
		return false, nil
	}
	// A bind of a deleted directory reads as ENOENT: empty, nothing to hide.
	if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, unix.ENOENT) {
		return false, fmt.Errorf("read %s: %w", p, err)
	}
	return true, nil
}

// unpublish removes an exposure made by publish for options no longer in force (after
// a reload changed spire.expose_at), touching only what is recognisably its own: a
// symlink to the socket's name, a bind of the socket directory.
func unpublish(o Options) error {
	socket, exposeAt := filepath.Clean(o.Socket), filepath.Clean(o.ExposeAt)
	sockDir, expDir := filepath.Dir(socket), filepath.Dir(exposeAt)
	sockBase, expBase := filepath.Base(socket), filepath.Base(exposeAt)
	var errs []error
	if expBase != sockBase {
		link := filepath.Join(o.hostPath(sockDir), expBase)
		if cur, err := os.Readlink(link); err == nil && cur == sockBase {
			if err := os.Remove(link); err != nil {
				errs = append(errs, fmt.Errorf("remove %s: %w", link, err))
			}
		}
	}
	if sockDir != expDir {
		dst := o.hostPath(expDir)
		if same, err := sameFile(dst, o.hostPath(sockDir)); err == nil && same {
			if root, err := isMountRoot(dst); err == nil && root {
				if err := unix.Unmount(dst, unix.MNT_DETACH); err != nil {
					errs = append(errs, fmt.Errorf("unmount %s: %w", dst, err))
				}
			}
		}
	}
	return errors.Join(errs...)
}
