package proxy

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
)

// The relay moves one direction of a connection. Each read is a non-blocking
// read(2) inside RawConn.Read into a buffer taken from a pool just for that call;
// the buffer goes back before the goroutine parks in the runtime poller. A burst
// that fills the buffer continues with splice(2) through a pipe pair taken from a
// pool and returned as soon as the socket is empty (RelaySplice). An idle
// connection therefore costs two sockets, two small parked goroutines and a few
// hundred bytes of bookkeeping, and never a pipe or a buffer.

// copyBufSize is the pooled buffer of RelayCopy; smallBufSize the one RelaySplice
// reads a burst's first bytes into.
const (
	copyBufSize  = 64 << 10
	smallBufSize = 16 << 10
)

// pipeSize is the capacity requested for pooled pipes (F_SETPIPE_SZ); the kernel
// default is 64 KiB. A larger pipe moves more per splice call when busy and costs
// nothing while it sits empty in the pool.
const pipeSize = 256 << 10

var (
	copyBufs  = &sync.Pool{New: func() any { b := make([]byte, copyBufSize); return &b }}
	smallBufs = &sync.Pool{New: func() any { b := make([]byte, smallBufSize); return &b }}
)

type pipe struct {
	r, w int
	size int
}

// pipePool keeps a bounded number of empty pipes for reuse.
type pipePool struct {
	mu   sync.Mutex
	free []*pipe
	max  int
	open atomic.Int64 // pipes in existence, free or lent
}

func (pp *pipePool) get() (*pipe, error) {
	pp.mu.Lock()
	if n := len(pp.free); n > 0 {
		p := pp.free[n-1]
		pp.free = pp.free[:n-1]
		pp.mu.Unlock()
		return p, nil
	}
	pp.mu.Unlock()
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		return nil, err
	}
	p := &pipe{r: fds[0], w: fds[1], size: 64 << 10}
	if n, err := unix.FcntlInt(uintptr(p.w), unix.F_SETPIPE_SZ, pipeSize); err == nil {
		p.size = n
	}
	pp.open.Add(1)
	return p, nil
}

// put returns an empty pipe; a pipe that may hold data is closed instead.
func (pp *pipePool) put(p *pipe, empty bool) {
	if empty {
		pp.mu.Lock()
		if len(pp.free) < pp.max {
			pp.free = append(pp.free, p)
			pp.mu.Unlock()
			return
		}
		pp.mu.Unlock()
	}
	pp.closePipe(p)
}

func (pp *pipePool) closePipe(p *pipe) {
	unix.Close(p.r)
	unix.Close(p.w)
	pp.open.Add(-1)
}

// drain closes every pooled pipe.
func (pp *pipePool) drain() {
	pp.mu.Lock()
	free := pp.free
	pp.free = nil
	pp.mu.Unlock()
	for _, p := range free {
		pp.closePipe(p)
	}
}

// half is one direction of a connection: src → dst.
type half struct {
	src, dst       *net.TCPConn
	srcRaw, dstRaw syscall.RawConn
	c              *conn
	bytes          *atomic.Int64
	count          func(int64)
	mode           RelayMode
	pipes          *pipePool
	pool           *sync.Pool // read buffers: copyBufs, or smallBufs for RelaySplice

	stepFn func(fd uintptr) bool // h.step, allocated once
	eof    bool
	err    error
}

// errors a half reports, so the connection can name its close reason.
type relayError struct {
	read bool // the source failed (else the destination)
	err  error
}

func (e *relayError) Error() string { return e.err.Error() }
func (e *relayError) Unwrap() error { return e.err }

func newHalf(c *conn, src, dst *net.TCPConn, srcRaw, dstRaw syscall.RawConn, bytes *atomic.Int64, count func(int64), mode RelayMode, pipes *pipePool) *half {
	h := &half{src: src, dst: dst, srcRaw: srcRaw, dstRaw: dstRaw, c: c, bytes: bytes, count: count,
		mode: mode, pipes: pipes, pool: copyBufs}
	if mode == RelaySplice {
		h.pool = smallBufs
	}
	h.stepFn = h.step
	return h
}

