// Program otlp benchmarks nodeagent's OTLP relay (package collector, durable queue on)
// against the OpenTelemetry Collector (otlpreceiver → batch → otlp exporter, in-memory
// sending queue) built from the same release line (test/tools/otelcol, v0.165.0), in the
// same run, with the same load from telemetrygen and the same upstream sink (an
// in-process OTLP/gRPC server in this program that counts spans).
//
// Each subject runs as its own process; its CPU time comes from /proc/PID/stat and its
// RSS from /proc/PID/status. Two phases per subject:
//
//  1. throughput: telemetrygen at no rate limit for -duration; spans the sink received per
//     CPU-second of the subject.
//  2. fixed rate: telemetrygen at -rate spans/s for -duration; the subject's RSS (peak and
//     mean over the phase) and CPU use.
//
// Run: go run ./test/bench/otlp   (make bench). Needs test/tools/build.sh telemetrygen otelcol.
package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/collector/pdata/pcommon"
	"go.opentelemetry.io/collector/pdata/ptrace"
	"go.opentelemetry.io/collector/pdata/ptrace/ptraceotlp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	_ "google.golang.org/grpc/encoding/gzip"

	"github.com/nodeagent/nodeagent/agent/health"
	"github.com/nodeagent/nodeagent/collector"
	"github.com/nodeagent/nodeagent/collector/queue"
	"github.com/nodeagent/nodeagent/test/peers"
)

var (
	duration   = flag.Duration("duration", 10*time.Second, "length of each load phase")
	rate       = flag.Int("rate", 50000, "spans per second in the fixed-rate phase")
	workers    = flag.Int("workers", 4, "telemetrygen workers")
	batch      = flag.Int("batch-size", 512, "telemetrygen SDK batch size (spans per request)")
	fsync      = flag.String("fsync", "segment", "relay queue fsync policy: never, segment or always")
	only       = flag.String("only", "", "run only this subject: relay or otelcol")
	relayProcs = flag.Int("relay-gomaxprocs", 0, "GOMAXPROCS for the relay process (0: Go's default)")
	relayGOGC  = flag.Int("relay-gogc", 0, "GOGC for the relay process (0: Go's default, 100)")
	loadKind   = flag.String("load", "both", "load generator: telemetrygen, builtin (pre-encoded requests from this program, cheap enough to reach 50k spans/s on a small machine) or both")
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "relay" {
		runRelay(os.Args[2:])
		return
	}
	flag.Parse()
	if err := bench(); err != nil {
		fmt.Fprintln(os.Stderr, "otlp bench:", err)
		os.Exit(1)
	}
}

