// Command proxy compares nodeagent's address-mapping proxy with a direct loopback
// connection, HAProxy (TCP mode, splice) and a plain Go io.Copy proxy, against the
// same client and server in one run:
//
//   - single-stream throughput (client → server, for -duration),
//   - connections per second (connect, 1-byte echo, close; -conc workers),
//   - p50/p99 round trip of a 1 KiB request/response on one connection,
//   - memory (RSS) and descriptors per idle connection of the proxy process at
//     -idle connections.
//
// The client runs in this process; the server and each proxy run as child
// processes (this binary re-executed with -role), so every process stays within
// the descriptor limit and the proxy's RSS is its own. nodeagent runs with a fake
// original-destination source that maps every connection to the server: steering
// is measured elsewhere. Run it with `make bench` or
// `go run ./test/bench/proxy`; it needs no root, but uses haproxy when installed.
package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/nodeagent/nodeagent/agent/proxy"
)

func main() {
	role := flag.String("role", "bench", "bench | server | nodeagent | gocopy (children are started by bench) | connrate (against -target)")
	listen := flag.String("listen", "", "child: address to listen on")
	target := flag.String("target", "", "child proxy: server address")
	relay := flag.String("relay", "splice", "nodeagent child: relay mode")
	duration := flag.Duration("duration", 3*time.Second, "length of the throughput and connection-rate runs")
	conc := flag.Int("conc", 16, "connection-rate workers")
	rtts := flag.Int("rtts", 20000, "1 KiB round trips for the latency run")
	idle := flag.Int("idle", 9900, "idle connections for the memory run (the proxy holds 2 descriptors each; the hard RLIMIT_NOFILE bounds it)")
	cpuprofile := flag.String("cpuprofile", "", "nodeagent child: write a CPU profile here")
	procs := flag.Int("proxy-gomaxprocs", 0, "GOMAXPROCS of the nodeagent child (0: Go's default)")
	rounds := flag.Int("rounds", 3, "runs of each throughput, conn/s and latency measurement; the median is reported")
	only := flag.String("only", "", "comma-separated subset of: direct,haproxy,nodeagent-splice,nodeagent-copy,go-iocopy")
	flag.Parse()
	raiseNoFile()

	var err error
	switch *role {
	case "server":
		err = runServer(*listen)
	case "nodeagent":
		if *cpuprofile != "" {
			f, ferr := os.Create(*cpuprofile)
			if ferr == nil {
				// The profile is best effort, like the Create above.
				_ = pprof.StartCPUProfile(f)
				defer pprof.StopCPUProfile()
			}
		}
		if *procs > 0 {
			runtime.GOMAXPROCS(*procs)
		}
		err = runNodeagent(*listen, *target, proxy.RelayMode(*relay))
	case "gocopy":
		err = runGoCopy(*listen, *target)
	case "connrate":
		var rate float64
		rate, err = connRate(*target, *duration, *conc)
		fmt.Printf("%.0f connections/s\n", rate)
	case "bench":
		err = bench(benchConfig{duration: *duration, conc: *conc, rtts: *rtts, idle: *idle, only: *only, rounds: max(*rounds, 1), procs: *procs})
	default:
		err = fmt.Errorf("unknown role %q", *role)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// raiseNoFile sets the soft descriptor limit to the hard one.
func raiseNoFile() {
	var rl syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl) == nil {
		rl.Cur = rl.Max
		_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl) // best effort: keep the soft limit otherwise
	}
}

func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
}

// ---- server ----

// runServer serves two protocols chosen by the first byte: 'S' reads to EOF and
// answers the byte count (8 bytes, big endian); 'E' echoes with a small buffer.
func runServer(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	ctx, cancel := signalContext()
	defer cancel()
	go func() { <-ctx.Done(); ln.Close() }()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			time.Sleep(10 * time.Millisecond)
			continue
		}
		go serveConn(c.(*net.TCPConn))
	}
}

