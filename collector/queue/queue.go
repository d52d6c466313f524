// Package queue is a durable FIFO of byte records kept in segment files in one directory.
//
// Layout of the directory:
//
//	00000000000000000001.seg   segment files, appended in order; a record is
//	                           [4 bytes little-endian payload length][4 bytes CRC-32C of payload][payload]
//	cursor                     where consumers are: [8 ack segment][8 ack offset][8 read segment][8 read offset][4 CRC-32C]
//	*.corrupt                  quarantined segments (renamed, never read again, left for the operator)
//
// Append returns once the record has been handed to the kernel with write(2): a process crash
// (kill -9) after Append returned loses nothing. Whether it also survives a power loss depends on
// the Fsync policy. Records are delivered by Next in append order and removed by Ack in any order;
// the persisted cursor only moves over the contiguous acknowledged prefix, so a crash redelivers at
// most the records that were in flight (at-least-once). Such redeliveries are counted.
//
// A segment whose record fails its checksum is renamed to *.corrupt and reading continues with the
// next segment; a torn record at the very end of a segment (a write the crash interrupted, never
// acknowledged to anyone) is ignored. Neither stops the queue.
package queue

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
)

// Fsync is the policy for flushing segment files to stable storage.
type Fsync string

const (
	// FsyncNever never calls fsync: data acknowledged survives a crash of the process but
	// not a power loss of the machine (the kernel flushes dirty pages within ~30 s).
	FsyncNever Fsync = "never"
	// FsyncSegment calls fsync when a segment is full and on Close: a power loss loses at most
	// the current segment's tail.
	FsyncSegment Fsync = "segment"
	// FsyncAlways calls fsync before every Append returns: nothing acknowledged is lost even on
	// power loss, at the price of one disk flush per request.
	FsyncAlways Fsync = "always"
)

// Valid reports whether f is a known policy ("" counts as FsyncSegment).
func (f Fsync) Valid() bool {
	switch f {
	case "", FsyncNever, FsyncSegment, FsyncAlways:
		return true
	}
	return false
}

const (
	headerSize = 8
	segSuffix  = ".seg"
	cursorName = "cursor"
	cursorSize = 36
	// DefaultSegmentSize is the size after which a segment is sealed and a new one started.
	DefaultSegmentSize = 16 << 20
)

var (
	// ErrFull is returned by Append when the record would take the queue over MaxBytes.
	ErrFull = errors.New("queue full")
	// ErrClosed is returned after Close.
	ErrClosed = errors.New("queue closed")
	// ErrTooLarge is returned by Append for a record larger than MaxBytes.
	ErrTooLarge = errors.New("record larger than the queue")

	castagnoli = crc32.MakeTable(crc32.Castagnoli)
)

// Options configure a Queue.
type Options struct {
	Dir         string // created if missing (mode 0700)
	MaxBytes    int64  // bound on the bytes of unacknowledged records, framing included
	SegmentSize int64  // default DefaultSegmentSize
	Fsync       Fsync  // default FsyncSegment
}

// Events are what Open and reading found that the owner should count and report.
type Events struct {
	// Corrupt is called with the quarantined file's path and the reason.
	Corrupt func(path string, err error)
	// Redelivered is called for each record delivered again after a restart because it had been
	// delivered before the crash but not acknowledged (it may already be upstream).
	Redelivered func(r Record)
}

// Pos is a position in the queue: a segment number and a byte offset in it.
type Pos struct {
	Seg uint64
	Off int64
}

func (p Pos) less(q Pos) bool { return p.Seg < q.Seg || (p.Seg == q.Seg && p.Off < q.Off) }

// Record is one delivered record. Data belongs to the caller.
type Record struct {
	Data []byte
	at   Pos   // start of its frame
	end  Pos   // just after its frame (same segment)
	size int64 // framed size
	p    *pend
}

