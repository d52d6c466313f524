package collector

import (
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	rtmetrics "runtime/metrics"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/collector/pdata/ptrace"
	"go.opentelemetry.io/collector/pdata/ptrace/ptraceotlp"

	"github.com/nodeagent/nodeagent/collector/queue"
)

var (
	// errBackpressure: the queue is full or memory is over the soft limit; the client should retry.
	errBackpressure = errors.New("relay is over its limits")
	// errDraining: the relay is shutting down; the client should retry (another instance will take it).
	errDraining = errors.New("relay is shutting down")
	// errTooLarge: the request exceeds max_request_size.
	errTooLarge = errors.New("request exceeds the maximum size")
)

// retryAfter is what backpressure answers suggest to clients.
const retryAfter = time.Second

// errInvalid wraps a request that cannot be decoded.
var errInvalid = errors.New("decode request")

var scratchPool = sync.Pool{New: func() any { b := make([]byte, 0, 64<<10); return &b }}

// ingestProto queues an encoded ExportTraceServiceRequest, through the fast path when it can.
func (rn *runState) ingestProto(body []byte) (int, error) {
	live := rn.t.live()
	attrs := *rn.t.attrs.Load()
	if int64(len(body)) < live.Batch.MaxBytes-1024 {
		bp := scratchPool.Get().(*[]byte)
		defer func() {
			if cap(*bp) <= 4<<20 {
				scratchPool.Put(bp)
			}
		}()
		out, n, ok := fastRewrite((*bp)[:0], body, attrs)
		if ok {
			*bp = out[:0]
			if n == 0 {
				return 0, nil
			}
			if rn.t.mem.over() {
				return n, errBackpressure
			}
			return n, rn.appendRecord(n, out)
		}
	}
	req := ptraceotlp.NewExportRequest()
	if err := req.UnmarshalProto(body); err != nil {
		return 0, fmt.Errorf("%w: %w", errInvalid, err)
	}
	return rn.ingest(req.Traces())
}

// ingest enriches td and appends it to the queue. It returns nil for an empty request.
// td must not be used by the caller afterwards.
func (rn *runState) ingest(td ptrace.Traces) (int, error) {
	n := td.SpanCount()
	if n == 0 {
		return 0, nil
	}
	live := rn.t.live()
	if rn.t.mem.over() {
		return n, errBackpressure
	}
	enrich(td, live.ResourceAttributes)
	var m ptrace.ProtoMarshaler
	size := m.TracesSize(td)
	if int64(size) > live.Batch.MaxBytes && n > 1 {
		chunks := split(td, int(int64(size)/live.Batch.MaxBytes)+1)
		for i, c := range chunks {
			if err := rn.appendTraces(c, c.SpanCount()); err != nil {
				if i > 0 {
					// Earlier chunks are queued and will be exported; the client retries the whole
					// request, so those spans may arrive twice (at-least-once).
					rn.t.log.Warn("request partially queued before an error; its retry will duplicate spans", "chunks_queued", i, "error", err)
				}
				return n, err
			}
		}
		return n, nil
	}
	return n, rn.appendTraces(td, n)
}

func (rn *runState) appendTraces(td ptrace.Traces, n int) error {
	var m ptrace.ProtoMarshaler
	body, err := m.MarshalTraces(td)
	if err != nil {
		return fmt.Errorf("encode spans: %w", err)
	}
	return rn.appendRecord(n, body)
}

// appendRecord queues one record: the span count, then the encoded request.
func (rn *runState) appendRecord(n int, body []byte) error {
	var pre [binary.MaxVarintLen64]byte
	k := binary.PutUvarint(pre[:], uint64(n))
	err := rn.q.AppendV(pre[:k], body)
	switch {
	case err == nil:
		rn.t.m.queueBytes.Set(float64(rn.q.Size()))
		return nil
	case errors.Is(err, queue.ErrFull):
		return errBackpressure
	case errors.Is(err, queue.ErrClosed):
		return errDraining
	case errors.Is(err, queue.ErrTooLarge):
		return errTooLarge
	default:
		rn.t.log.Error("queueing spans", "error", err)
		return fmt.Errorf("queue spans: %w", err)
	}
}

