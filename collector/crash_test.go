package collector

import (
	"bufio"
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/nodeagent/nodeagent/agent/health"
)

// TestCrashChild is the relay process of TestCrashRecovery (a re-exec of the test binary);
// it does nothing in a normal run.
func TestCrashChild(t *testing.T) {
	dir := os.Getenv("NODEAGENT_OTLP_CRASH_CHILD_DIR")
	if dir == "" {
		t.Skip("only runs as TestCrashRecovery's child process")
	}
	opts := Options{
		GRPCListen:         netip.MustParseAddrPort("127.0.0.1:0"),
		HTTPListen:         netip.MustParseAddrPort("127.0.0.1:0"),
		Exporter:           Exporter{Endpoint: os.Getenv("NODEAGENT_OTLP_CRASH_CHILD_UPSTREAM"), Insecure: true, Timeout: time.Second},
		ResourceAttributes: map[string]string{"k8s.node.name": "node-crash"},
		Batch:              Batch{Timeout: 20 * time.Millisecond},
		Queue:              Queue{Dir: dir, Fsync: "never"},
		Retry:              Retry{InitialInterval: 20 * time.Millisecond, MaxInterval: 200 * time.Millisecond},
	}
	rec := health.NewRecorder()
	r, err := New(opts, testLogger(t), prometheus.NewRegistry(), rec)
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	rec.WaitFor(health.OTLP, 10*time.Second, func(health.Result) bool { return true })
	fmt.Printf("ADDRS %s %s\n", r.Addr(ListenerNameGRPC), r.Addr(ListenerNameHTTP))
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

type child struct {
	cmd            *exec.Cmd
	grpcAddr, http string
}

func startChild(t *testing.T, dir, upstream string) *child {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestCrashChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), "NODEAGENT_OTLP_CRASH_CHILD_DIR="+dir, "NODEAGENT_OTLP_CRASH_CHILD_UPSTREAM="+upstream)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	lines := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if strings.HasPrefix(sc.Text(), "ADDRS ") {
				lines <- sc.Text()
			}
		}
	}()
	select {
	case l := <-lines:
		f := strings.Fields(l)
		return &child{cmd: cmd, grpcAddr: f[1], http: f[2]}
	case <-time.After(20 * time.Second):
		t.Fatal("relay child did not start within 20s")
	}
	return nil
}

func TestCrashRecovery(t *testing.T) {
	if testing.Short() {
		t.Skip("re-executes the test binary")
	}
	dir := t.TempDir()
	upstream := freeAddr(t) // down until the end
	c := startChild(t, dir, upstream)
	client := grpcClient(t, c.grpcAddr)
	var acked []uint64
	for i := 0; i < 40; i++ {
		td, ids := makeTraces("crash-svc", 25)
		if i%2 == 0 {
			if err := sendGRPC(client, td); err != nil {
				t.Fatalf("request %d: %v", i, err)
			}
		} else if r := postHTTP(t, c.http, "POST", ctProto, "", protoBody(t, td)); r.code != 200 {
			t.Fatalf("request %d: HTTP %d", i, r.code)
		}
		acked = append(acked, ids...)
	}
	// kill -9 right after the last acknowledgement, with everything queued and the upstream down.
	if err := c.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	c.cmd.Wait()

	// Restart on the same queue, with the upstream up: every acknowledged span arrives.
	up := newSink()
	up.start(t, upstream)
	c2 := startChild(t, dir, upstream)
	up.waitIDs(t, acked, 30*time.Second)

	// And a second crash after everything was exported does not resend much: the cursor moved.
	time.Sleep(200 * time.Millisecond)
	c2.cmd.Process.Signal(syscall.SIGKILL)
	c2.cmd.Wait()
	before, _ := up.count()
	startChild(t, dir, upstream)
	time.Sleep(500 * time.Millisecond)
	up.mu.Lock()
	dup := 0
	for _, n := range up.spans {
		if n > 1 {
			dup++
		}
	}
	up.mu.Unlock()
	if after, _ := up.count(); after != before {
		t.Fatalf("got %d distinct spans after the second restart; want %d", after, before)
	}
	if dup > len(acked)/2 {
		t.Fatalf("got %d of %d spans delivered twice; want the acknowledged cursor to prevent a full replay", dup, len(acked))
	}
	t.Logf("%d spans acknowledged, all delivered; %d duplicates", len(acked), dup)
}
