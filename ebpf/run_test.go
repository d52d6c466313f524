package ebpf

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/nodeagent/nodeagent/agent/health"
	"github.com/nodeagent/nodeagent/test/privtest"
)

func baseOptions() Options {
	return Options{
		ProxyAddr4: netip.MustParseAddrPort("127.0.0.1:15001"),
		Intercepts: []Intercept{{Addr: mustAddr("169.254.1.2")}},
	}
}

// runUntilReported runs s until it reports a steering result, cancels it and
// returns that result and Run's error.
func runUntilReported(t *testing.T, s *Steering, rec *health.Recorder) (health.Result, error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	errc := make(chan error, 1)
	go func() { errc <- s.Run(ctx) }()
	res, ok := rec.WaitFor(health.Steering, 10*time.Second, func(health.Result) bool { return true })
	if !ok {
		t.Fatal("no steering result reported")
	}
	select {
	case err := <-errc:
		return res, err // returned on its own: an error to retry
	case <-time.After(200 * time.Millisecond):
	}
	cancel()
	select {
	case err := <-errc:
		return res, err
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after cancellation")
		return res, nil
	}
}

// TestRunUnsupported: a missing kernel feature fails the check, naming it, and
// Run waits for cancellation without an error so the agent keeps running.
func TestRunUnsupported(t *testing.T) {
	rec := health.NewRecorder()
	s, err := New(baseOptions(), slog.New(slog.DiscardHandler), prometheus.NewRegistry(), rec)
	if err != nil {
		t.Fatal(err)
	}
	s.probe = func() error {
		return fmt.Errorf("%w: missing helper bpf_get_netns_cookie in cgroup_sock_addr: not supported", errUnsupported)
	}
	res, err := runUntilReported(t, s, rec)
	if err != nil {
		t.Errorf("Run: got %v; want nil", err)
	}
	if res.OK || !strings.Contains(res.Detail, "bpf_get_netns_cookie") {
		t.Errorf("steering check: got %+v; want failing, naming bpf_get_netns_cookie", res)
	}
}

// TestRunHostProblems: a cgroup v1-only host waits like a missing feature; a
// cgroup directory that does not exist is an error to retry.
func TestRunHostProblems(t *testing.T) {
	privtest.Root(t)
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "proc"), 0o755); err != nil {
		t.Fatal(err)
	}
	v1 := "cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n"
	if err := os.WriteFile(filepath.Join(root, "proc/mounts"), []byte(v1), 0o644); err != nil {
		t.Fatal(err)
	}
	opts := baseOptions()
	opts.HostRoot = root
	opts.BPFFS = filepath.Join(root, "bpffs")

	rec := health.NewRecorder()
	s, err := New(opts, slog.New(slog.DiscardHandler), prometheus.NewRegistry(), rec)
	if err != nil {
		t.Fatal(err)
	}
	res, err := runUntilReported(t, s, rec)
	if err != nil {
		t.Errorf("Run on a cgroup v1-only host: got %v; want nil", err)
	}
	if res.OK || !strings.Contains(res.Detail, "cgroup v1-only") {
		t.Errorf("steering check on a cgroup v1-only host: got %+v; want failing, naming cgroup v1-only", res)
	}
	if got := Check(context.Background(), opts)[0]; got.OK || !strings.Contains(got.Detail, "cgroup v1-only") {
		t.Errorf("Check on a cgroup v1-only host: got %+v; want failing, naming cgroup v1-only", got)
	}

	opts = baseOptions()
	opts.Cgroup = "natest-does-not-exist"
	opts.BPFFS = filepath.Join(root, "bpffs")
	rec = health.NewRecorder()
	s, err = New(opts, slog.New(slog.DiscardHandler), prometheus.NewRegistry(), rec)
	if err != nil {
		t.Fatal(err)
	}
	res, err = runUntilReported(t, s, rec)
	if err == nil || errors.Is(err, errUnsupported) {
		t.Errorf("Run with a missing cgroup: got %v; want an error to retry", err)
	}
	if res.OK || !strings.Contains(res.Detail, "natest-does-not-exist") {
		t.Errorf("steering check with a missing cgroup: got %+v; want failing, naming the cgroup", res)
	}
	if _, err := os.Stat(opts.BPFFS); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("bpffs directory after a failed start: got %v; want not created", err)
	}
}

func TestNewRejectsInvalid(t *testing.T) {
	opts := baseOptions()
	opts.PodRedirect = netip.MustParseAddrPort("169.254.1.2:15001")
	if _, err := New(opts, slog.New(slog.DiscardHandler), prometheus.NewRegistry(), health.Discard); !errors.Is(err, errInvalidOptions) {
		t.Errorf("New with an intercepted target: got %v; want invalid options", err)
	}
}

// TestMetricsInitialised: every series exists at 0 before Run.
func TestMetricsInitialised(t *testing.T) {
	reg := prometheus.NewRegistry()
	if _, err := New(baseOptions(), slog.New(slog.DiscardHandler), reg, health.Discard); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		labels map[string]string
	}{
		{"nodeagent_steering_redirects_total", map[string]string{"family": "ipv4"}},
		{"nodeagent_steering_redirects_total", map[string]string{"family": "ipv6"}},
		{"nodeagent_steering_errors_total", nil},
		{"nodeagent_steering_pod_unsteered_total", nil},
		{"nodeagent_steering_upstream_skipped_total", nil},
		{"nodeagent_steering_map_entries", map[string]string{"map": "orig_by_client"}},
		{"nodeagent_steering_attached", nil},
	} {
		if got := metricValue(t, reg, tc.name, tc.labels); got != 0 {
			t.Errorf("%s%v: got %v; want 0", tc.name, tc.labels, got)
		}
	}
}
