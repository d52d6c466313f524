package proxy

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The relay moves one direction of a connection. Both modes first wait until the
// source socket is readable while holding nothing but the goroutine (a 1-byte
// MSG_PEEK recv through the runtime poller), then take a pooled resource — a pipe
// pair for splice, a buffer for copy — move everything the socket has, and give the
// resource back as soon as a non-blocking read finds the socket empty. An idle
// connection therefore costs two sockets, two small goroutines and a few hundred
// bytes of bookkeeping, and never a pipe or a buffer.

// copyBufSize is the pooled buffer of RelayCopy.
const copyBufSize = 64 << 10

// pipeSize is the capacity requested for pooled pipes (F_SETPIPE_SZ); the kernel
// default is 64 KiB. A larger pipe moves more per splice call when busy and costs
// nothing while it sits empty in the pool.
const pipeSize = 256 << 10

var copyBufs = sync.Pool{New: func() any { b := make([]byte, copyBufSize); return &b }}

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

	peek     [1]byte
	readable func(fd uintptr) bool
}

// errors a half reports, so the connection can name its close reason.
type relayError struct {
	read bool // the source failed (else the destination)
	err  error
}

func (e *relayError) Error() string { return e.err.Error() }
func (e *relayError) Unwrap() error { return e.err }

func newHalf(c *conn, src, dst *net.TCPConn, srcRaw, dstRaw syscall.RawConn, bytes *atomic.Int64, count func(int64)) *half {
	h := &half{src: src, dst: dst, srcRaw: srcRaw, dstRaw: dstRaw, c: c, bytes: bytes, count: count}
	h.readable = func(fd uintptr) bool {
		for {
			_, _, errno := unix.Syscall6(unix.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(&h.peek[0])), 1,
				unix.MSG_PEEK|unix.MSG_DONTWAIT, 0, 0)
			switch errno {
			case unix.EINTR:
				continue
			case unix.EAGAIN:
				return false // let the poller wait for readability
			}
			return true // data, EOF or an error: the burst's read reports which
		}
	}
	return h
}

// waitReadable blocks until src has data, EOF or an error, holding no buffer.
func (h *half) waitReadable() error {
	if err := h.srcRaw.Read(h.readable); err != nil {
		return &relayError{read: true, err: err}
	}
	return nil
}

func (h *half) moved(n int) {
	h.bytes.Add(int64(n))
	h.count(int64(n))
	h.c.touch()
}

// run relays until src reaches EOF (nil) or something fails.
func (h *half) run(mode RelayMode, pipes *pipePool) error {
	for {
		if err := h.waitReadable(); err != nil {
			return err
		}
		var eof bool
		var err error
		if mode == RelaySplice {
			eof, err = h.spliceBurst(pipes)
		} else {
			eof, err = h.copyBurst()
		}
		if err != nil || eof {
			return err
		}
	}
}

// copyBurst copies what src has through a pooled buffer.
func (h *half) copyBurst() (eof bool, err error) {
	bp := copyBufs.Get().(*[]byte)
	defer copyBufs.Put(bp)
	buf := *bp
	for {
		var n int
		var rerr error
		if err := h.srcRaw.Read(func(fd uintptr) bool {
			for {
				n, rerr = unix.Read(int(fd), buf)
				if rerr != unix.EINTR {
					return true
				}
			}
		}); err != nil {
			return false, &relayError{read: true, err: err}
		}
		switch {
		case rerr == unix.EAGAIN:
			return false, nil
		case rerr != nil:
			return false, &relayError{read: true, err: rerr}
		case n == 0:
			return true, nil
		}
		if _, err := h.dst.Write(buf[:n]); err != nil {
			return false, &relayError{err: err}
		}
		h.moved(n)
	}
}

// spliceBurst splices what src has into a pooled pipe and on into dst.
func (h *half) spliceBurst(pipes *pipePool) (eof bool, err error) {
	p, perr := pipes.get()
	if perr != nil {
		// Out of descriptors for a pipe: copy this burst instead.
		return h.copyBurst()
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