func serveConn(c *net.TCPConn) {
	defer c.Close()
	var mode [1]byte
	if _, err := io.ReadFull(c, mode[:]); err != nil {
		return
	}
	switch mode[0] {
	case 'S':
		buf := make([]byte, 256<<10)
		var n int64
		for {
			m, err := c.Read(buf)
			n += int64(m)
			if err != nil {
				break
			}
		}
		// On failure the client's read of the count fails and reports it.
		_ = binary.Write(c, binary.BigEndian, n)
	case 'E':
		buf := make([]byte, 2048)
		for {
			m, err := c.Read(buf)
			if m > 0 {
				if _, werr := c.Write(buf[:m]); werr != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	}
}

// ---- proxies ----

func runNodeagent(listen, target string, mode proxy.RelayMode) error {
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return err
	}
	// Every connection "was headed for" 192.0.2.1:80, mapped to the server.
	dst := netip.MustParseAddrPort("192.0.2.1:80")
	p, err := proxy.New(proxy.Options{
		Listeners:      []net.Listener{ln},
		ConnectTimeout: 5 * time.Second,
		IdleTimeout:    time.Hour,
		Relay:          mode,
		AddressMap:     map[string]string{dst.String(): target},
		OriginalDst: proxy.OriginalDstFunc(func(netip.AddrPort) (netip.AddrPort, bool) {
			return dst, true
		}),
	}, slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})), nil, nil)
	if err != nil {
		return err
	}
	ctx, cancel := signalContext()
	defer cancel()
	return p.Run(ctx)
}

// runGoCopy is the textbook Go proxy: io.Copy both ways on *net.TCPConn (which
// splices through a pipe pair per direction held for the connection's life).
func runGoCopy(listen, target string) error {
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return err
	}
	ctx, cancel := signalContext()
	defer cancel()
	go func() { <-ctx.Done(); ln.Close() }()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			time.Sleep(10 * time.Millisecond)
			continue
		}
		go func() {
			defer c.Close()
			u, err := net.Dial("tcp", target)
			if err != nil {
				return
			}
			defer u.Close()
			done := make(chan struct{})
			// A copy error just ends its direction, as in a plain relay; the
			// peer sees the EOF or reset.
			go func() {
				_, _ = io.Copy(u, c)
				_ = u.(*net.TCPConn).CloseWrite()
				close(done)
			}()
			_, _ = io.Copy(c, u)
			_ = c.(*net.TCPConn).CloseWrite()
			<-done
		}()
	}
}

// ---- orchestration ----

type benchConfig struct {
	duration time.Duration
	conc     int
	rtts     int
	idle     int
	only     string
	rounds   int
	procs    int
}

type result struct {
	name        string
	gbps        float64
	connsPerSec float64
	p50, p99    time.Duration
	idleConns   int
	kibPerConn  float64
	fdsPerConn  float64
	cpuPerConn  time.Duration // proxy CPU (user+system) per connection in the conn/s run
	note        string
}

func freePort() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

type child struct {
	cmd *exec.Cmd
}

func startChild(name string, args ...string) (*child, error) {
	cmd := exec.Command(name, args...)
	cmd.Stdout = os.Stderr
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	return &child{cmd: cmd}, nil
}

func (c *child) stop() {
	// Errors are expected here: the child may have exited already, and Wait
	// reports the signal that ended it.
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = c.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		_ = c.cmd.Process.Kill()
		<-done
	}
}

