package collector

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"reflect"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nodeagent/nodeagent/agent/reuseport"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"

	"github.com/nodeagent/nodeagent/agent/health"
	"github.com/nodeagent/nodeagent/collector/queue"
)

// Relay is the OTLP trace relay.
type Relay struct {
	log   *slog.Logger
	rep   health.Reporter
	m     *metrics
	mem   *memGuard
	opts  atomic.Pointer[Options]
	attrs atomic.Pointer[[]attrKV] // ResourceAttributes, encoded for the fast path

	mu      sync.Mutex
	running bool
	addrs   map[string]net.Addr // bound listeners of the current Run, by name
}

// New builds a relay. It does no I/O.
func New(opts Options, log *slog.Logger, reg prometheus.Registerer, rep health.Reporter) (*Relay, error) {
	opts = opts.withDefaults()
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	m, err := newMetrics(reg)
	if err != nil {
		return nil, fmt.Errorf("register otlp metrics: %w", err)
	}
	if rep == nil {
		rep = health.Discard
	}
	t := &Relay{log: log, rep: rep, m: m, mem: newMemGuard(opts.softLimit())}
	t.store(opts)
	return t, nil
}

func (t *Relay) live() *Options { return t.opts.Load() }

func (t *Relay) store(opts Options) {
	attrs := encodeAttrs(opts.ResourceAttributes)
	t.attrs.Store(&attrs)
	t.opts.Store(&opts)
}

// Update applies new options. Resource attributes, batching, retry intervals, the memory limit
// and the exporter timeout apply live; anything else (listeners, exporter
// endpoint, protocol and TLS, queue) is stored and returns health.ErrNeedsRestart.
func (t *Relay) Update(opts Options) error {
	opts = opts.withDefaults()
	if err := opts.Validate(); err != nil {
		return err
	}
	old := t.live()
	t.store(opts)
	t.mem.soft.Store(opts.softLimit())
	if opts.SetProcessMemoryLimit && os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(opts.MemoryLimit)
	}
	a, b := *old, opts
	for _, o := range []*Options{&a, &b} {
		o.ResourceAttributes, o.Batch, o.Retry, o.MemoryLimit = nil, Batch{}, Retry{}, 0
		o.Exporter.Timeout, o.Exporter.TLSConfig = 0, nil
		o.ShutdownGrace, o.SetProcessMemoryLimit = 0, false
	}
	tlsChanged := (old.Exporter.TLSConfig == nil) != (opts.Exporter.TLSConfig == nil)
	if !reflect.DeepEqual(a, b) || tlsChanged {
		return health.ErrNeedsRestart
	}
	return nil
}

// Addr returns the address a listener of the running relay is bound to ("otlp-grpc", "otlp-http"), or nil.
func (t *Relay) Addr(name string) net.Addr {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.addrs[name]
}

// runState is what one Run owns.
type runState struct {
	t           *Relay
	q           *queue.Queue
	snd         sender
	up          atomic.Int32 // 1 up, 0 down, -1 unknown
	lastEx      atomic.Int64 // unix nanos of the last export attempt
	corrupt     atomic.Int64
	lastCorrupt atomic.Value // string
}

