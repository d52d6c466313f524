package netcfg

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// watchVPPDir triggers a re-evaluation whenever vpp-manager writes, renames or removes
// a file in the directory of its info file (under root), so "tap created, vpp-manager
// starting" turns into "taken over" as soon as it writes "ready". While the directory
// does not exist, its parent is watched for its creation. It returns when ctx is done;
// when inotify is unavailable it returns the error and the periodic re-read that
// covers sysfs covers the file too.
func watchVPPDir(ctx context.Context, root string, kick func()) error {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return fmt.Errorf("inotify init: %w", err)
	}
	f := os.NewFile(uintptr(fd), "inotify") // non-blocking: reads park in the poller, Close wakes them
	stop := context.AfterFunc(ctx, func() { f.Close() })
	defer func() {
		if stop() {
			f.Close()
		}
	}()

	dir := filepath.Dir(vppManagerInfoFile)
	const dirEvents = unix.IN_CLOSE_WRITE | unix.IN_MOVED_TO | unix.IN_MOVED_FROM | unix.IN_CREATE | unix.IN_DELETE | unix.IN_DELETE_SELF | unix.IN_MOVE_SELF
	watched := -1 // watch descriptor on dir, -1 while only the parent is watched
	parent := -1
	arm := func() {
		if watched >= 0 {
			return
		}
		if p, err := resolveIn(root, dir); err == nil {
			if wd, err := unix.InotifyAddWatch(fd, filepath.Join(root, p), dirEvents); err == nil {
				watched = wd
				return
			}
		}
		if parent < 0 {
			if p, err := resolveIn(root, filepath.Dir(dir)); err == nil {
				if wd, err := unix.InotifyAddWatch(fd, filepath.Join(root, p), unix.IN_CREATE|unix.IN_MOVED_TO); err == nil {
					parent = wd
				}
			}
		}
	}
	arm()

	buf := make([]byte, 16*(unix.SizeofInotifyEvent+unix.NAME_MAX+1))
	for {
		n, err := f.Read(buf)
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, os.ErrClosed) {
				return nil
			}
			return fmt.Errorf("read inotify events: %w", err)
		}
		relevant := false
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
			nameBytes := buf[off+unix.SizeofInotifyEvent : min(n, off+unix.SizeofInotifyEvent+int(ev.Len))]
			name := strings.TrimRight(string(nameBytes), "\x00")
			off += unix.SizeofInotifyEvent + int(ev.Len)
			switch {
			case int(ev.Wd) == watched:
				relevant = true
				if ev.Mask&(unix.IN_DELETE_SELF|unix.IN_MOVE_SELF|unix.IN_IGNORED) != 0 {
					watched = -1 // the directory went away: fall back to its parent
				}
			case int(ev.Wd) == parent && name == filepath.Base(dir):
				relevant = true
			case ev.Mask&unix.IN_Q_OVERFLOW != 0:
				relevant = true
			}
		}
		if relevant {
			arm()
			kick()
		}
	}
}