// Queue is safe for concurrent use.
type Queue struct {
	opts Options
	ev   Events

	mu      sync.Mutex
	cond    *sync.Cond // signals appends and close to readers
	closed  bool
	segs    []uint64 // live segment numbers in order (includes the write segment)
	w       *os.File // current write segment
	wSeg    uint64
	wOff    int64
	size    int64 // bytes of unacknowledged records (framed)
	cursor  *os.File
	ack     Pos // everything before is acknowledged (persisted)
	read    Pos // next record to deliver
	redeliv Pos // records before this were delivered before a restart
	rf      *os.File
	rr      *bufio.Reader
	rSeg    uint64
	rOff    int64
	pending []*pend // delivered, in order, not yet past the ack cursor
	wbuf    []byte
}

type pend struct {
	end  Pos
	size int64
	done bool
}

// Open opens (creating if needed) the queue in opts.Dir, validates what is there and positions
// reading at the first unacknowledged record. Appends always go to a fresh segment.
func Open(opts Options, ev Events) (*Queue, error) {
	if opts.SegmentSize <= 0 {
		opts.SegmentSize = DefaultSegmentSize
	}
	if opts.Fsync == "" {
		opts.Fsync = FsyncSegment
	}
	if !opts.Fsync.Valid() {
		return nil, fmt.Errorf("unknown fsync policy %q", opts.Fsync)
	}
	if opts.MaxBytes <= 0 {
		return nil, fmt.Errorf("max bytes must be positive, got %d", opts.MaxBytes)
	}
	if ev.Corrupt == nil {
		ev.Corrupt = func(string, error) {}
	}
	if ev.Redelivered == nil {
		ev.Redelivered = func(Record) {}
	}
	if err := os.MkdirAll(opts.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("create queue directory: %w", err)
	}
	q := &Queue{opts: opts, ev: ev}
	q.cond = sync.NewCond(&q.mu)
	if err := q.load(); err != nil {
		q.closeFiles()
		return nil, err
	}
	return q, nil
}

func segName(n uint64) string { return fmt.Sprintf("%020d%s", n, segSuffix) }

func (q *Queue) path(n uint64) string { return filepath.Join(q.opts.Dir, segName(n)) }

func (q *Queue) load() error {
	ents, err := os.ReadDir(q.opts.Dir)
	if err != nil {
		return fmt.Errorf("read queue directory: %w", err)
	}
	for _, e := range ents {
		name := e.Name()
		if !strings.HasSuffix(name, segSuffix) || !e.Type().IsRegular() {
			continue
		}
		n, err := strconv.ParseUint(strings.TrimSuffix(name, segSuffix), 10, 64)
		if err != nil {
			continue
		}
		q.segs = append(q.segs, n)
	}
	sort.Slice(q.segs, func(i, j int) bool { return q.segs[i] < q.segs[j] })

	q.cursor, err = os.OpenFile(filepath.Join(q.opts.Dir, cursorName), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("open queue cursor: %w", err)
	}
	var buf [cursorSize]byte
	ack, read := Pos{}, Pos{}
	if n, _ := q.cursor.ReadAt(buf[:], 0); n == cursorSize &&
		crc32.Checksum(buf[:32], castagnoli) == binary.LittleEndian.Uint32(buf[32:]) {
		ack = Pos{binary.LittleEndian.Uint64(buf[0:]), int64(binary.LittleEndian.Uint64(buf[8:]))}
		read = Pos{binary.LittleEndian.Uint64(buf[16:]), int64(binary.LittleEndian.Uint64(buf[24:]))}
	} else if n > 0 {
		q.ev.Corrupt(q.cursor.Name(), errors.New("cursor unreadable; replaying every segment"))
	}
	// Drop segments wholly before the cursor (deletion after the cursor write may not have happened).
	live := q.segs[:0]
	for _, s := range q.segs {
		if s < ack.Seg {
			os.Remove(q.path(s))
			continue
		}
		live = append(live, s)
	}
	q.segs = live
	if len(q.segs) == 0 || q.segs[0] != ack.Seg {
		// The acknowledged segment is gone (fully consumed, or quarantined): start at the next one.
		ack.Off = 0
		if len(q.segs) > 0 {
			ack.Seg = q.segs[0]
		}
	}
	q.ack = ack
	q.read = ack
	q.redeliv = read
	if q.redeliv.less(ack) {
		q.redeliv = ack
	}
	// Account the bytes still queued.
	for _, s := range q.segs {
		fi, err := os.Stat(q.path(s))
		if err != nil {
			continue
		}
		q.size += fi.Size()
		if s == ack.Seg {
			q.size -= min(ack.Off, fi.Size())
		}
	}
	next := uint64(1)
	if len(q.segs) > 0 {
		next = q.segs[len(q.segs)-1] + 1
	}
	if next <= ack.Seg {
		next = ack.Seg + 1
	}
	if err := q.newSegment(next); err != nil {
		return err
	}
	if len(q.segs) == 1 { // only the fresh one
		q.ack = Pos{Seg: next}
		q.read = q.ack
		q.redeliv = q.ack
	}
	return q.writeCursor()
}