func waitListening(addr string) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s never listened: %w", addr, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func bench(cfg benchConfig) error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return fmt.Errorf("getrlimit: %w", err)
	}
	serverAddr, err := freePort()
	if err != nil {
		return err
	}
	srv, err := startChild(self, "-role=server", "-listen="+serverAddr)
	if err != nil {
		return err
	}
	defer srv.stop()
	if err := waitListening(serverAddr); err != nil {
		return err
	}

	want := func(name string) bool {
		return cfg.only == "" || slices.Contains(strings.Split(cfg.only, ","), name)
	}
	var results []result
	if want("direct") {
		r := measure("direct", serverAddr, 0, cfg, 0)
		results = append(results, r)
	}
	if want("haproxy") {
		if path, err := exec.LookPath("haproxy"); err != nil {
			results = append(results, result{name: "haproxy", note: "not installed"})
		} else {
			r, err := withHAProxy(path, serverAddr, cfg, rl.Max)
			if err != nil {
				r = result{name: "haproxy", note: err.Error()}
			}
			results = append(results, r)
		}
	}
	for _, mode := range []string{"splice", "copy"} {
		name := "nodeagent-" + mode
		if !want(name) {
			continue
		}
		results = append(results, withChildProxy(name, self, []string{"-role=nodeagent", "-relay=" + mode, "-target=" + serverAddr, "-proxy-gomaxprocs=" + strconv.Itoa(cfg.procs)}, serverAddr, cfg, cfg.idle))
	}
	if want("go-iocopy") {
		// Six descriptors per connection: the idle run has to be smaller.
		n := min(cfg.idle, int(rl.Max-100)/6)
		results = append(results, withChildProxy("go-iocopy", self, []string{"-role=gocopy", "-target=" + serverAddr}, serverAddr, cfg, n))
	}
	printTable(os.Stdout, results, cfg, rl.Max)
	return nil
}

func withChildProxy(name, self string, args []string, serverAddr string, cfg benchConfig, idle int) result {
	addr, err := freePort()
	if err != nil {
		return result{name: name, note: err.Error()}
	}
	ch, err := startChild(self, append(args, "-listen="+addr)...)
	if err != nil {
		return result{name: name, note: err.Error()}
	}
	defer ch.stop()
	if err := waitListening(addr); err != nil {
		return result{name: name, note: err.Error()}
	}
	return measure(name, addr, ch.cmd.Process.Pid, cfg, idle)
}

func withHAProxy(path, serverAddr string, cfg benchConfig, fdMax uint64) (result, error) {
	addr, err := freePort()
	if err != nil {
		return result{}, err
	}
	dir, err := os.MkdirTemp("", "nodeagent-bench-haproxy")
	if err != nil {
		return result{}, err
	}
	defer os.RemoveAll(dir)
	// maxconn and maxpipes sized so 2 descriptors per connection plus the pipes
	// fit under the hard descriptor limit.
	maxconn := cfg.idle + 40
	conf := fmt.Sprintf(`global
    maxconn %d
    maxpipes 16
    nbthread 2
    ulimit-n %d

defaults
    mode tcp
    option splice-auto
    timeout connect 5s
    timeout client 1h
    timeout server 1h

frontend bench
    bind %s
    default_backend server

backend server
    server s1 %s
`, maxconn, fdMax, addr, serverAddr)
	cfgPath := filepath.Join(dir, "haproxy.cfg")
	if err := os.WriteFile(cfgPath, []byte(conf), 0o644); err != nil {
		return result{}, err
	}
	ch, err := startChild(path, "-db", "-f", cfgPath)
	if err != nil {
		return result{}, err
	}
	defer ch.stop()
	if err := waitListening(addr); err != nil {
		return result{}, err
	}
	out, _ := exec.Command(path, "-v").Output()
	r := measure("haproxy", addr, ch.cmd.Process.Pid, cfg, cfg.idle)
	if v := strings.Fields(string(out)); len(v) > 2 {
		r.name = "haproxy " + v[2]
	}
	return r, nil
}