// runRelay is the relay subject: `otlp relay GRPC_ADDR UPSTREAM QUEUE_DIR FSYNC`.
func runRelay(args []string) {
	opts := collector.Options{
		GRPCListen:            netip.MustParseAddrPort(args[0]),
		Exporter:              collector.Exporter{Endpoint: args[1], Insecure: true},
		ResourceAttributes:    map[string]string{"k8s.node.name": "bench-node", "host.name": "bench-node"},
		Queue:                 collector.Queue{Dir: args[2], Fsync: queue.Fsync(args[3])},
		SetProcessMemoryLimit: true,
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	r, err := collector.New(opts, log, prometheus.NewRegistry(), health.Discard)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if p := os.Getenv("OTLP_BENCH_CPUPROFILE"); p != "" { // profile the relay: go tool pprof
		f, err := os.Create(p)
		if err == nil {
			if err := pprof.StartCPUProfile(f); err == nil {
				defer pprof.StopCPUProfile()
			}
		}
	}
	if err := r.Run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

// sink counts the spans it receives.
type sink struct {
	ptraceotlp.UnimplementedGRPCServer
	spans atomic.Int64
}

func (s *sink) Export(_ context.Context, req ptraceotlp.ExportRequest) (ptraceotlp.ExportResponse, error) {
	s.spans.Add(int64(req.Traces().SpanCount()))
	return ptraceotlp.NewExportResponse(), nil
}

type result struct {
	subject           string
	load              string
	tputSpans         int64
	tputCPU, tputWall float64
	rateSpans         int64
	rateCPU, rateWall float64
	rssPeak, rssMean  int64
	rssIdle           int64
}

func bench() error {
	tg, err := peers.Lookup("telemetrygen")
	if err != nil {
		return err
	}
	otelcol, otelErr := peers.Lookup("otelcol")

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	s := &sink{}
	gs := grpc.NewServer(grpc.MaxRecvMsgSize(64 << 20))
	ptraceotlp.RegisterGRPCServer(gs, s)
	go func() { _ = gs.Serve(l) }()
	defer gs.Stop()
	upstream := l.Addr().String()

	self, err := os.Executable()
	if err != nil {
		return err
	}
	work, err := os.MkdirTemp("", "otlp-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)

	var results []result
	subjects := []string{"relay", "otelcol"}
	if *only != "" {
		subjects = []string{*only}
	}
	for _, name := range subjects {
		addr, err := freeAddr()
		if err != nil {
			return err
		}
		var cmd *exec.Cmd
		switch name {
		case "relay":
			cmd = exec.Command(self, "relay", addr, upstream, filepath.Join(work, "queue"), *fsync)
		case "otelcol":
			if otelErr != nil {
				fmt.Fprintf(os.Stderr, "skipping the collector: %v\n", otelErr)
				continue
			}
			cfg := filepath.Join(work, "otelcol.yaml")
			if err := os.WriteFile(cfg, []byte(fmt.Sprintf(otelcolConfig, addr, upstream)), 0o644); err != nil {
				return err
			}
			cmd = exec.Command(otelcol, "--config", cfg)
		}
		for _, lk := range loads() {
			c := exec.Command(cmd.Path, cmd.Args[1:]...)
			if name == "relay" {
				c.Env = os.Environ()
				if *relayProcs > 0 {
					c.Env = append(c.Env, "GOMAXPROCS="+strconv.Itoa(*relayProcs))
				}
				if *relayGOGC > 0 {
					c.Env = append(c.Env, "GOGC="+strconv.Itoa(*relayGOGC))
				}
			}
			if name == "relay" {
				os.RemoveAll(filepath.Join(work, "queue"))
			}
			res, err := measure(name, lk, c, addr, tg, s)
			if err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
			results = append(results, res)
		}
	}
	report(results)
	return nil
}

// otelcolConfig mirrors the agent DaemonSet the relay replaces, minus memory_limiter (not in
// the benchmark build): batch 8192 / 200ms, otlp exporter with 4 consumers and retries.
const otelcolConfig = `receivers:
  otlp:
    protocols:
      grpc:
        endpoint: %s
processors:
  batch:
    send_batch_size: 8192
    timeout: 200ms
exporters:
  otlp:
    endpoint: %s
    tls:
      insecure: true
    sending_queue:
      num_consumers: 4
      queue_size: 100
    retry_on_failure:
      enabled: true
service:
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [otlp]
`

func loads() []string {
	if *loadKind == "both" {
		return []string{"telemetrygen", "builtin"}
	}
	return []string{*loadKind}
}

func measure(name, loadName string, cmd *exec.Cmd, addr, tg string, s *sink) (result, error) {
	res := result{subject: name, load: loadName}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return res, err
	}
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	}()
	pid := cmd.Process.Pid
	if err := waitPort(addr, 30*time.Second); err != nil {
		return res, err
	}
	time.Sleep(time.Second)
	res.rssIdle, _ = rss(pid)

	load := func(rateArg int) (spans int64, cpu, wall float64, peak, mean int64, err error) {
		before := s.spans.Load()
		cpu0, _ := cpuSeconds(pid)
		start := time.Now()
		var done <-chan error
		if loadName == "builtin" {
			done = builtinLoad(addr, rateArg)
		} else {
			done, err = telemetrygen(tg, name, addr, rateArg)
			if err != nil {
				return 0, 0, 0, 0, 0, err
			}
		}
		var sum, n int64
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
	wait:
		for {
			select {
			case err := <-done:
				if err != nil {
					fmt.Fprintf(os.Stderr, "%s: %v (counted from the sink)\n", loadName, err)
				}
				break wait
			case <-tick.C:
				if r, err := rss(pid); err == nil {
					sum += r
					n++
					peak = max(peak, r)
				}
			}
		}
		// Let the subject flush: until the sink count is stable for a second.
		last := s.spans.Load()
		for i := 0; i < 60; i++ {
			time.Sleep(500 * time.Millisecond)
			cur := s.spans.Load()
			if cur == last && i > 1 {
				break
			}
			last = cur
		}
		wall = time.Since(start).Seconds()
		cpu1, _ := cpuSeconds(pid)
		if n > 0 {
			mean = sum / n
		}
		return s.spans.Load() - before, cpu1 - cpu0, wall, peak, mean, nil
	}
	var err error
	if res.tputSpans, res.tputCPU, res.tputWall, _, _, err = load(0); err != nil {
		return res, err
	}
	if res.rateSpans, res.rateCPU, res.rateWall, res.rssPeak, res.rssMean, err = load(*rate); err != nil {
		return res, err
	}
	return res, nil
}

func report(rs []result) {
	fmt.Printf("\nOTLP relay benchmark: telemetrygen %d workers, batch %d, %v per phase, fixed rate %d spans/s, relay fsync=%s\n\n",
		*workers, *batch, *duration, *rate, *fsync)
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "subject\tload\tmax spans\tspans/s\tCPU s\tspans per CPU-s\t| fixed-rate spans/s\tCPU %\tRSS idle MiB\tRSS mean MiB\tRSS peak MiB")
	for _, r := range rs {
		fmt.Fprintf(w, "%s\t%s\t%d\t%.0f\t%.2f\t%.0f\t| %.0f\t%.0f\t%.1f\t%.1f\t%.1f\n", r.subject, r.load,
			r.tputSpans, float64(r.tputSpans)/r.tputWall, r.tputCPU, float64(r.tputSpans)/r.tputCPU,
			float64(r.rateSpans)/duration.Seconds(), 100*r.rateCPU/r.rateWall,
			mibf(r.rssIdle), mibf(r.rssMean), mibf(r.rssPeak))
	}
	w.Flush()
	for _, a := range rs {
		for _, b := range rs {
			if a.subject != "relay" || b.subject != "otelcol" || a.load != b.load {
				continue
			}
			fmt.Printf("\n%s load: relay/collector spans per CPU-second %.2fx (goal >= 2x); mean RSS at fixed rate %.2fx, peak %.2fx (goal <= 0.5x)\n",
				a.load, (float64(a.tputSpans)/a.tputCPU)/(float64(b.tputSpans)/b.tputCPU),
				float64(a.rssMean)/float64(b.rssMean), float64(a.rssPeak)/float64(b.rssPeak))
		}
	}
}