func (h *half) moved(n int) {
	h.bytes.Add(int64(n))
	h.count(int64(n))
	h.c.touch()
}

// run relays until src reaches EOF (nil) or something fails.
//
// The whole direction is one RawConn.Read: step runs whenever the runtime
// poller reports src readable, reads until EAGAIN and returns false to wait for
// the next readiness (one read lock and poller reset per direction, not per
// burst).
func (h *half) run() error {
	if err := h.srcRaw.Read(h.stepFn); err != nil {
		return &relayError{read: true, err: err}
	}
	if h.eof {
		return nil
	}
	return h.err
}

// step moves what src has; it reports true when the direction is over (EOF or
// an error in h.eof / h.err). Buffers and pipes are taken for the moves only and
// returned before step asks to wait, so a parked direction holds neither.
//
// RelaySplice copies a burst's first read (up to smallBufSize): a small message
// costs the same two syscalls as splicing it and needs no pipe. A read that fills
// the buffer switches to splicing for the rest of the burst.
func (h *half) step(fd uintptr) bool {
	for {
		bp := h.pool.Get().(*[]byte)
		n, rerr := readRetry(int(fd), *bp)
		switch {
		case errors.Is(rerr, unix.EAGAIN):
			h.pool.Put(bp)
			return false
		case rerr != nil:
			h.pool.Put(bp)
			h.err = &relayError{read: true, err: rerr}
			return true
		case n == 0:
			h.pool.Put(bp)
			h.eof = true
			return true
		}
		_, werr := h.dst.Write((*bp)[:n])
		full := n == len(*bp)
		h.pool.Put(bp)
		if werr != nil {
			h.err = &relayError{err: werr}
			return true
		}
		h.moved(n)
		// Read again even after a short read: the poller is edge-triggered, and
		// a FIN queued behind the data just read raised its edge before that
		// read, so waiting now could wait forever. EAGAIN is the only proof the
		// socket is empty.
		if full && h.mode == RelaySplice {
			if done, wait := h.spliceBurst(int(fd)); done || wait {
				return done
			}
		}
	}
}

func readRetry(fd int, b []byte) (int, error) {
	for {
		n, err := unix.Read(fd, b)
		if err != unix.EINTR {
			return n, err
		}
	}
}

// spliceBurst splices what src (fd) has into a pooled pipe and on into dst until
// src is empty (wait) or the direction is over (done). Without a pipe (out of
// descriptors) it returns neither, and step copies instead.
func (h *half) spliceBurst(fd int) (done, wait bool) {
	p, perr := h.pipes.get()
	if perr != nil {
		return false, false
	}
	inPipe := 0
	defer func() { h.pipes.put(p, inPipe == 0) }()
	for {
		var n int64
		var serr error
		for {
			n, serr = unix.Splice(fd, nil, p.w, nil, p.size, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
			if serr != unix.EINTR {
				break
			}
		}
		switch {
		case serr == unix.EAGAIN:
			return false, true
		case serr != nil:
			h.err = &relayError{read: true, err: serr}
			return true, false
		case n == 0:
			h.eof = true
			return true, false
		}
		inPipe = int(n)
		for inPipe > 0 {
			var m int64
			var werr error
			if err := h.dstRaw.Write(func(dfd uintptr) bool {
				for {
					m, werr = unix.Splice(p.r, nil, int(dfd), nil, inPipe, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
					if werr != unix.EINTR {
						break
					}
				}
				return werr != unix.EAGAIN // EAGAIN: wait until dst is writable
			}); err != nil {
				h.err = &relayError{err: err}
				return true, false
			}
			if werr == nil && m == 0 {
				werr = io.ErrShortWrite
			}
			if werr != nil {
				h.err = &relayError{err: werr}
				return true, false
			}
			inPipe -= int(m)
			h.moved(int(m))
		}
	}
}

// isReset reports whether err means the peer reset the connection.
func isReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// isClosed reports whether err comes from our own Close.
func isClosed(err error) bool {
	return errors.Is(err, net.ErrClosed)
}