// Run serves until ctx is cancelled, then drains for up to ShutdownGrace.
func (t *Relay) Run(ctx context.Context) error {
	t.mu.Lock()
	if t.running {
		t.mu.Unlock()
		return errors.New("otlp relay already running")
	}
	t.running = true
	t.addrs = map[string]net.Addr{}
	t.mu.Unlock()
	defer func() {
		t.mu.Lock()
		t.running = false
		t.addrs = nil
		t.mu.Unlock()
	}()

	opts := *t.live()
	if opts.SetProcessMemoryLimit && os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(opts.MemoryLimit)
	}
	rn := &runState{t: t}
	rn.up.Store(-1)
	fail := func(err error) error {
		t.rep.Report(health.Result{Name: health.OTLP, OK: false, Detail: err.Error()})
		return err
	}

	q, err := queue.Open(queue.Options{Dir: opts.Queue.Dir, MaxBytes: opts.Queue.MaxBytes, Fsync: opts.Queue.Fsync}, queue.Events{
		Corrupt: func(path string, err error) {
			t.m.corrupt.Inc()
			rn.corrupt.Add(1)
			rn.lastCorrupt.Store(path)
			t.log.Error("quarantined corrupt queue segment; its unread spans are lost", "path", path, "error", err)
		},
		Redelivered: func(r queue.Record) {
			n, _ := binary.Uvarint(r.Data)
			t.m.redelivered.Add(float64(n))
		},
	})
	if err != nil {
		return fail(fmt.Errorf("open otlp queue %s: %w", opts.Queue.Dir, err))
	}
	rn.q = q
	defer q.Close()
	t.m.queueBytes.Set(float64(q.Size()))

	snd, err := newSender(opts.Exporter)
	if err != nil {
		return fail(err)
	}
	rn.snd = snd
	defer snd.close()

	// Listeners.
	var owned []net.Listener
	defer func() {
		for _, l := range owned {
			l.Close()
		}
	}()
	listen := func(name string, ap interface{ String() string }, valid bool) (net.Listener, error) {
		if l, ok := opts.Listeners[name]; ok && l != nil {
			// Serve on a duplicate so stopping closes ours and the caller's stays open for the next Run.
			fl, ok := l.(interface{ File() (*os.File, error) })
			if !ok {
				return l, nil
			}
			f, err := fl.File()
			if err != nil {
				return nil, fmt.Errorf("duplicate %s listener: %w", name, err)
			}
			defer f.Close()
			dl, err := net.FileListener(f)
			if err != nil {
				return nil, fmt.Errorf("duplicate %s listener: %w", name, err)
			}
			owned = append(owned, dl)
			return dl, nil
		}
		if !valid {
			return nil, nil
		}
		// SO_REUSEPORT: a new agent binds beside the old one during a rolling update.
		l, err := reuseport.Listen(context.Background(), ap.String())
		if err != nil {
			return nil, fmt.Errorf("listen %s on %s: %w", name, ap, err)
		}
		owned = append(owned, l)
		return l, nil
	}
	gl, err := listen(ListenerNameGRPC, opts.GRPCListen, opts.GRPCListen.IsValid())
	if err != nil {
		return fail(err)
	}
	hl, err := listen(ListenerNameHTTP, opts.HTTPListen, opts.HTTPListen.IsValid())
	if err != nil {
		return fail(err)
	}
	t.mu.Lock()
	if gl != nil {
		t.addrs[ListenerNameGRPC] = gl.Addr()
	}
	if hl != nil {
		t.addrs[ListenerNameHTTP] = hl.Addr()
	}
	t.mu.Unlock()

	// Export side: batcher and senders run until the drain ends.
	batchCtx, stopBatch := context.WithCancel(context.Background())
	defer stopBatch()
	exportCtx, stopExport := context.WithCancel(context.Background())
	defer stopExport()
	batches := make(chan *batch)
	var exp sync.WaitGroup
	exp.Add(1)
	go func() { defer exp.Done(); rn.batcher(batchCtx, exportCtx, batches) }()
	for i := 0; i < opts.Queue.Consumers; i++ {
		exp.Add(1)
		go func() { defer exp.Done(); rn.consume(exportCtx, batches) }()
	}

	// Receivers.
	serveErr := make(chan error, 2)
	var gs *grpc.Server
	var hs *http.Server
	if gl != nil {
		gs = rn.newGRPCServer(opts.MaxRequestSize)
		go func() {
			if err := gs.Serve(gl); err != nil {
				serveErr <- fmt.Errorf("serve otlp grpc: %w", err)
			}
		}()
	}
	if hl != nil {
		hs = &http.Server{Handler: rn.httpHandler(), ReadHeaderTimeout: 10 * time.Second, MaxHeaderBytes: 64 << 10,
			ReadTimeout: 2 * time.Minute, IdleTimeout: 2 * time.Minute,
			ErrorLog: slog.NewLogLogger(t.log.Handler(), slog.LevelDebug)}
		go func() {
			if err := hs.Serve(hl); err != nil && !errors.Is(err, http.ErrServerClosed) {
				serveErr <- fmt.Errorf("serve otlp http: %w", err)
			}
		}()
	}
	t.log.Info("otlp relay running", "grpc", addrString(gl), "http", addrString(hl),
		"exporter", opts.Exporter.Protocol, "endpoint", opts.Exporter.Endpoint+opts.Exporter.Path,
		"queue_dir", opts.Queue.Dir, "queued_bytes", q.Size())

	healthCtx, stopHealth := context.WithCancel(context.Background())
	var hw sync.WaitGroup
	hw.Add(1)
	go func() { defer hw.Done(); rn.watchHealth(healthCtx, gl, hl) }()

	var runErr error
	select {
	case <-ctx.Done():
	case runErr = <-serveErr:
	}

	// Drain: stop accepting (in-flight requests finish and are acknowledged), then export what is
	// queued until the grace period ends; the rest stays on disk.
	grace := time.Now().Add(opts.ShutdownGrace)
	t.log.Info("otlp relay draining", "grace", opts.ShutdownGrace, "queued_bytes", q.Size())
	shutCtx, cancelShut := context.WithDeadline(context.Background(), grace)
	var sw sync.WaitGroup
	if gs != nil {
		sw.Add(1)
		go func() {
			defer sw.Done()
			done := make(chan struct{})
			go func() { gs.GracefulStop(); close(done) }()
			select {
			case <-done:
			case <-shutCtx.Done():
				gs.Stop()
			}
		}()
	}
	if hs != nil {
		sw.Add(1)
		go func() {
			defer sw.Done()
			if hs.Shutdown(shutCtx) != nil {
				hs.Close()
			}
		}()
	}
	sw.Wait()
	stopBatch()
	expDone := make(chan struct{})
	go func() { exp.Wait(); close(expDone) }()
	select {
	case <-expDone:
	case <-shutCtx.Done():
		stopExport()
		<-expDone
	}
	cancelShut()
	stopHealth()
	hw.Wait()
	left := q.Size()
	t.m.queueBytes.Set(float64(left))
	if err := q.Close(); err != nil {
		t.log.Error("closing otlp queue", "error", err)
	}
	t.log.Info("otlp relay stopped", "queued_bytes_left", left)
	if runErr != nil {
		t.rep.Report(health.Result{Name: health.OTLP, OK: false, Detail: runErr.Error()})
	}
	return runErr
}