func mibf(b int64) float64 { return float64(b) / (1 << 20) }

func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

func waitPort(addr string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("subject did not listen on %s within %v", addr, timeout)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// cpuSeconds is utime+stime of pid (all its threads), from /proc/PID/stat.
func cpuSeconds(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, errors.New("unexpected /proc/PID/stat")
	}
	f := strings.Fields(s[i+2:])
	// Fields after ")": state(0) ... utime is field 14 overall → index 11 here, stime 12.
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (ut + st) / 100, nil // USER_HZ is 100 on Linux
}

// rss is VmRSS of pid in bytes.
func rss(pid int) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.Fields(v)[0], 10, 64)
			return kb << 10, err
		}
	}
	return 0, errors.New("no VmRSS")
}

// telemetrygen runs the real client at rateArg spans/s in total (0: unlimited).
func telemetrygen(tg, name, addr string, rateArg int) (<-chan error, error) {
	perWorker := "0"
	if rateArg > 0 {
		perWorker = strconv.Itoa(rateArg / *workers)
	}
	c := exec.Command(tg, "traces", "--otlp-endpoint", addr, "--otlp-insecure", "--workers", strconv.Itoa(*workers),
		"--rate", perWorker, "--duration", duration.String(), "--batch-size", strconv.Itoa(*batch),
		"--child-spans", "1", "--service", "bench-"+name)
	if err := c.Start(); err != nil {
		return nil, err
	}
	done := make(chan error, 1)
	go func() { done <- c.Wait() }()
	return done, nil
}

