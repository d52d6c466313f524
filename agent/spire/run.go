package spire

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"golang.org/x/sys/unix"

	"github.com/nodeagent/nodeagent/agent/health"
)

// inotifyMask covers everything that can happen to the socket, the ExposeAt symlink
// and the directory itself.
const inotifyMask = unix.IN_CREATE | unix.IN_DELETE | unix.IN_MOVED_FROM | unix.IN_MOVED_TO |
	unix.IN_ATTRIB | unix.IN_DELETE_SELF | unix.IN_MOVE_SELF | unix.IN_ONLYDIR

// Run makes the socket directory (and ExposeAt), then watches the socket and the
// Workload API behind it, reporting the spire check whenever it changes, until ctx is
// done. It returns an error only when it cannot watch at all (inotify).
// The socket directory and the exposure are left in place when Run returns: they are
// host state workloads rely on across nodeagent restarts.
func (s *Spire) Run(ctx context.Context) error {
	cur := s.options()
	for _, old := range s.takeRetired() {
		if old.ExposeAt == cur.ExposeAt && old.Socket == cur.Socket && old.HostRoot == cur.HostRoot {
			continue
		}
		if err := unpublish(old); err != nil {
			s.log.Warn("remove the previous spire.expose_at", "path", old.ExposeAt, "error", err)
		} else {
			s.log.Info("removed the previous spire.expose_at", "path", old.ExposeAt)
		}
	}

	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		return fmt.Errorf("inotify init: %w", err)
	}
	// Non-blocking, so os.File reads go through the runtime poller and Close wakes them.
	inotifyFile := os.NewFile(uintptr(fd), "inotify")
	defer func() { _ = inotifyFile.Close() }()
	kick := make(chan struct{}, 1)
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		buf := make([]byte, 64*(unix.SizeofInotifyEvent+unix.NAME_MAX+1))
		for {
			// Every event leads to a full rescan (a handful of stats), so events are
			// only counted, not parsed; IN_Q_OVERFLOW needs nothing special either.
			if _, err := inotifyFile.Read(buf); err != nil {
				return
			}
			select {
			case kick <- struct{}{}:
			default:
			}
		}
	}()

	r := &runner{s: s, ctx: ctx, inotFD: fd, apiCh: make(chan apiEvent)}
	defer func() {
		r.stopSession()
		_ = inotifyFile.Close() // wakes the reader
		<-readerDone
		s.m.socketUp.Set(0)
	}()

	expiry := time.NewTimer(time.Hour)
	defer expiry.Stop()
	resync := time.NewTimer(r.opts().Resync)
	defer resync.Stop()

	first := true
	for {
		if first {
			r.rescan()
		}
		res, next := evaluate(r.opts(), r.st, time.Now())
		if first || res != r.last {
			r.report(res)
			first = false
		}
		expiry.Stop()
		if !next.IsZero() {
			expiry.Reset(time.Until(next) + 10*time.Millisecond)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-kick:
			r.rescan()
		case <-resync.C:
			resync.Reset(r.opts().Resync)
			r.rescan()
		case ev := <-r.apiCh:
			r.apply(ev)
		case <-expiry.C:
		}
	}
}

type apiEvent struct {
	gen  uint64
	x509 *workloadapi.X509Context
	err  error
}

// runner is the state of one Run.
type runner struct {
	s      *Spire
	ctx    context.Context
	inotFD int

	st   state
	last health.Result

	sockIno      uint64 // inode of the socket the session talks to; 0: none
	gen          uint64
	apiCh        chan apiEvent
	cancel       context.CancelFunc
	sessionDone  chan struct{}
	sessionStart time.Time
}

func (r *runner) opts() Options { return r.s.options() }

func (r *runner) report(res health.Result) {
	r.last = res
	up := 0.0
	if r.st.socketPresent && (r.st.api == apiIdentity || r.st.api == apiNoIdentity) {
		up = 1
	}
	r.s.m.socketUp.Set(up)
	expiry := 0.0
	if r.st.api == apiIdentity {
		expiry = float64(r.st.x509.DefaultSVID().Certificates[0].NotAfter.Unix())
	}
	r.s.m.expiry.Set(expiry)
	if res.OK {
		r.s.log.Info("spire check", "ok", true, "detail", res.Detail)
	} else {
		r.s.log.Warn("spire check", "ok", false, "detail", res.Detail)
	}
	r.s.rep.Report(res)
}

// rescan makes the directory and the exposure right and looks at the socket; a new
// socket (a new inode) gets a new Workload API session, a vanished one loses it.
func (r *runner) rescan() {
	o := r.opts()
	sockDir := o.hostPath(filepath.Dir(o.Socket))
	var changed bool
	err := hostRootExists(o.HostRoot)
	if err == nil {
		changed, err = ensureDir(sockDir)
	}
	if changed {
		r.s.log.Info("made the spire socket directory", "path", sockDir, "mode", "0755")
	}
	if err == nil {
		// Adding a watch again is cheap and idempotent on the same inode, and picks up
		// a directory that was deleted and re-created.
		_, err = unix.InotifyAddWatch(r.inotFD, sockDir, inotifyMask)
		if err != nil {
			err = fmt.Errorf("inotify watch: %w", err)
		}
	}
	r.st.dirErr = err

	if o.ExposeAt != "" && err == nil {
		r.st.exposeErr = publish(o)
		if r.st.exposeErr == nil {
			r.st.exposeErr = verifyExposed(o)
		}
	}

	// Stat, not Lstat: a Socket that is itself a symlink is followed.
	var sb unix.Stat_t
	err = unix.Stat(o.hostPath(o.Socket), &sb)
	switch {
	case errors.Is(err, unix.ENOENT):
		r.st.socketPresent, r.st.socketErr = false, nil
		r.stopSession()
	case err != nil:
		r.st.socketPresent, r.st.socketErr = false, fmt.Errorf("stat: %w", err)
		r.stopSession()
	case sb.Mode&unix.S_IFMT != unix.S_IFSOCK:
		r.st.socketPresent, r.st.socketErr = false, fmt.Errorf("is not a socket (%s)", fs.FileMode(sb.Mode).Type())
		r.stopSession()
	default:
		r.st.socketPresent, r.st.socketErr = true, nil
		if sb.Ino != r.sockIno {
			r.s.log.Info("spire socket appeared", "path", o.Socket)
			r.startSession(o.hostPath(o.Socket))
			r.sockIno = sb.Ino
		}
	}
}

