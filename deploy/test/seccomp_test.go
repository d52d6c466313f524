package deploytest

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"
)

// syscallGroups parses `systemd-analyze syscall-filter` into group -> members.
func syscallGroups(t *testing.T) map[string][]string {
	t.Helper()
	out, err := exec.Command(systemdAnalyze(t), "syscall-filter").Output()
	if err != nil {
		t.Fatalf("systemd-analyze syscall-filter: %v", err)
	}
	groups := map[string][]string{}
	var cur string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := sc.Text()
		s := strings.TrimSpace(line)
		switch {
		case s == "" || strings.HasPrefix(s, "#"):
		case !strings.HasPrefix(line, " ") && strings.HasPrefix(s, "@"):
			cur = s
		case cur != "":
			groups[cur] = append(groups[cur], s)
		}
	}
	return groups
}

// expandFilter turns SystemCallFilter= entries (groups and names) into system calls.
func expandFilter(groups map[string][]string, entries []string) map[string]bool {
	out := map[string]bool{}
	var add func(string)
	add = func(e string) {
		if !strings.HasPrefix(e, "@") {
			out[e] = true
			return
		}
		for _, m := range groups[e] {
			add(m)
		}
	}
	for _, e := range entries {
		add(e)
	}
	return out
}

// Every system call and socket family nodeagent uses — running every subsystem,
// reloading, stopping, `run --cleanup` and `check` — is allowed by the unit's
// SystemCallFilter= and RestrictAddressFamilies=, and it creates no namespace
// (RestrictNamespaces=yes). systemd is not PID 1 here, so the calls are traced with
// strace and compared with the filter as systemd-analyze expands it. (modprobe's own
// calls are not traced: hostprep runs in check mode, nothing is loaded.)
func TestUnitSyscallFilterCoversNodeagent(t *testing.T) {
	requireRoot(t)
	if _, err := exec.LookPath("strace"); err != nil {
		t.Fatal("strace not found: apt-get install strace")
	}
	bin := nodeagentBinary(t)
	unit := loadSystemd(t).service
	allowed := expandFilter(syscallGroups(t), unit.list("Service", "SystemCallFilter"))
	if len(allowed) < 100 {
		t.Fatalf("SystemCallFilter=%v expands to %d calls; the groups were not parsed", unit.list("Service", "SystemCallFilter"), len(allowed))
	}
	families := map[string]bool{}
	for _, f := range unit.list("Service", "RestrictAddressFamilies") {
		families[f] = true
	}

	dir := t.TempDir()
	cg := filepath.Join(cgroup2Root(t), fmt.Sprintf("natest-deploy-sc-%d", os.Getpid()))
	if err := os.Mkdir(cg, 0o755); err != nil {
		t.Fatalf("create cgroup: %v", err)
	}
	t.Cleanup(func() { os.Remove(cg) })
	bpffs := filepath.Join(dir, "bpffs")
	os.Mkdir(bpffs, 0o700)
	if err := syscall.Mount("bpf", bpffs, "bpf", 0, "mode=0700"); err != nil {
		t.Fatalf("mount bpffs: %v", err)
	}
	t.Cleanup(func() { syscall.Unmount(bpffs, syscall.MNT_DETACH) })
	addrs := freeAddrs(t, "health", "proxy", "backend", "otlp-grpc", "otlp-http")
	cfg := filepath.Join(dir, "config.yaml")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`node_name: sc
host_root: /
health: { listen: "%s" }
shutdown_grace: 2s
hostprep:
  mode: check
  hugepages: { count: 0 }
  modules: [vfio-pci]
  bpffs: %s
uplink: { interface: lo, required: false }
spire: { socket: %s/spire/api.sock }
steering:
  cgroup: %s
  bpffs: %s/nodeagent
proxy:
  listen: ["%s"]
  address_map: { "192.0.2.10": local }
  clusters: { local: { endpoints: ["%s"] } }
otlp:
  grpc_listen: "%s"
  http_listen: "%s"
  exporter: { protocol: file, path: %s/spans.jsonl }
  max_request_size: 4MiB
  queue: { dir: %s/queue, max_bytes: 16MiB }
`, addrs["health"], bpffs, dir, cg, bpffs, addrs["proxy"], addrs["backend"], addrs["otlp-grpc"], addrs["otlp-http"], dir, dir)), 0o644)

	trace := func(name string, args ...string) *exec.Cmd {
		return exec.Command("strace", append([]string{"-f", "-qq", "-o", filepath.Join(dir, "trace."+name), bin}, args...)...)
	}
	notify := newNotifySocket(t)
	agent := trace("run", "run", "--config", cfg)
	agent.Env = append(cleanEnv(), "NOTIFY_SOCKET="+notify.path)
	var out bytes.Buffer
	agent.Stdout, agent.Stderr = &out, &out
	if err := agent.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { agent.Wait(); close(exited) }()
	defer func() {
		agent.Process.Kill()
		<-exited
	}()
	// strace's child is nodeagent; its notifications carry nodeagent's pid.
	var pid int
	for deadline := time.Now().Add(30 * time.Second); pid == 0 && time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		for _, n := range notify.all() {
			if strings.HasPrefix(n.text, "STATUS=") {
				pid = n.pid
			}
		}
	}
	if pid == 0 {
		t.Fatalf("no STATUS= from nodeagent under strace\n%s", out.String())
	}
	var steering string
	for deadline := time.Now().Add(30 * time.Second); steering == "" && time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		if doc, err := getStatus(addrs["health"]); err == nil {
			for _, c := range doc.Checks {
				if c.Name == "steering" && c.OK {
					steering = c.Detail
				}
			}
		}
	}
	if steering == "" {
		t.Errorf("steering never attached under strace; the trace misses the BPF calls\n%s", out.String())
	}
	checkServed(t, map[string]string{"health": addrs["health"], "proxy": addrs["proxy"], "otlp-grpc": addrs["otlp-grpc"], "otlp-http": addrs["otlp-http"]})
	syscall.Kill(pid, syscall.SIGHUP)
	time.Sleep(500 * time.Millisecond)
	syscall.Kill(pid, syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(20 * time.Second):
		t.Fatal("nodeagent did not stop on SIGTERM")
	}
	for _, args := range [][]string{{"run", "--cleanup", "--config", cfg}, {"check", "--config", cfg}} {
		c := trace(args[0]+args[1], args...)
		if o, err := c.CombinedOutput(); err != nil && !strings.HasPrefix(args[0], "check") {
			t.Fatalf("nodeagent %v: %v\n%s", args, err, o)
		}
	}

	callRE := regexp.MustCompile(`^(?:\d+\s+)?([a-z_0-9]+)\(`)
	familyRE := regexp.MustCompile(`socket\((AF_[A-Z0-9]+)`)
	nsRE := regexp.MustCompile(`^(?:\d+\s+)?(unshare|setns)\(|CLONE_NEW`)
	used, badFamilies, nsCalls := map[string]bool{}, map[string]bool{}, []string{}
	files, _ := filepath.Glob(filepath.Join(dir, "trace.*"))
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(data), "\n") {
			if m := callRE.FindStringSubmatch(line); m != nil {
				used[m[1]] = true
			}
			if m := familyRE.FindStringSubmatch(line); m != nil && !families[m[1]] {
				badFamilies[m[1]] = true
			}
			if nsRE.MatchString(line) {
				nsCalls = append(nsCalls, line)
			}
		}
	}
	if !used["bpf"] || !used["accept4"] {
		t.Fatalf("the trace has no bpf or accept4 calls: it did not see nodeagent work (%d calls)", len(used))
	}
	var denied []string
	for c := range used {
		if !allowed[c] {
			denied = append(denied, c)
		}
	}
	sort.Strings(denied)
	if len(denied) > 0 {
		t.Errorf("nodeagent calls %v, which SystemCallFilter=%v denies (EPERM)", denied, unit.list("Service", "SystemCallFilter"))
	}
	for f := range badFamilies {
		t.Errorf("nodeagent opens %s sockets, which RestrictAddressFamilies= denies", f)
	}
	if len(nsCalls) > 0 {
		t.Errorf("nodeagent creates or joins namespaces, which RestrictNamespaces=yes denies: %q", nsCalls)
	}
	t.Logf("%d distinct system calls traced, all allowed", len(used))
}