// enrich adds attrs to every resource that lacks them; existing values are kept.
func enrich(td ptrace.Traces, attrs map[string]string) {
	if len(attrs) == 0 {
		return
	}
	keys := slices.Sorted(maps.Keys(attrs))
	rss := td.ResourceSpans()
	for i := 0; i < rss.Len(); i++ {
		ra := rss.At(i).Resource().Attributes()
		for _, k := range keys {
			if _, ok := ra.Get(k); !ok {
				ra.PutStr(k, attrs[k])
			}
		}
	}
}

// split cuts td into about `parts` pieces of similar span count, keeping each span under copies
// of its own resource and scope.
func split(td ptrace.Traces, parts int) []ptrace.Traces {
	per := (td.SpanCount() + parts - 1) / parts
	if per < 1 {
		per = 1
	}
	var out []ptrace.Traces
	cur := ptrace.NewTraces()
	count := 0
	rss := td.ResourceSpans()
	for i := 0; i < rss.Len(); i++ {
		rs := rss.At(i)
		var crs ptrace.ResourceSpans
		var haveRS bool
		sss := rs.ScopeSpans()
		for j := 0; j < sss.Len(); j++ {
			ss := sss.At(j)
			var css ptrace.ScopeSpans
			var haveSS bool
			spans := ss.Spans()
			for k := 0; k < spans.Len(); k++ {
				if count == per {
					out = append(out, cur)
					cur, count, haveRS, haveSS = ptrace.NewTraces(), 0, false, false
				}
				if !haveRS {
					crs = cur.ResourceSpans().AppendEmpty()
					rs.Resource().CopyTo(crs.Resource())
					crs.SetSchemaUrl(rs.SchemaUrl())
					haveRS = true
				}
				if !haveSS {
					css = crs.ScopeSpans().AppendEmpty()
					ss.Scope().CopyTo(css.Scope())
					css.SetSchemaUrl(ss.SchemaUrl())
					haveSS = true
				}
				spans.At(k).MoveTo(css.Spans().AppendEmpty())
				count++
			}
		}
	}
	if count > 0 {
		out = append(out, cur)
	}
	return out
}

// memGuard refuses work while the Go heap plus reserved request bodies exceed the soft limit.
type memGuard struct {
	soft     atomic.Int64
	inflight atomic.Int64
	heap     atomic.Int64

	mu      sync.Mutex
	sample  []rtmetrics.Sample
	sampled time.Time
}

func newMemGuard(soft int64) *memGuard {
	g := &memGuard{sample: []rtmetrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}}
	g.soft.Store(soft)
	return g
}

// refresh reads the heap size, at most every 20ms.
func (g *memGuard) refresh() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if time.Since(g.sampled) < 20*time.Millisecond {
		return
	}
	rtmetrics.Read(g.sample)
	if g.sample[0].Value.Kind() == rtmetrics.KindUint64 {
		g.heap.Store(int64(g.sample[0].Value.Uint64()))
	}
	g.sampled = time.Now()
}

// over reports whether the relay is over its soft limit now.
func (g *memGuard) over() bool {
	g.refresh()
	return g.heap.Load()+g.inflight.Load() > g.soft.Load()
}

// reserve accounts n bytes of a request being read; false (nothing reserved) when over the limit.
func (g *memGuard) reserve(n int64) bool {
	g.refresh()
	if g.heap.Load()+g.inflight.Add(n) > g.soft.Load() {
		g.inflight.Add(-n)
		return false
	}
	return true
}

func (g *memGuard) release(n int64) { g.inflight.Add(-n) }