func (q *Queue) newSegment(n uint64) error {
	f, err := os.OpenFile(q.path(n), os.O_WRONLY|os.O_CREATE|os.O_TRUNC|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("create queue segment: %w", err)
	}
	if q.w != nil {
		if q.opts.Fsync != FsyncNever {
			if err := q.w.Sync(); err != nil {
				f.Close()
				return fmt.Errorf("sync queue segment: %w", err)
			}
		}
		q.w.Close()
	}
	if q.opts.Fsync != FsyncNever {
		syncDir(q.opts.Dir)
	}
	q.w, q.wSeg, q.wOff = f, n, 0
	q.segs = append(q.segs, n)
	return nil
}

func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync() // best effort: the segment file itself is synced
		d.Close()
	}
}

// Append writes one record. It returns ErrFull when the queue holds too much.
func (q *Queue) Append(data []byte) error {
	return q.AppendV(data)
}

// AppendV writes one record whose payload is the concatenation of parts.
func (q *Queue) AppendV(parts ...[]byte) error {
	var n int64
	for _, p := range parts {
		n += int64(len(p))
	}
	framed := n + headerSize
	if n > 0xffffffff || framed > q.opts.MaxBytes {
		return ErrTooLarge
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return ErrClosed
	}
	if q.size+framed > q.opts.MaxBytes {
		return ErrFull
	}
	if q.wOff > 0 && q.wOff+framed > q.opts.SegmentSize {
		if err := q.newSegment(q.wSeg + 1); err != nil {
			return err
		}
	}
	buf := q.wbuf[:0]
	buf = binary.LittleEndian.AppendUint32(buf, uint32(n))
	crc := uint32(0)
	for _, p := range parts {
		crc = crc32.Update(crc, castagnoli, p)
	}
	buf = binary.LittleEndian.AppendUint32(buf, crc)
	for _, p := range parts {
		buf = append(buf, p...)
	}
	if cap(buf) <= 1<<20 {
		q.wbuf = buf
	}
	if _, err := q.w.Write(buf); err != nil {
		// A short write leaves a torn tail; start a fresh segment so the next record is clean.
		_ = q.newSegment(q.wSeg + 1)
		return fmt.Errorf("write queue segment: %w", err)
	}
	if q.opts.Fsync == FsyncAlways {
		if err := q.w.Sync(); err != nil {
			return fmt.Errorf("sync queue segment: %w", err)
		}
	}
	q.wOff += framed
	q.size += framed
	q.cond.Broadcast()
	return nil
}

// Size returns the bytes held by unacknowledged records.
func (q *Queue) Size() int64 {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.size
}

// MaxBytes returns the bound.
func (q *Queue) MaxBytes() int64 { return q.opts.MaxBytes }

// Next returns the next undelivered record, waiting until one is appended. It returns
// ErrClosed once the queue is closed, and ctx.Err() when ctx ends first.
func (q *Queue) Next(ctx context.Context) (Record, error) {
	stop := context.AfterFunc(ctx, func() {
		q.mu.Lock()
		q.cond.Broadcast()
		q.mu.Unlock()
	})
	defer stop()
	q.mu.Lock()
	defer q.mu.Unlock()
	for {
		if q.closed {
			return Record{}, ErrClosed
		}
		if err := ctx.Err(); err != nil {
			return Record{}, err
		}
		rec, ok, err := q.readOne()
		if err != nil {
			return Record{}, err
		}
		if ok {
			return rec, nil
		}
		q.cond.Wait()
	}
}