func addrString(l net.Listener) string {
	if l == nil {
		return "off"
	}
	return l.Addr().String()
}

// ---- batching and export ----

// batch is queue records to export together: its encoding is the concatenation of parts.
type batch struct {
	recs  []queue.Record
	parts [][]byte
	size  int
	spans int
}

// batcher gathers queue records into batches and hands them to the senders. When ctx ends it
// keeps reading what is in the queue for the senders to flush, until the queue is empty or
// exportCtx ends (the grace period is over), then closes out.
func (rn *runState) batcher(ctx, exportCtx context.Context, out chan<- *batch) {
	defer close(out)
	var cur *batch
	var deadline time.Time
	flush := func() {
		if cur != nil {
			select {
			case out <- cur:
			case <-exportCtx.Done(): // not exported: it stays in the queue
			}
			cur = nil
		}
	}
	add := func(r queue.Record) {
		live := rn.t.live()
		n, k := binary.Uvarint(r.Data)
		if k <= 0 {
			// A record the relay did not write; it cannot be exported.
			rn.t.log.Error("dropping undecodable queue record", "bytes", len(r.Data))
			rn.q.Ack(r)
			return
		}
		payload := r.Data[k:]
		if cur != nil && (cur.spans+int(n) > live.Batch.MaxSpans || int64(cur.size+len(payload)) > live.Batch.MaxBytes) {
			flush()
		}
		if cur == nil {
			cur = &batch{}
			deadline = time.Now().Add(live.Batch.Timeout)
		}
		cur.parts = append(cur.parts, payload)
		cur.size += len(payload)
		cur.spans += int(n)
		r.Data = nil
		cur.recs = append(cur.recs, r)
		if cur.spans >= live.Batch.MaxSpans {
			flush()
		}
	}
	for {
		var r queue.Record
		var err error
		if cur == nil {
			r, err = rn.q.Next(ctx)
		} else {
			wctx, cancel := context.WithDeadline(ctx, deadline)
			r, err = rn.q.Next(wctx)
			cancel()
			if errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil {
				flush()
				continue
			}
		}
		if err == nil {
			add(r)
			continue
		}
		if ctx.Err() == nil && !errors.Is(err, queue.ErrClosed) {
			rn.t.log.Error("reading otlp queue", "error", err)
			time.Sleep(time.Second)
			continue
		}
		// Draining: take what is there now.
		for exportCtx.Err() == nil {
			r, ok, err := rn.q.TryNext()
			if err != nil || !ok {
				break
			}
			add(r)
		}
		flush()
		return
	}
}

// consume exports batches with retries; a batch is acknowledged in the queue only once the
// upstream took it or rejected it permanently. When ctx ends mid-retry the batch stays queued.
func (rn *runState) consume(ctx context.Context, in <-chan *batch) {
	for b := range in {
		if ctx.Err() != nil {
			continue // leave it queued; keep draining the channel so the batcher can finish
		}
		if rn.export(ctx, b) {
			for _, r := range b.recs {
				rn.q.Ack(r)
			}
			rn.t.m.queueBytes.Set(float64(rn.q.Size()))
		}
	}
}

