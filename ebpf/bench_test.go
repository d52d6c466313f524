package ebpf

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// BenchmarkConnect measures what the hooks add to connect(): the same loop of
// connect+close runs b.N times outside the cgroup (no programs) and b.N times
// inside it, in one run, inside a test network namespace, alternating in blocks
// so that drift on a busy machine hits both alike. Reported:
// detached-ns/connect, attached-ns/connect, overhead-ns/connect and ratio; and,
// free of scheduling noise, bpf-ns/connect: the time the kernel spent in the
// programs per attached connect (BPF run-time statistics, enabled for the run
// through a file descriptor, so no sysctl is touched).
//
//   - unmapped: a destination that is not intercepted (the cost every workload
//     connection pays: two map lookups).
//   - steered: a mapped destination, rewritten to the proxy, against a direct
//     connect to the proxy (adds the cookie and client map updates, the sockops
//     callbacks and their deletion at close).
func BenchmarkConnect(b *testing.B) {
	e := newEnv(b)
	e.relay.Store(false)
	s, _, _, _ := e.start(e.options())
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		b.Fatalf("enable BPF run-time statistics: %v", err)
	}
	defer stats.Close()
	progs := []*ebpf.Program{s.cur.objs.SteerConnect4, s.cur.objs.SteerSockops}
	for _, bc := range []struct {
		name             string
		detached, attach string
	}{
		{"unmapped", "169.254.1.9:80", "169.254.1.9:80"},
		{"steered", proxy4.String(), "169.254.1.2:80"},
	} {
		b.Run(bc.name, func(b *testing.B) {
			dd, ad := netip.MustParseAddrPort(bc.detached), netip.MustParseAddrPort(bc.attach)
			// Warm up both paths.
			e.connectLoop(b, false, dd, 200)
			e.connectLoop(b, true, ad, 200)
			b.ResetTimer()
			before := progRuntime(b, progs)
			var detached, attached time.Duration
			for done := 0; done < b.N; {
				k := min(500, b.N-done)
				detached += e.connectLoop(b, false, dd, k)
				attached += e.connectLoop(b, true, ad, k)
				done += k
			}
			b.ReportMetric(float64((progRuntime(b, progs)-before).Nanoseconds())/float64(b.N), "bpf-ns/connect")
			d := float64(detached.Nanoseconds()) / float64(b.N)
			a := float64(attached.Nanoseconds()) / float64(b.N)
			b.ReportMetric(d, "detached-ns/connect")
			b.ReportMetric(a, "attached-ns/connect")
			b.ReportMetric(a-d, "overhead-ns/connect")
			b.ReportMetric(a/d, "ratio")
		})
	}
}

// connectLoop times n connect+close (RST, so no TIME_WAIT piles up) to dst from
// the "host" namespace, with this process inside the test cgroup when inCgroup.
func (e *env) connectLoop(b *testing.B, inCgroup bool, dst netip.AddrPort, n int) time.Duration {
	if inCgroup {
		back := ownCgroup(b)
		moveSelf(b, e.cgroup)
		defer moveSelf(b, back)
	}
	sa := &unix.SockaddrInet4{Addr: dst.Addr().As4(), Port: int(dst.Port())}
	var took time.Duration
	err := e.host.Do(func() error {
		start := time.Now()
		for range n {
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return err
			}
			if err := unix.Connect(fd, sa); err != nil {
				unix.Close(fd)
				return fmt.Errorf("connect %s: %w", dst, err)
			}
			_ = unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
			unix.Close(fd)
		}
		took = time.Since(start)
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
	return took
}

// progRuntime sums the run time the kernel accounted to progs.
func progRuntime(b *testing.B, progs []*ebpf.Program) time.Duration {
	var sum time.Duration
	for _, p := range progs {
		st, err := p.Stats()
		if err != nil {
			b.Fatalf("program stats: %v", err)
		}
		sum += st.Runtime
	}
	return sum
}

// ownCgroup returns this process's cgroup v2 directory.
func ownCgroup(b *testing.B) string {
	data, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		b.Fatal(err)
	}
	f, err := os.Open("/proc/mounts")
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	mnt, err := cgroup2Mount(f)
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "0::"); ok {
			return filepath.Join(mnt, rest)
		}
	}
	b.Fatal("no cgroup v2 entry in /proc/self/cgroup")
	return ""
}

func moveSelf(b *testing.B, cgroup string) {
	if err := os.WriteFile(filepath.Join(cgroup, "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		b.Fatalf("move into %s: %v", cgroup, err)
	}
}