// TryNext returns the next record if one is available without waiting.
func (q *Queue) TryNext() (Record, bool, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return Record{}, false, ErrClosed
	}
	return q.readOne()
}

// readOne reads the record at q.read if it is complete. Called with mu held.
func (q *Queue) readOne() (Record, bool, error) {
	for {
		if q.read.Seg == q.wSeg && q.read.Off >= q.wOff {
			return Record{}, false, nil
		}
		if q.rf == nil || q.rSeg != q.read.Seg || q.rOff != q.read.Off {
			if err := q.openReader(); err != nil {
				return Record{}, false, err
			}
			if q.rf == nil {
				continue // segment vanished or was skipped; read moved on
			}
		}
		var hdr [headerSize]byte
		_, err := io.ReadFull(q.rr, hdr[:])
		if err == nil {
			n := int64(binary.LittleEndian.Uint32(hdr[0:]))
			sum := binary.LittleEndian.Uint32(hdr[4:])
			limit := q.opts.MaxBytes
			if q.read.Seg == q.wSeg {
				limit = q.wOff - q.read.Off - headerSize
			}
			if n > limit {
				err = fmt.Errorf("record length %d at offset %d exceeds what can be there", n, q.read.Off)
				q.quarantine(q.read.Seg, err)
				continue
			}
			data := make([]byte, n)
			if _, err = io.ReadFull(q.rr, data); err == nil {
				if crc32.Checksum(data, castagnoli) != sum {
					q.quarantine(q.read.Seg, fmt.Errorf("checksum mismatch at offset %d", q.read.Off))
					continue
				}
				framed := n + headerSize
				rec := Record{Data: data, at: q.read, end: Pos{q.read.Seg, q.read.Off + framed}, size: framed}
				rec.p = &pend{end: rec.end, size: framed}
				q.read = rec.end
				q.rOff = q.read.Off
				q.pending = append(q.pending, rec.p)
				if rec.at.less(q.redeliv) {
					q.ev.Redelivered(rec)
				}
				// The delivered mark only serves to count redeliveries after a crash; a failed
				// write of it costs accuracy of that count, not data.
				_ = q.writeCursor()
				return rec, true, nil
			}
		}
		if q.read.Seg == q.wSeg {
			// The writer said this much was written; a short read here is an I/O problem.
			return Record{}, false, fmt.Errorf("read queue segment %d: %w", q.read.Seg, err)
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			// End of a sealed segment, possibly with a torn final record that nobody acknowledged.
			q.advanceSegment()
			continue
		}
		return Record{}, false, fmt.Errorf("read queue segment %d: %w", q.read.Seg, err)
	}
}

// openReader opens the segment at q.read, skipping missing ones. Called with mu held.
func (q *Queue) openReader() error {
	if q.rf != nil {
		q.rf.Close()
		q.rf = nil
	}
	f, err := os.Open(q.path(q.read.Seg))
	if errors.Is(err, fs.ErrNotExist) {
		q.advanceSegment()
		return nil
	}
	if err != nil {
		return fmt.Errorf("open queue segment: %w", err)
	}
	if _, err := f.Seek(q.read.Off, io.SeekStart); err != nil {
		f.Close()
		return fmt.Errorf("seek queue segment: %w", err)
	}
	q.rf, q.rSeg, q.rOff = f, q.read.Seg, q.read.Off
	if q.rr == nil {
		q.rr = bufio.NewReaderSize(f, 256<<10)
	} else {
		q.rr.Reset(f)
	}
	return nil
}

