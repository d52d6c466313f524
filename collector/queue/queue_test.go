package queue

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func open(t *testing.T, dir string, o Options, ev Events) *Queue {
	t.Helper()
	o.Dir = dir
	if o.MaxBytes == 0 {
		o.MaxBytes = 1 << 20
	}
	q, err := Open(o, ev)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { q.Close() })
	return q
}

func next(t *testing.T, q *Queue) Record {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	r, err := q.Next(ctx)
	if err != nil {
		t.Fatalf("Next: %v", err)
	}
	return r
}

func drain(t *testing.T, q *Queue) []string {
	t.Helper()
	var got []string
	for {
		r, ok, err := q.TryNext()
		if err != nil {
			t.Fatalf("TryNext: %v", err)
		}
		if !ok {
			return got
		}
		got = append(got, string(r.Data))
		q.Ack(r)
	}
}

func TestAppendNextAckOrder(t *testing.T) {
	q := open(t, t.TempDir(), Options{SegmentSize: 64}, Events{})
	var want []string
	for i := 0; i < 20; i++ {
		s := fmt.Sprintf("record-%02d", i)
		want = append(want, s)
		if err := q.Append([]byte(s)); err != nil {
			t.Fatalf("Append: %v", err)
		}
	}
	got := drain(t, q)
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("got %v; want %v", got, want)
	}
	if q.Size() != 0 {
		t.Fatalf("got size %d after acking everything; want 0", q.Size())
	}
	segs, _ := filepath.Glob(filepath.Join(q.opts.Dir, "*.seg"))
	if len(segs) != 1 {
		t.Fatalf("got %d segment files after acking everything; want only the write segment: %v", len(segs), segs)
	}
}

func TestReopenReplaysUnacked(t *testing.T) {
	dir := t.TempDir()
	var redelivered int
	ev := Events{Redelivered: func(Record) { redelivered++ }}
	q := open(t, dir, Options{SegmentSize: 100}, ev)
	for i := 0; i < 10; i++ {
		q.Append([]byte(fmt.Sprintf("r%d", i)))
	}
	// Deliver 6, ack 0,1,2 and 4 (out of order), leave 3 and 5 in flight.
	var recs []Record
	for i := 0; i < 6; i++ {
		recs = append(recs, next(t, q))
	}
	for _, i := range []int{4, 0, 2, 1} {
		q.Ack(recs[i])
	}
	q.Close()

	q2 := open(t, dir, Options{SegmentSize: 100}, ev)
	got := drain(t, q2)
	// r4 is redelivered too: the cursor only moves over the contiguous acknowledged prefix.
	want := "r3,r4,r5,r6,r7,r8,r9"
	if strings.Join(got, ",") != want {
		t.Fatalf("got %v after reopen; want %s", got, want)
	}
	if redelivered != 3 {
		t.Fatalf("got %d redelivered records; want 3 (r3, r4, r5 were delivered before the restart)", redelivered)
	}
}

func TestFullAndTooLarge(t *testing.T) {
	q := open(t, t.TempDir(), Options{MaxBytes: 100}, Events{})
	if err := q.Append(make([]byte, 200)); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("got %v for a record over MaxBytes; want ErrTooLarge", err)
	}
	for i := 0; i < 3; i++ {
		if err := q.Append(make([]byte, 22)); err != nil {
			t.Fatalf("Append %d: %v", i, err)
		}
	}
	if err := q.Append(make([]byte, 22)); !errors.Is(err, ErrFull) {
		t.Fatalf("got %v with 90/100 bytes used; want ErrFull", err)
	}
	q.Ack(next(t, q))
	if err := q.Append(make([]byte, 22)); err != nil {
		t.Fatalf("got %v after an ack freed room; want nil", err)
	}
}

func TestCorruptSegmentQuarantined(t *testing.T) {
	dir := t.TempDir()
	q := open(t, dir, Options{SegmentSize: 40}, Events{})
	for i := 0; i < 6; i++ {
		q.Append([]byte(fmt.Sprintf("record-%d", i))) // 8+8 = 16 bytes framed: 2 per segment... then rotate
	}
	q.Close()
	segs, _ := filepath.Glob(filepath.Join(dir, "*.seg"))
	if len(segs) < 3 {
		t.Fatalf("got %d segments; want at least 3", len(segs))
	}
	// Flip a payload byte in the second segment's first record.
	b, _ := os.ReadFile(segs[1])
	b[headerSize] ^= 0xff
	os.WriteFile(segs[1], b, 0o600)

	var corrupt []string
	q2 := open(t, dir, Options{SegmentSize: 40}, Events{Corrupt: func(p string, err error) { corrupt = append(corrupt, p) }})
	got := drain(t, q2)
	if strings.Join(got, ",") != "record-0,record-1,record-4,record-5" {
		t.Fatalf("got %v; want the records of the intact segments", got)
	}
	if len(corrupt) != 1 || corrupt[0] != segs[1]+".corrupt" {
		t.Fatalf("got quarantined %v; want [%s.corrupt]", corrupt, segs[1])
	}
	if _, err := os.Stat(segs[1] + ".corrupt"); err != nil {
		t.Fatalf("quarantined file: %v", err)
	}
	if q2.Size() != 0 {
		t.Fatalf("got size %d; want 0", q2.Size())
	}
	// A third open finds nothing more and reports nothing.
	q2.Close()
	corrupt = nil
	q3 := open(t, dir, Options{SegmentSize: 40}, Events{Corrupt: func(p string, err error) { corrupt = append(corrupt, p) }})
	if got := drain(t, q3); len(got) != 0 || len(corrupt) != 0 {
		t.Fatalf("got records %v and corrupt %v on the third open; want none", got, corrupt)
	}
}

