package deploytest

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// The DaemonSet runs without hostPID and still reads the node's processes (the
// hugepages check looks for the kubelet's start time under host_root/proc). That rests
// on a kernel fact this test checks: a recursive bind of the node's / (the /host mount)
// carries the node's procfs mount, and a procfs mount shows the PID namespace it was
// mounted in, whatever namespace the reader is in. Emulated with unshare: a new PID and
// mount namespace (the pod without hostPID) with its own /proc, the node's / bound at
// a directory, and a process named kubelet in the node's namespace.
func TestHostProcShowsNodeProcessesWithoutHostPID(t *testing.T) {
	requireRoot(t)
	if _, err := exec.LookPath("unshare"); err != nil {
		t.Fatal("unshare not found: apt-get install util-linux")
	}
	dir := t.TempDir()
	kubelet := filepath.Join(dir, "kubelet")
	sleep, err := exec.LookPath("sleep")
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(sleep)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(kubelet, data, 0o755); err != nil {
		t.Fatal(err)
	}
	k := exec.Command(kubelet, "120")
	if err := k.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { k.Process.Kill(); k.Wait() }()
	pid := strconv.Itoa(k.Process.Pid)

	host := filepath.Join(dir, "host")
	os.Mkdir(host, 0o755)
	// In the pod: its own /proc, the node's / read-only at $H (as the DaemonSet's
	// host-root mount). Print what each procfs shows of the "kubelet".
	script := `set -e
mount --make-rprivate /
mount --rbind / "$H"
mount -o remount,bind,ro "$H"
mount -t proc proc /proc
echo "own=$(ls /proc | grep -c '^[0-9]*$')"
echo "own_kubelet=$(cat /proc/$KPID/comm 2>/dev/null || echo none)"
echo "host_kubelet=$(cat "$H/proc/$KPID/comm" 2>/dev/null || echo none)"
echo "host_stat=$(cut -d' ' -f22 "$H/proc/$KPID/stat" 2>/dev/null || echo none)"
`
	cmd := exec.Command("unshare", "--pid", "--fork", "--mount", "--propagation", "private", "sh", "-c", script)
	cmd.Env = append(os.Environ(), "H="+host, "KPID="+pid)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("unshare: %v\n%s", err, out)
	}
	got := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if k, v, ok := strings.Cut(line, "="); ok {
			got[k] = v
		}
	}
	if n, _ := strconv.Atoi(got["own"]); n == 0 || n > 5 {
		t.Errorf("the pod's own /proc shows %s processes; want only its own few (a new PID namespace)", got["own"])
	}
	if got["own_kubelet"] != "none" {
		t.Errorf("the pod's own /proc shows the node's pid %s (%s); want it hidden without hostPID", pid, got["own_kubelet"])
	}
	if got["host_kubelet"] != "kubelet" {
		t.Errorf("host_root/proc/%s/comm = %q; want kubelet: the node's procfs through the / bind", pid, got["host_kubelet"])
	}
	if _, err := strconv.ParseUint(got["host_stat"], 10, 64); err != nil {
		t.Errorf("host_root/proc/%s/stat start time = %q; want clock ticks since boot", pid, got["host_stat"])
	}
}