func (rn *runState) export(ctx context.Context, b *batch) bool {
	m := rn.t.m
	for attempt := 0; ; attempt++ {
		live := rn.t.live()
		actx, cancel := context.WithTimeout(ctx, live.Exporter.Timeout)
		start := time.Now()
		rejected, msg, err := rn.snd.send(actx, b.parts)
		cancel()
		m.exportDur.Observe(time.Since(start).Seconds())
		rn.lastEx.Store(time.Now().UnixNano())
		if err == nil {
			rn.setUp(true)
			rejected = min(max(rejected, 0), int64(b.spans))
			m.exported.Add(float64(int64(b.spans) - rejected))
			if rejected > 0 {
				m.rejected.Add(float64(rejected))
				rn.t.log.Warn("upstream rejected part of a batch; not retrying it", "rejected_spans", rejected, "spans", b.spans, "reason", msg)
			}
			return true
		}
		var re *retryable
		if !errors.As(err, &re) {
			rn.setUp(true)
			m.rejected.Add(float64(b.spans))
			rn.t.log.Error("upstream rejected a batch permanently; dropping it", "spans", b.spans, "error", err)
			return true
		}
		if ctx.Err() != nil {
			return false
		}
		rn.setUp(false)
		m.retried.Add(float64(b.spans))
		wait := backoff(live.Retry, attempt)
		if re.after > 0 {
			wait = min(re.after, live.Retry.MaxInterval*4)
		}
		if attempt == 0 || attempt%10 == 0 {
			rn.t.log.Warn("export failed; retrying", "spans", b.spans, "attempt", attempt+1, "wait", wait, "error", err)
		}
		select {
		case <-ctx.Done():
			return false
		case <-time.After(wait):
		}
	}
}

// backoff is initial·2^attempt capped at max, with ±50% jitter.
func backoff(r Retry, attempt int) time.Duration {
	d := r.InitialInterval
	for i := 0; i < attempt && d < r.MaxInterval; i++ {
		d *= 2
	}
	d = min(d, r.MaxInterval)
	return d/2 + rand.N(d)
}

func (rn *runState) setUp(up bool) {
	v := int32(0)
	if up {
		v = 1
	}
	if rn.up.Swap(v) != v {
		rn.t.m.upstreamUp.Set(float64(v))
		if up {
			rn.t.log.Info("otlp upstream reachable")
		} else {
			rn.t.log.Warn("otlp upstream unreachable")
		}
	}
}

// ---- health ----

func (rn *runState) watchHealth(ctx context.Context, gl, hl net.Listener) {
	var last health.Result
	first := true
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		idle := time.Since(time.Unix(0, rn.lastEx.Load()))
		if rn.up.Load() == -1 || idle > 15*time.Second {
			err := rn.snd.probe(ctx)
			if ctx.Err() != nil {
				return
			}
			if rn.up.Load() == -1 || idle > 15*time.Second {
				rn.setUp(err == nil)
				rn.lastEx.Store(time.Now().Add(-5 * time.Second).UnixNano()) // probe again in ~10s
			}
		}
		res := rn.healthResult(gl, hl)
		if first || res != last {
			rn.t.rep.Report(res)
			last, first = res, false
		}
		rn.t.m.queueBytes.Set(float64(rn.q.Size()))
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

func (rn *runState) healthResult(gl, hl net.Listener) health.Result {
	var parts []string
	ok := true
	if gl == nil && hl == nil {
		ok = false
		parts = append(parts, "no listener")
	} else {
		parts = append(parts, "grpc "+addrString(gl)+", http "+addrString(hl))
	}
	if rn.up.Load() == 1 {
		parts = append(parts, "upstream up")
	} else {
		ok = false
		parts = append(parts, "upstream unreachable")
	}
	size, maxB := rn.q.Size(), rn.q.MaxBytes()
	pct := size * 100 / maxB
	if size*10 >= maxB*queueHighWaterNumerator {
		ok = false
		parts = append(parts, fmt.Sprintf("queue above high-water mark (%d%% of %s)", pct, mib(maxB)))
	} else {
		parts = append(parts, fmt.Sprintf("queue %d%% of %s", pct, mib(maxB)))
	}
	if n := rn.corrupt.Load(); n > 0 {
		p, _ := rn.lastCorrupt.Load().(string)
		parts = append(parts, fmt.Sprintf("%d corrupt segment(s) quarantined, last %s", n, p))
	}
	return health.Result{Name: health.OTLP, OK: ok, Detail: strings.Join(parts, "; ")}
}

func mib(n int64) string { return fmt.Sprintf("%dMiB", n>>20) }