func TestTornTailIgnored(t *testing.T) {
	dir := t.TempDir()
	q := open(t, dir, Options{}, Events{})
	q.Append([]byte("complete"))
	q.Close()
	segs, _ := filepath.Glob(filepath.Join(dir, "*.seg"))
	f, _ := os.OpenFile(segs[len(segs)-1], os.O_WRONLY|os.O_APPEND, 0)
	f.Write([]byte{100, 0, 0, 0, 1, 2, 3, 4, 'x'}) // a header promising 100 bytes, then 1
	f.Close()
	var corrupt int
	q2 := open(t, dir, Options{}, Events{Corrupt: func(string, error) { corrupt++ }})
	if got := drain(t, q2); strings.Join(got, ",") != "complete" {
		t.Fatalf("got %v; want [complete]", got)
	}
	if corrupt != 0 {
		t.Fatalf("got %d corrupt reports for a torn tail; want 0", corrupt)
	}
	if q2.Size() != 0 {
		t.Fatalf("got size %d; want 0", q2.Size())
	}
}

func TestCorruptCursorReplaysAll(t *testing.T) {
	dir := t.TempDir()
	q := open(t, dir, Options{}, Events{})
	q.Append([]byte("a"))
	q.Append([]byte("b"))
	q.Ack(next(t, q))
	q.Close()
	os.WriteFile(filepath.Join(dir, cursorName), []byte("garbage-garbage-garbage-garbage-garb"), 0o600)
	var corrupt int
	q2 := open(t, dir, Options{}, Events{Corrupt: func(string, error) { corrupt++ }})
	if got := drain(t, q2); strings.Join(got, ",") != "a,b" {
		t.Fatalf("got %v; want [a b] (everything replayed)", got)
	}
	if corrupt != 1 {
		t.Fatalf("got %d corrupt reports; want 1", corrupt)
	}
}

func TestNextWaitsAndCloseWakes(t *testing.T) {
	q := open(t, t.TempDir(), Options{}, Events{})
	got := make(chan string)
	go func() {
		r, err := q.Next(context.Background())
		if err != nil {
			got <- err.Error()
			return
		}
		got <- string(r.Data)
	}()
	time.Sleep(20 * time.Millisecond)
	q.Append([]byte("late"))
	if s := <-got; s != "late" {
		t.Fatalf("got %q; want late", s)
	}
	go func() {
		_, err := q.Next(context.Background())
		got <- fmt.Sprint(err)
	}()
	time.Sleep(20 * time.Millisecond)
	q.Close()
	if s := <-got; s != ErrClosed.Error() {
		t.Fatalf("got %q after Close; want %q", s, ErrClosed)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	q2 := open(t, t.TempDir(), Options{}, Events{})
	if _, err := q2.Next(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v; want DeadlineExceeded", err)
	}
}

func TestFsyncPolicies(t *testing.T) {
	for _, f := range []Fsync{FsyncNever, FsyncSegment, FsyncAlways} {
		t.Run(string(f), func(t *testing.T) {
			dir := t.TempDir()
			q := open(t, dir, Options{Fsync: f, SegmentSize: 32}, Events{})
			for i := 0; i < 5; i++ {
				if err := q.Append([]byte(fmt.Sprintf("x%d", i))); err != nil {
					t.Fatal(err)
				}
			}
			q.Close()
			q2 := open(t, dir, Options{Fsync: f}, Events{})
			if got := drain(t, q2); len(got) != 5 {
				t.Fatalf("got %d records; want 5", len(got))
			}
		})
	}
	if _, err := Open(Options{Dir: t.TempDir(), MaxBytes: 10, Fsync: "sometimes"}, Events{}); err == nil {
		t.Fatal("got nil error for an unknown fsync policy")
	}
}

func TestAckTwiceCountsOnce(t *testing.T) {
	q := open(t, t.TempDir(), Options{}, Events{})
	q.Append([]byte("a"))
	q.Append([]byte("b"))
	r := next(t, q)
	q.Ack(r)
	q.Ack(r)
	if got, want := q.Size(), int64(headerSize+1); got != want {
		t.Fatalf("got size %d after acking one record twice; want %d", got, want)
	}
}

func BenchmarkAppendNextAck(b *testing.B) {
	q, err := Open(Options{Dir: b.TempDir(), MaxBytes: 1 << 30, Fsync: FsyncNever}, Events{})
	if err != nil {
		b.Fatal(err)
	}
	defer q.Close()
	payload := make([]byte, 4096)
	b.SetBytes(int64(len(payload)))
	var held []Record
	for b.Loop() {
		if err := q.Append(payload); err != nil {
			b.Fatal(err)
		}
		r, ok, err := q.TryNext()
		if err != nil || !ok {
			b.Fatal(ok, err)
		}
		held = append(held, r)
		if len(held) == 1000 { // acks in reverse order, as concurrent senders may
			for i := len(held) - 1; i >= 0; i-- {
				q.Ack(held[i])
			}
			held = held[:0]
		}
	}
}
