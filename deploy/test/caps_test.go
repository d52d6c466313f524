package deploytest

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// cgroup2Root returns the first cgroup2 mount point in /proc/mounts.
func cgroup2Root(t *testing.T) string {
	t.Helper()
	f, err := os.Open("/proc/mounts")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if fields := strings.Fields(sc.Text()); len(fields) > 2 && fields[2] == "cgroup2" {
			return fields[1]
		}
	}
	t.Fatal("no cgroup2 mount in /proc/mounts")
	return ""
}

// setprivArgs turns the unit's CapabilityBoundingSet= and NoNewPrivileges=yes into a
// setpriv command line: as root, the bounding set is then all the process has.
func setprivArgs(caps []string) []string {
	var b strings.Builder
	b.WriteString("-all")
	for _, c := range caps {
		b.WriteString(",+" + strings.ToLower(strings.TrimPrefix(c, "CAP_")))
	}
	return []string{"--bounding-set=" + b.String(), "--inh-caps=-all", "--no-new-privs"}
}

// statusDoc is the part of /status this test reads.
type statusDoc struct {
	Ready  bool `json:"ready"`
	Checks []struct {
		Name   string `json:"name"`
		OK     bool   `json:"ok"`
		Detail string `json:"detail"`
	} `json:"checks"`
}

func getStatus(addr string) (statusDoc, error) {
	var doc statusDoc
	client := &http.Client{Timeout: 3 * time.Second}
	resp, err := client.Get("http://" + addr + "/status")
	if err != nil {
		return doc, err
	}
	defer resp.Body.Close()
	err = json.NewDecoder(resp.Body).Decode(&doc)
	return doc, err
}

// The capabilities nodeagent.service grants are enough to load and attach the
// steering programs, pin them, and clean them up (`run --cleanup`, ExecStopPost=);
// and fewer are not (so the test notices a missing one). Runs the real binary as root
// under setpriv with the unit's CapabilityBoundingSet= and NoNewPrivileges=, on a
// temporary cgroup and a temporary bpffs.
func TestUnitCapabilitiesSuffice(t *testing.T) {
	requireRoot(t)
	if _, err := exec.LookPath("setpriv"); err != nil {
		t.Fatal("setpriv not found: apt-get install util-linux")
	}
	bin := nodeagentBinary(t)
	caps := loadSystemd(t).service.list("Service", "CapabilityBoundingSet")

	for _, tc := range []struct {
		name   string
		caps   []string
		wantOK bool
	}{
		{"unit's set", caps, true},
		{"without CAP_SYS_ADMIN and CAP_BPF", without(caps, "CAP_SYS_ADMIN", "CAP_BPF"), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			cg := filepath.Join(cgroup2Root(t), fmt.Sprintf("natest-deploy-%d-%d", os.Getpid(), time.Now().UnixNano()))
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
			addrs := freeAddrs(t, "health", "proxy", "backend")
			cfg := filepath.Join(dir, "config.yaml")
			os.WriteFile(cfg, []byte(fmt.Sprintf(`node_name: capstest
host_root: /
health: { listen: "%s" }
shutdown_grace: 2s
steering:
  cgroup: %s
  bpffs: %s/nodeagent
proxy:
  listen: ["%s"]
  address_map: { "192.0.2.10": local }
  clusters: { local: { endpoints: ["%s"] } }
`, addrs["health"], cg, bpffs, addrs["proxy"], addrs["backend"])), 0o644)

			run := func(args ...string) *exec.Cmd {
				cmd := exec.Command("setpriv", append(append(setprivArgs(tc.caps), bin), args...)...)
				cmd.Env = cleanEnv()
				return cmd
			}
			agent := run("run", "--config", cfg)
			var out strings.Builder
			agent.Stdout = &lockedWriter{w: &out}
			agent.Stderr = agent.Stdout
			if err := agent.Start(); err != nil {
				t.Fatal(err)
			}
			exited := make(chan struct{})
			go func() { agent.Wait(); close(exited) }()
			defer func() {
				agent.Process.Kill()
				<-exited
				if t.Failed() {
					t.Logf("nodeagent output:\n%s", out.String())
				}
			}()

			var steering string
			var ok bool
			deadline := time.Now().Add(30 * time.Second)
			for time.Now().Before(deadline) && steering == "" {
				doc, err := getStatus(addrs["health"])
				if err == nil {
					for _, c := range doc.Checks {
						if c.Name == "steering" && (c.OK || !tc.wantOK) && c.Detail != "" {
							steering, ok = c.Detail, c.OK
						}
					}
				}
				time.Sleep(200 * time.Millisecond)
			}
			if steering == "" {
				t.Fatalf("no steering check in /status within 30s")
			}
			if ok != tc.wantOK {
				t.Fatalf("steering check ok=%v (%s); want ok=%v with capabilities %v", ok, steering, tc.wantOK, tc.caps)
			}
			if !tc.wantOK {
				return
			}
			pins, _ := filepath.Glob(filepath.Join(bpffs, "nodeagent", "*", "*"))
			if len(pins) == 0 {
				t.Errorf("steering ok but nothing pinned under %s/nodeagent", bpffs)
			}
			// A crash leaves the pins; ExecStopPost= (`run --cleanup`) removes them with the
			// same capabilities.
			agent.Process.Kill()
			<-exited
			if cout, err := run("run", "--cleanup", "--config", cfg).CombinedOutput(); err != nil {
				t.Fatalf("nodeagent run --cleanup under the unit's capabilities: %v\n%s", err, cout)
			}
			if pins, _ := filepath.Glob(filepath.Join(bpffs, "nodeagent", "*", "*")); len(pins) != 0 {
				t.Errorf("after --cleanup, pins remain: %v", pins)
			}
		})
	}
}

func without(list []string, drop ...string) []string {
	var out []string
	for _, x := range list {
		if !contains(drop, x) {
			out = append(out, x)
		}
	}
	return out
}