// measure runs every measurement through addr; pid is the proxy to watch (0: none).
func measure(name, addr string, pid int, cfg benchConfig, idle int) result {
	r := result{name: name}
	var notes []string
	fmt.Fprintf(os.Stderr, "== %s\n", name)
	// Each measurement runs cfg.rounds times; the median is reported.
	var gbps, rates, p50s, p99s []float64
	var cpus []time.Duration
	for range cfg.rounds {
		if g, err := throughput(addr, cfg.duration); err != nil {
			notes = append(notes, "throughput: "+err.Error())
		} else {
			gbps = append(gbps, g)
		}
		cpu0, _ := cpuTime(pid)
		t0 := time.Now()
		if c, err := connRate(addr, cfg.duration, cfg.conc); err != nil {
			notes = append(notes, "conn rate: "+err.Error())
		} else {
			rates = append(rates, c)
			if cpu1, err := cpuTime(pid); err == nil && pid != 0 {
				cpus = append(cpus, (cpu1-cpu0)/time.Duration(c*time.Since(t0).Seconds()))
			}
		}
		if p50, p99, err := latency(addr, cfg.rtts); err != nil {
			notes = append(notes, "latency: "+err.Error())
		} else {
			p50s = append(p50s, float64(p50))
			p99s = append(p99s, float64(p99))
		}
	}
	r.gbps, r.connsPerSec = median(gbps), median(rates)
	r.p50, r.p99 = time.Duration(median(p50s)), time.Duration(median(p99s))
	if len(cpus) > 0 {
		slices.Sort(cpus)
		r.cpuPerConn = cpus[len(cpus)/2]
	}
	if pid != 0 && idle > 0 {
		time.Sleep(2 * time.Second) // let TIME_WAIT and closing sockets settle
		kib, fds, err := idleMemory(addr, pid, idle)
		if err != nil {
			notes = append(notes, "idle: "+err.Error())
		} else {
			r.idleConns, r.kibPerConn, r.fdsPerConn = idle, kib, fds
		}
	}
	r.note = strings.Join(notes, "; ")
	fmt.Fprintf(os.Stderr, "   %+v\n", r)
	return r
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	slices.Sort(v)
	return v[len(v)/2]
}

func throughput(addr string, d time.Duration) (float64, error) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	buf := make([]byte, 256<<10)
	buf[0] = 'S'
	start := time.Now()
	if _, err := c.Write(buf[:1]); err != nil {
		return 0, err
	}
	for time.Since(start) < d {
		if _, err := c.Write(buf); err != nil {
			return 0, err
		}
	}
	// A failure here shows up as the (more telling) read error below.
	_ = c.(*net.TCPConn).CloseWrite()
	var n int64
	if err := binary.Read(c, binary.BigEndian, &n); err != nil {
		return 0, fmt.Errorf("read count: %w", err)
	}
	el := time.Since(start)
	return float64(n-0) * 8 / el.Seconds() / 1e9, nil
}

func connRate(addr string, d time.Duration, conc int) (float64, error) {
	var done, failed atomic.Int64
	var firstErr atomic.Pointer[error]
	stop := time.Now().Add(d)
	var wg sync.WaitGroup
	start := time.Now()
	for range conc {
		wg.Go(func() {
			b := make([]byte, 2)
			for time.Now().Before(stop) {
				c, err := net.Dial("tcp", addr)
				if err == nil {
					if _, err = c.Write([]byte("Ex")); err == nil {
						_, err = io.ReadFull(c, b[:1])
					}
					c.Close()
				}
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, &err)
					continue
				}
				done.Add(1)
			}
		})
	}
	wg.Wait()
	rate := float64(done.Load()) / time.Since(start).Seconds()
	if f := failed.Load(); f > 0 {
		return rate, fmt.Errorf("%d of %d failed, first: %w", f, f+done.Load(), *firstErr.Load())
	}
	return rate, nil
}

func latency(addr string, n int) (time.Duration, time.Duration, error) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return 0, 0, err
	}
	defer c.Close()
	if _, err := c.Write([]byte("E")); err != nil {
		return 0, 0, err
	}
	req := make([]byte, 1024)
	resp := make([]byte, 1024)
	var samples []time.Duration
	for i := range n + 500 {
		t := time.Now()
		if _, err := c.Write(req); err != nil {
			return 0, 0, err
		}
		if _, err := io.ReadFull(c, resp); err != nil {
			return 0, 0, err
		}
		if i >= 500 { // warm-up
			samples = append(samples, time.Since(t))
		}
	}
	slices.Sort(samples)
	return samples[len(samples)/2], samples[len(samples)*99/100], nil
}