// startSession (re)starts the Workload API watch on path.
func (r *runner) startSession(path string) {
	r.stopSession()
	r.gen++
	gen := r.gen
	ctx, cancel := context.WithCancel(r.ctx)
	done := make(chan struct{})
	r.cancel, r.sessionDone = cancel, done
	r.sessionStart = time.Now()
	w := &watcher{gen: gen, ch: r.apiCh, done: ctx.Done()}
	go func() {
		defer close(done)
		c, err := workloadapi.New(ctx, clientOptions(path)...)
		if err != nil {
			w.OnX509ContextWatchError(err)
			return
		}
		defer func() { _ = c.Close() }()
		// The client's watch rather than an X509Source: the source is built on the same
		// FetchX509SVID stream but swallows its errors, and NewX509Source blocks until
		// the first SVID, so it cannot tell "agent gone" from "no identity" — which is
		// what this check is about. WatchX509Context returns only when ctx is done;
		// errors (agent gone, PermissionDenied) reach the watcher and the watch is
		// retried with fastBackoff. Rotations arrive as updates on the stream.
		_ = c.WatchX509Context(ctx, w)
	}()
}

// stopSession ends the Workload API watch, if any, and forgets what it said.
func (r *runner) stopSession() {
	if r.cancel != nil {
		r.cancel()
		<-r.sessionDone
		r.cancel, r.sessionDone = nil, nil
	}
	r.sockIno = 0
	r.st.api, r.st.apiErr, r.st.x509 = apiUnknown, nil, nil
}

// apply takes a Workload API answer from the current session.
func (r *runner) apply(ev apiEvent) {
	if ev.gen != r.gen || r.cancel == nil {
		return // from a session already stopped
	}
	api, err := classify(ev.x509, ev.err)
	if api == apiFailing && r.st.api == apiUnknown && time.Since(r.sessionStart) < time.Second {
		// The socket file appears at bind(), before the agent listen()s: a refusal
		// right after it appeared is the agent still starting, not a failure yet.
		r.st.apiErr = err
		return
	}
	if api == apiIdentity && r.st.api == apiIdentity {
		prev, cur := r.st.x509.DefaultSVID(), ev.x509.DefaultSVID()
		if !bytes.Equal(prev.Certificates[0].Raw, cur.Certificates[0].Raw) {
			r.s.m.rotations.Inc()
			r.s.log.Info("svid rotated", "spiffe_id", cur.ID.String(), "expires", cur.Certificates[0].NotAfter)
		}
	}
	if api == apiFailing && r.st.api != apiFailing {
		r.s.log.Debug("workload api watch failed", "error", err)
	}
	r.st.api, r.st.apiErr = api, err
	if api == apiIdentity {
		r.st.x509 = ev.x509
	} else {
		r.st.x509 = nil
	}
}

// watcher forwards a session's Workload API updates to Run's loop.
type watcher struct {
	gen  uint64
	ch   chan<- apiEvent
	done <-chan struct{}
}

func (w *watcher) OnX509ContextUpdate(x *workloadapi.X509Context) {
	select {
	case w.ch <- apiEvent{gen: w.gen, x509: x}:
	case <-w.done:
	}
}

func (w *watcher) OnX509ContextWatchError(err error) {
	select {
	case <-w.done:
		return // our own cancellation
	default:
	}
	select {
	case w.ch <- apiEvent{gen: w.gen, err: err}:
	case <-w.done:
	}
}

// Check runs the spire check once, changing nothing on the host: it neither makes the
// directory nor publishes ExposeAt, it only looks and asks the Workload API.
func Check(ctx context.Context, opts Options) []health.Result {
	o := opts.withDefaults()
	var st state
	sockDir := o.hostPath(filepath.Dir(o.Socket))
	if fi, err := os.Stat(sockDir); err != nil {
		st.dirErr = err
	} else if !fi.IsDir() {
		st.dirErr = errors.New("not a directory")
	} else if perm := fi.Mode().Perm(); perm&0o755 != 0o755 {
		st.dirErr = fmt.Errorf("mode %#o, not traversable by non-root workloads (want at least 0755)", perm)
	}
	if o.ExposeAt != "" && st.dirErr == nil {
		st.exposeErr = verifyExposed(o)
	}
	var sb unix.Stat_t
	err := unix.Stat(o.hostPath(o.Socket), &sb)
	switch {
	case errors.Is(err, unix.ENOENT):
	case err != nil:
		st.socketErr = fmt.Errorf("stat: %w", err)
	case sb.Mode&unix.S_IFMT != unix.S_IFSOCK:
		st.socketErr = fmt.Errorf("is not a socket (%s)", fs.FileMode(sb.Mode).Type())
	default:
		st.socketPresent = true
		fctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		x, err := fetchOnce(fctx, o.hostPath(o.Socket))
		cancel()
		st.api, st.apiErr = classify(x, err)
		if st.api == apiIdentity {
			st.x509 = x
		}
	}
	res, _ := evaluate(o, st, time.Now())
	return []health.Result{res}
}
