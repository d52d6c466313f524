package hostprep

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// clockTicks is USER_HZ, the unit of /proc/<pid>/stat starttime: 100 on every Linux
// architecture Kubernetes runs on.
const clockTicks = 100

type kubeletProc struct {
	pid   int
	start time.Time
}

// findKubelets lists the host's kubelet processes with their start times, read from
// host_root/proc. A procfs lists the processes of the PID namespace it was mounted in,
// so in the DaemonSet /host/proc (the host's /proc, reached through the recursive bind
// of the host's /) shows the host's kubelet even without hostPID. Processes that vanish
// while being read are skipped.
func findKubelets(o Options) []kubeletProc {
	btime, ok := bootTime(o)
	if !ok {
		return nil
	}
	entries, err := os.ReadDir(o.path("/proc"))
	if err != nil {
		return nil
	}
	var out []kubeletProc
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		dir := o.path("/proc", e.Name())
		if !isKubelet(dir) {
			continue
		}
		stat, err := os.ReadFile(filepath.Join(dir, "stat"))
		if err != nil {
			continue
		}
		ticks, ok := startTicks(stat)
		if !ok {
			continue
		}
		start := btime.Add(time.Duration(ticks) * time.Second / clockTicks)
		out = append(out, kubeletProc{pid: pid, start: start})
	}
	return out
}

func isKubelet(procDir string) bool {
	if comm, err := os.ReadFile(filepath.Join(procDir, "comm")); err == nil && strings.TrimSpace(string(comm)) == "kubelet" {
		return true
	}
	cmdline, err := os.ReadFile(filepath.Join(procDir, "cmdline"))
	if err != nil || len(cmdline) == 0 {
		return false
	}
	argv0, _, _ := bytes.Cut(cmdline, []byte{0})
	return filepath.Base(string(argv0)) == "kubelet"
}

// startTicks returns field 22 (starttime) of /proc/<pid>/stat. The command name in
// field 2 may hold spaces and parentheses, so fields are counted after its last ')'.
func startTicks(stat []byte) (int64, bool) {
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, false
	}
	fields := strings.Fields(string(stat[i+1:]))
	// fields[0] is field 3 (state), so field 22 is fields[19].
	if len(fields) < 20 {
		return 0, false
	}
	n, err := strconv.ParseInt(fields[19], 10, 64)
	return n, err == nil
}

func bootTime(o Options) (time.Time, bool) {
	b, err := os.ReadFile(o.path("/proc/stat"))
	if err != nil {
		return time.Time{}, false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "btime "); ok {
			n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			if err != nil {
				return time.Time{}, false
			}
			return time.Unix(n, 0), true
		}
	}
	return time.Time{}, false
}
