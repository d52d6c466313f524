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
// read(2) inside RawConn.Read into a buffer taken from a pool just for that call:
// on EAGAIN the buffer goes back before the goroutine parks in the runtime poller.
// A burst that fills the buffer continues with splice(2) through a pipe pair taken
// from a pool and returned as soon as the socket is empty (RelaySplice). An idle
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

	// readFn is the non-blocking read run by srcRaw.Read: it takes a buffer
	// from pool only for the read itself and gives it back on EAGAIN, so a
	// half parked in the poller holds no buffer.
	pool   *sync.Pool
	readFn func(fd uintptr) bool
	bp     *[]byte
	n      int
	rerr   error
}

// errors a half reports, so the connection can name its close reason.
type relayError struct {
	read bool // the source failed (else the destination)
	err  error
}

func (e *relayError) Error() string { return e.err.Error() }
func (e *relayError) Unwrap() error { return e.err }

func newHalf(c *conn, src, dst *net.TCPConn, srcRaw, dstRaw syscall.RawConn, bytes *atomic.Int64, count func(int64), mode RelayMode) *half {
	h := &half{src: src, dst: dst, srcRaw: srcRaw, dstRaw: dstRaw, c: c, bytes: bytes, count: count, pool: copyBufs}
	if mode == RelaySplice {
		h.pool = smallBufs
	}
	h.readFn = func(fd uintptr) bool {
		bp := h.pool.Get().(*[]byte)
		for {
			h.n, h.rerr = unix.Read(int(fd), *bp)
			if h.rerr != unix.EINTR {
				break
			}
		}
		if h.rerr == unix.EAGAIN {
			h.pool.Put(bp)
			return false // wait for readability, holding nothing
		}
		h.bp = bp
		return true
	}
	return h
}

func (h *half) moved(n int) {
	h.bytes.Add(int64(n))
	h.count(int64(n))
	h.c.touch()
}

// run relays until src reaches EOF (nil) or something fails.
//
// RelaySplice copies a burst's first read (up to smallBufSize) and only a read
// that fills the buffer switches to splicing for the rest of the burst: small
// messages cost the same two syscalls either way and need no pipe.
func (h *half) run(mode RelayMode, pipes *pipePool) error {
	for {
		h.bp = nil
		if err := h.srcRaw.Read(h.readFn); err != nil {
			return &relayError{read: true, err: err}
		}
		bp, n, rerr := h.bp, h.n, h.rerr
		if rerr != nil {
			h.pool.Put(bp)
			return &relayError{read: true, err: rerr}
		}
		if n == 0 {
			h.pool.Put(bp)
			return nil // EOF
		}
		_, werr := h.dst.Write((*bp)[:n])
		full := n == len(*bp)
		h.pool.Put(bp)
		if werr != nil {
			return &relayError{err: werr}
		}
		h.moved(n)
		if mode == RelaySplice && full {
			if eof, err := h.spliceBurst(pipes); err != nil || eof {
				return err
			}
		}
	}
}

// spliceBurst splices what src has into a pooled pipe and on into dst.
func (h *half) spliceBurst(pipes *pipePool) (eof bool, err error) {
	p, perr := pipes.get()
	if perr != nil {
		return false, nil // out of descriptors for a pipe: copy instead
	}
	inPipe := 0
	defer func() { pipes.put(p, inPipe == 0) }()
	for {
		var n int64
		var serr error
		if err := h.srcRaw.Read(func(fd uintptr) bool {
			for {
				n, serr = unix.Splice(int(fd), nil, p.w, nil, p.size, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
				if serr != unix.EINTR {
					return true
				}
			}
		}); err != nil {
			return false, &relayError{read: true, err: err}
		}
		switch {
		case serr == unix.EAGAIN:
			return false, nil
		case serr != nil:
			return false, &relayError{read: true, err: serr}
		case n == 0:
			return true, nil
		}
		inPipe = int(n)
		for inPipe > 0 {
			var m int64
			var werr error
			if err := h.dstRaw.Write(func(fd uintptr) bool {
				for {
					m, werr = unix.Splice(p.r, nil, int(fd), nil, inPipe, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
					if werr != unix.EINTR {
						break
					}
				}
				return werr != unix.EAGAIN // EAGAIN: wait until dst is writable
			}); err != nil {
				return false, &relayError{err: err}
			}
			if werr != nil {
				return false, &relayError{err: werr}
			}
			if m == 0 {
				return false, &relayError{err: io.ErrShortWrite}
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