// advanceSegment moves reading to the segment after q.read.Seg. Called with mu held.
func (q *Queue) advanceSegment() {
	cur := q.read.Seg
	next := q.wSeg
	for _, s := range q.segs {
		if s > cur {
			next = s
			break
		}
	}
	if q.rf != nil {
		q.rf.Close()
		q.rf = nil
	}
	// Whatever was left unread in cur no longer counts as queued.
	q.forgetRest(cur)
	q.read = Pos{Seg: next}
	// A sealed segment read to its end is done once its records are acknowledged; mark the
	// boundary as a pending entry so the ack cursor can move past it.
	q.pending = append(q.pending, &pend{end: q.read, done: true})
	q.advanceAck()
}

// forgetRest removes from size the bytes of segment s after the read position. Called with mu held.
func (q *Queue) forgetRest(s uint64) {
	fi, err := os.Stat(q.path(s))
	if err != nil {
		return
	}
	if rest := fi.Size() - q.read.Off; rest > 0 && q.read.Seg == s {
		q.size -= rest
	}
}

// quarantine renames segment s out of the way and moves reading to the next one. Called with mu held.
func (q *Queue) quarantine(s uint64, cause error) {
	if q.rf != nil {
		q.rf.Close()
		q.rf = nil
	}
	q.forgetRest(s)
	from := q.path(s)
	to := from + ".corrupt"
	if err := os.Rename(from, to); err != nil {
		to = from
	}
	q.ev.Corrupt(to, cause)
	q.read.Off = 1 << 62 // nothing more to forget in s
	q.advanceSegment()
}

// Ack removes a delivered record. Acks may come in any order.
func (q *Queue) Ack(r Record) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if r.p == nil || r.p.done {
		return // not from this queue, or acknowledged already
	}
	r.p.done = true
	q.size -= r.size
	q.advanceAck()
	q.cond.Broadcast()
}

// advanceAck moves the ack cursor over the done prefix, deleting finished segments. Called with mu held.
func (q *Queue) advanceAck() {
	i := 0
	moved := false
	for i < len(q.pending) && q.pending[i].done {
		q.ack = q.pending[i].end
		moved = true
		i++
	}
	if !moved {
		return
	}
	clear(q.pending[:i])
	q.pending = q.pending[i:]
	// On failure the cursor stays behind: a restart redelivers more (at-least-once), loses nothing.
	_ = q.writeCursor()
	// Delete sealed segments wholly before the cursor.
	keep := q.segs[:0]
	for _, s := range q.segs {
		if s < q.ack.Seg && s != q.wSeg {
			os.Remove(q.path(s))
			continue
		}
		keep = append(keep, s)
	}
	q.segs = keep
}

func (q *Queue) writeCursor() error {
	if q.cursor == nil {
		return nil
	}
	var buf [cursorSize]byte
	binary.LittleEndian.PutUint64(buf[0:], q.ack.Seg)
	binary.LittleEndian.PutUint64(buf[8:], uint64(q.ack.Off))
	binary.LittleEndian.PutUint64(buf[16:], q.read.Seg)
	binary.LittleEndian.PutUint64(buf[24:], uint64(q.read.Off))
	binary.LittleEndian.PutUint32(buf[32:], crc32.Checksum(buf[:32], castagnoli))
	if _, err := q.cursor.WriteAt(buf[:], 0); err != nil {
		return fmt.Errorf("write queue cursor: %w", err)
	}
	return nil
}

// Close persists the cursor, syncs per policy and releases the files. Unacknowledged records
// stay for the next Open. Next callers get ErrClosed.
func (q *Queue) Close() error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return nil
	}
	q.closed = true
	q.cond.Broadcast()
	err := q.writeCursor()
	if q.opts.Fsync != FsyncNever {
		if q.w != nil {
			if e := q.w.Sync(); e != nil && err == nil {
				err = fmt.Errorf("sync queue segment: %w", e)
			}
		}
		if q.cursor != nil {
			if e := q.cursor.Sync(); e != nil && err == nil {
				err = fmt.Errorf("sync queue cursor: %w", e)
			}
		}
	}
	q.closeFiles()
	return err
}

func (q *Queue) closeFiles() {
	for _, f := range []*os.File{q.w, q.rf, q.cursor} {
		if f != nil {
			f.Close()
		}
	}
	q.w, q.rf, q.cursor = nil, nil, nil
}