// idleMemory opens n connections through the proxy, moves one byte each way on
// each, and reports the proxy's RSS and descriptor growth per connection.
func idleMemory(addr string, pid int, n int) (kib, fds float64, err error) {
	rss0, err := rssKiB(pid)
	if err != nil {
		return 0, 0, err
	}
	fd0, err := countFDs(pid)
	if err != nil {
		return 0, 0, err
	}
	conns := make([]net.Conn, 0, n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	b := make([]byte, 1)
	for i := range n {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			return 0, 0, fmt.Errorf("connection %d: %w", i, err)
		}
		conns = append(conns, c)
		if err := c.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
			return 0, 0, fmt.Errorf("connection %d: %w", i, err)
		}
		if _, err := c.Write([]byte("Ex")); err != nil {
			return 0, 0, fmt.Errorf("connection %d: %w", i, err)
		}
		if _, err := io.ReadFull(c, b); err != nil {
			return 0, 0, fmt.Errorf("connection %d: %w", i, err)
		}
	}
	time.Sleep(3 * time.Second) // idle
	rss1, err := rssKiB(pid)
	if err != nil {
		return 0, 0, err
	}
	fd1, err := countFDs(pid)
	if err != nil {
		return 0, 0, err
	}
	return float64(rss1-rss0) / float64(n), float64(fd1-fd0) / float64(n), nil
}

func rssKiB(pid int) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			return strconv.ParseInt(strings.Fields(v)[0], 10, 64)
		}
	}
	return 0, errors.New("no VmRSS")
}

// cpuTime is the user+system CPU time of pid so far.
func cpuTime(pid int) (time.Duration, error) {
	if pid == 0 {
		return 0, nil
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	// Fields after the command: state is f[0]; utime and stime are stat fields 14 and 15.
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	const hz = 100 // USER_HZ
	return time.Duration(ut+st) * time.Second / hz, nil
}

func countFDs(pid int) (int, error) {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	return len(ents), err
}

func printTable(w io.Writer, rs []result, cfg benchConfig, fdMax uint64) {
	host, _ := os.Hostname()
	fmt.Fprintf(w, "\nproxy benchmark on %s (%d CPUs, RLIMIT_NOFILE hard %d); medians of %d rounds: throughput and conn/s over %v each, %d conn/s workers, %d round trips of 1 KiB\n\n",
		host, numCPU(), fdMax, cfg.rounds, cfg.duration, cfg.conc, cfg.rtts)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "proxy\tthroughput Gbit/s\tconn/s\tproxy CPU µs/conn\tp50 µs\tp99 µs\tidle conns\tRSS KiB/idle conn\tfds/idle conn\tnote")
	for _, r := range rs {
		idle := "-\t-\t-"
		if r.idleConns > 0 {
			idle = fmt.Sprintf("%d\t%.1f\t%.2f", r.idleConns, r.kibPerConn, r.fdsPerConn)
		}
		cpu := "-"
		if r.cpuPerConn > 0 {
			cpu = fmt.Sprintf("%.0f", float64(r.cpuPerConn.Nanoseconds())/1e3)
		}
		fmt.Fprintf(tw, "%s\t%.2f\t%.0f\t%s\t%.0f\t%.0f\t%s\t%s\n", r.name, r.gbps, r.connsPerSec, cpu,
			float64(r.p50.Nanoseconds())/1e3, float64(r.p99.Nanoseconds())/1e3, idle, r.note)
	}
	tw.Flush()
}

func numCPU() int {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return 0
	}
	return strings.Count(string(b), "processor\t:")
}