// builtinLoad sends pre-encoded requests shaped like telemetrygen's (one resource, one scope,
// -batch-size spans of parent/child pairs with a few attributes) over -workers gRPC
// connections, at rateArg spans/s in total (0: as fast as the subject answers), for -duration.
func builtinLoad(addr string, rateArg int) <-chan error {
	done := make(chan error, 1)
	req := ptraceotlp.NewExportRequestFromTraces(sampleTraces(*batch))
	go func() {
		end := time.Now().Add(*duration)
		errs := make(chan error, *workers)
		for w := 0; w < *workers; w++ {
			go func() {
				cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
				if err != nil {
					errs <- err
					return
				}
				defer cc.Close()
				client := ptraceotlp.NewGRPCClient(cc)
				var interval time.Duration
				if rateArg > 0 {
					interval = time.Duration(float64(time.Second) * float64(*batch) * float64(*workers) / float64(rateArg))
				}
				next := time.Now()
				var firstErr error
				for time.Now().Before(end) {
					if interval > 0 {
						if d := time.Until(next); d > 0 {
							time.Sleep(d)
						}
						next = next.Add(interval)
					}
					ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
					_, err := client.Export(ctx, req)
					cancel()
					if err != nil && firstErr == nil {
						firstErr = err
					}
				}
				errs <- firstErr
			}()
		}
		var first error
		for w := 0; w < *workers; w++ {
			if err := <-errs; err != nil && first == nil {
				first = err
			}
		}
		done <- first
	}()
	return done
}

func sampleTraces(n int) ptrace.Traces {
	td := ptrace.NewTraces()
	rs := td.ResourceSpans().AppendEmpty()
	rs.Resource().Attributes().PutStr("service.name", "bench-builtin")
	rs.Resource().Attributes().PutStr("telemetry.sdk.language", "go")
	rs.Resource().Attributes().PutStr("telemetry.sdk.name", "opentelemetry")
	rs.Resource().Attributes().PutStr("telemetry.sdk.version", "1.38.0")
	ss := rs.ScopeSpans().AppendEmpty()
	ss.Scope().SetName("telemetrygen")
	now := time.Now()
	for i := 0; i < n; i++ {
		sp := ss.Spans().AppendEmpty()
		var tid pcommon.TraceID
		var sid pcommon.SpanID
		binary.BigEndian.PutUint64(tid[:8], uint64(now.UnixNano()))
		binary.BigEndian.PutUint64(tid[8:], uint64(i/2))
		binary.BigEndian.PutUint64(sid[:], uint64(i+1))
		sp.SetTraceID(tid)
		sp.SetSpanID(sid)
		if i%2 == 1 {
			var pid pcommon.SpanID
			binary.BigEndian.PutUint64(pid[:], uint64(i))
			sp.SetParentSpanID(pid)
			sp.SetName("okey-dokey-0")
			sp.SetKind(ptrace.SpanKindServer)
		} else {
			sp.SetName("lets-go")
			sp.SetKind(ptrace.SpanKindClient)
		}
		sp.SetStartTimestamp(pcommon.NewTimestampFromTime(now))
		sp.SetEndTimestamp(pcommon.NewTimestampFromTime(now.Add(123 * time.Microsecond)))
		sp.Attributes().PutStr("net.sock.peer.addr", "1.2.3.4")
		sp.Attributes().PutStr("peer.service", "telemetrygen-server")
		sp.Status().SetCode(ptrace.StatusCodeUnset)
	}
	return td
}
