package deploytest

import (
	"bufio"
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"
)

// unit is a parsed systemd unit file: section -> key -> values in order (a key given
// several times, like ListenStream=, keeps every value; an empty assignment resets).
type unit struct {
	file     string
	sections map[string]map[string][]string
	comments string // every comment line, for "is each privilege explained" checks
}

func parseUnit(t testing.TB, file string) *unit {
	t.Helper()
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	u := &unit{file: filepath.Base(file), sections: map[string]map[string][]string{}}
	var section string
	var comments strings.Builder
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "":
		case strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
			comments.WriteString(line + "\n")
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = line[1 : len(line)-1]
			if u.sections[section] == nil {
				u.sections[section] = map[string][]string{}
			}
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || section == "" {
				t.Fatalf("%s:%d: %q is not key=value in a section", file, n, line)
			}
			k, v = strings.TrimSpace(k), strings.TrimSpace(v)
			if v == "" {
				u.sections[section][k] = nil
				continue
			}
			u.sections[section][k] = append(u.sections[section][k], v)
		}
	}
	u.comments = comments.String()
	return u
}

// get returns the last value of key in section ("" when unset).
func (u *unit) get(section, key string) string {
	vs := u.sections[section][key]
	if len(vs) == 0 {
		return ""
	}
	return vs[len(vs)-1]
}

// list returns every space-separated word of every value of key in section.
func (u *unit) list(section, key string) []string {
	var out []string
	for _, v := range u.sections[section][key] {
		out = append(out, strings.Fields(v)...)
	}
	return out
}

// systemdUnits holds the service and its socket units, parsed.
type systemdUnits struct {
	service *unit
	sockets map[string]*unit // by file name
	cfg     conf             // deploy/systemd/config.yaml
	cfgText string
}

func loadSystemd(t *testing.T) *systemdUnits {
	t.Helper()
	s := &systemdUnits{service: parseUnit(t, deployPath(t, "systemd", "nodeagent.service")), sockets: map[string]*unit{}}
	files, _ := filepath.Glob(deployPath(t, "systemd", "*.socket"))
	for _, f := range files {
		s.sockets[filepath.Base(f)] = parseUnit(t, f)
	}
	data, err := os.ReadFile(deployPath(t, "systemd", "config.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	s.cfgText = string(data)
	s.cfg = parseConf(t, s.cfgText, nil)
	return s
}

// fdNames returns the socket units in the order of the service's Sockets= and the
// FileDescriptorName= of each: the LISTEN_FDNAMES systemd would pass.
func (s *systemdUnits) fdNames(t *testing.T) (units, names []string) {
	t.Helper()
	for _, name := range s.service.list("Service", "Sockets") {
		sock, ok := s.sockets[name]
		if !ok {
			t.Fatalf("Sockets= names %s, which is not in deploy/systemd", name)
		}
		units = append(units, name)
		names = append(names, sock.get("Socket", "FileDescriptorName"))
	}
	return units, names
}

const (
	unitBinary = "/usr/local/bin/nodeagent"
	unitConfig = "/etc/nodeagent/config.yaml"
)

func TestServiceUnit(t *testing.T) {
	t.Parallel()
	s := loadSystemd(t)
	u := s.service
	for _, kv := range []struct{ key, want string }{
		{"Type", "notify"},
		{"Restart", "on-failure"},
		{"ExecStart", unitBinary + " run --config " + unitConfig},
		{"ExecStopPost", unitBinary + " run --cleanup --config " + unitConfig},
		{"StateDirectory", "nodeagent"},
		{"RuntimeDirectory", "nodeagent"},
		{"NotifyAccess", "main"},
		{"RestartPreventExitStatus", "2"},
	} {
		if got := u.get("Service", kv.key); got != kv.want {
			t.Errorf("%s=%q; want %q", kv.key, got, kv.want)
		}
	}
	wd, err := time.ParseDuration(u.get("Service", "WatchdogSec"))
	if err != nil || wd <= 0 {
		t.Errorf("WatchdogSec=%q; want a positive duration", u.get("Service", "WatchdogSec"))
	}
	stop, err := time.ParseDuration(u.get("Service", "TimeoutStopSec"))
	need := s.cfg.duration(t, "shutdown_grace") + s.cfg.duration(t, "proxy.drain_timeout")
	if err != nil || stop < need {
		t.Errorf("TimeoutStopSec=%q; want at least shutdown_grace + proxy.drain_timeout = %v", u.get("Service", "TimeoutStopSec"), need)
	}
	// otlp.queue.dir is under the StateDirectory= the unit creates.
	if q := s.cfg.str(t, "otlp.queue.dir"); !within(q, "/var/lib/"+u.get("Service", "StateDirectory")) {
		t.Errorf("otlp.queue.dir %s is not under StateDirectory=/var/lib/%s", q, u.get("Service", "StateDirectory"))
	}
	if hr := s.cfg.str(t, "host_root"); hr != "/" {
		t.Errorf("host_root = %q in the systemd config; want /", hr)
	}

	// The smallest capability set, each explained in a comment.
	caps := u.list("Service", "CapabilityBoundingSet")
	sort.Strings(caps)
	want := []string{"CAP_BPF", "CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_SYS_MODULE"}
	if strings.Join(caps, " ") != strings.Join(want, " ") {
		t.Errorf("CapabilityBoundingSet=%v; want %v", caps, want)
	}
	for _, c := range caps {
		if !strings.Contains(u.comments, "#  "+c+" ") {
			t.Errorf("%s has no comment line explaining it (\"#  %s ...\")", c, c)
		}
	}
	if u.get("Service", "User") != "" || u.get("Service", "DynamicUser") != "" {
		t.Errorf("the unit sets User= or DynamicUser=; nodeagent runs as root with a bounded capability set")
	}
	// Hardening that would break it (see the comments in the unit).
	for _, key := range []string{"ProtectSystem", "ProtectKernelTunables", "ProtectKernelModules", "PrivateNetwork", "PrivateTmp", "PrivateMounts", "ProtectControlGroups", "PrivateUsers", "ProtectProc", "ProcSubset"} {
		if v := u.get("Service", key); v != "" && v != "no" && v != "false" && v != "default" {
			t.Errorf("%s=%s: breaks nodeagent (see the unit's comments)", key, v)
		}
	}
	for _, key := range []string{"NoNewPrivileges", "RestrictSUIDSGID", "LockPersonality", "MemoryDenyWriteExecute", "RestrictNamespaces"} {
		if v := u.get("Service", key); v != "yes" {
			t.Errorf("%s=%q; want yes", key, v)
		}
	}
	filter := u.list("Service", "SystemCallFilter")
	for _, sys := range []string{"bpf", "@module", "@mount"} {
		if !contains(filter, sys) {
			t.Errorf("SystemCallFilter=%v lacks %s, which nodeagent needs", filter, sys)
		}
	}
	families := u.list("Service", "RestrictAddressFamilies")
	for _, f := range []string{"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"} {
		if !contains(families, f) {
			t.Errorf("RestrictAddressFamilies=%v lacks %s", families, f)
		}
	}
	if got := u.get("Install", "WantedBy"); got != "multi-user.target" {
		t.Errorf("WantedBy=%q; want multi-user.target", got)
	}
}

func TestSocketUnits(t *testing.T) {
	t.Parallel()
	s := loadSystemd(t)
	units, names := s.fdNames(t)
	wantNames := map[string]string{ // FileDescriptorName -> the config key it serves
		"health":    "health.listen",
		"proxy":     "proxy.listen",
		"otlp-grpc": "otlp.grpc_listen",
		"otlp-http": "otlp.http_listen",
	}
	if len(units) != len(s.sockets) {
		t.Errorf("Sockets=%v; want every socket unit in deploy/systemd (%d)", units, len(s.sockets))
	}
	also := s.service.list("Install", "Also")
	sort.Strings(also)
	sortedUnits := append([]string(nil), units...)
	sort.Strings(sortedUnits)
	if strings.Join(also, " ") != strings.Join(sortedUnits, " ") {
		t.Errorf("Also=%v; want the socket units %v, so enabling the service enables them", also, sortedUnits)
	}
	seen := map[string]bool{}
	for i, file := range units {
		sock := s.sockets[file]
		name := names[i]
		key, ok := wantNames[name]
		if !ok {
			t.Errorf("%s: FileDescriptorName=%q; want one of health, proxy, otlp-grpc, otlp-http", file, name)
			continue
		}
		if seen[name] {
			t.Errorf("%s: FileDescriptorName=%q is used twice", file, name)
		}
		seen[name] = true
		if got := sock.get("Socket", "Service"); got != "nodeagent.service" {
			t.Errorf("%s: Service=%q; want nodeagent.service", file, got)
		}
		if a := sock.get("Socket", "Accept"); a != "" && a != "no" && a != "false" {
			t.Errorf("%s: Accept=%s; want no (nodeagent accepts itself)", file, a)
		}
		listens := sock.sections["Socket"]["ListenStream"]
		var want []string
		if key == "proxy.listen" {
			want = s.cfg.strs(t, key)
		} else {
			want = []string{s.cfg.str(t, key)}
		}
		if strings.Join(listens, " ") != strings.Join(want, " ") {
			t.Errorf("%s: ListenStream=%v; want %v, the config's %s", file, listens, want, key)
		}
		if got := sock.get("Install", "WantedBy"); got != "sockets.target" {
			t.Errorf("%s: WantedBy=%q; want sockets.target", file, got)
		}
	}
	for name := range wantNames {
		if !seen[name] {
			t.Errorf("no socket unit with FileDescriptorName=%s", name)
		}
	}
}

// systemdAnalyze returns the path of systemd-analyze, failing the test when it is
// missing: CI installs Debian's systemd package for it.
func systemdAnalyze(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Fatal("systemd-analyze not found: apt-get install systemd")
	}
	return p
}

// install runs deploy/systemd/install.sh DESTDIR PREFIX BINARY (as `make install`
// does) with env added (UNITDIR, SYSCONFDIR).
func install(t *testing.T, destdir, prefix, bin string, env ...string) string {
	t.Helper()
	cmd := exec.Command("sh", deployPath(t, "systemd", "install.sh"), destdir, prefix, bin)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("install.sh %v: %v\n%s", env, err, out)
	}
	return string(out)
}

// fakeBinary writes an executable stand-in for nodeagent (systemd-analyze only needs
// ExecStart's binary to exist).
func fakeBinary(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "nodeagent")
	if err := os.WriteFile(p, []byte("#!/bin/sh\nexit 0\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

// verify runs systemd-analyze verify on the given unit files and returns its output:
// systemd-analyze exits 0 on many problems it reports (an unparsable value is
// "ignored"), so any output at all is a finding.
func verify(t *testing.T, files ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	args := append([]string{"verify", "--man=no"}, files...)
	cmd := exec.CommandContext(ctx, systemdAnalyze(t), args...)
	cmd.Env = append(os.Environ(), "SYSTEMD_LOG_COLOR=0")
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

func TestSystemdAnalyzeVerify(t *testing.T) {
	t.Parallel()
	// Installed as an operator would (PREFIX and SYSCONFDIR in a temp dir, so that
	// ExecStart's binary exists where the unit says).
	dir := t.TempDir()
	prefix, etc := filepath.Join(dir, "usr"), filepath.Join(dir, "etc")
	install(t, "", prefix, fakeBinary(t), "SYSCONFDIR="+etc)
	unitDir := filepath.Join(prefix, "lib", "systemd", "system")
	files, _ := filepath.Glob(filepath.Join(unitDir, "nodeagent*"))
	if len(files) != 5 {
		t.Fatalf("installed units %v; want the service and 4 sockets", files)
	}
	out, err := verify(t, files...)
	if err != nil || out != "" {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}

	// The same check finds a broken unit: a misspelt value is only a warning to systemd.
	svc := filepath.Join(unitDir, "nodeagent.service")
	data, _ := os.ReadFile(svc)
	broken := filepath.Join(t.TempDir(), "nodeagent.service")
	os.WriteFile(broken, bytes.Replace(data, []byte("Type=notify"), []byte("Type=notfy"), 1), 0o644)
	if out, _ := verify(t, broken); !strings.Contains(out, "notfy") {
		t.Errorf("systemd-analyze verify on Type=notfy printed %q; want a complaint", out)
	}
}

func TestInstallScript(t *testing.T) {
	t.Parallel()
	bin := fakeBinary(t)
	dest := t.TempDir()
	out := install(t, dest, "/usr", bin)
	if strings.Contains(out, "daemon-reload") {
		t.Errorf("install with DESTDIR suggests daemon-reload: %q", out)
	}
	for _, f := range []struct {
		path string
		mode os.FileMode
	}{
		{"usr/bin/nodeagent", 0o755},
		{"usr/lib/systemd/system/nodeagent.service", 0o644},
		{"usr/lib/systemd/system/nodeagent-proxy.socket", 0o644},
		{"usr/lib/systemd/system/nodeagent-health.socket", 0o644},
		{"usr/lib/systemd/system/nodeagent-otlp-grpc.socket", 0o644},
		{"usr/lib/systemd/system/nodeagent-otlp-http.socket", 0o644},
		{"etc/nodeagent/config.yaml", 0o644},
	} {
		st, err := os.Stat(filepath.Join(dest, f.path))
		if err != nil {
			t.Errorf("install: %v", err)
			continue
		}
		if st.Mode().Perm() != f.mode {
			t.Errorf("%s mode %v; want %v", f.path, st.Mode().Perm(), f.mode)
		}
	}
	svc, _ := os.ReadFile(filepath.Join(dest, "usr/lib/systemd/system/nodeagent.service"))
	for _, want := range []string{
		"ExecStart=/usr/bin/nodeagent run --config /etc/nodeagent/config.yaml\n",
		"ExecStopPost=/usr/bin/nodeagent run --cleanup --config /etc/nodeagent/config.yaml\n",
	} {
		if !bytes.Contains(svc, []byte(want)) {
			t.Errorf("installed service lacks %q", want)
		}
	}
	if bytes.Contains(svc, []byte("/usr/local/bin")) {
		t.Errorf("installed service with PREFIX=/usr still names /usr/local/bin")
	}
	shipped, _ := os.ReadFile(deployPath(t, "systemd", "config.yaml"))
	conf := filepath.Join(dest, "etc/nodeagent/config.yaml")
	if got, _ := os.ReadFile(conf); !bytes.Equal(got, shipped) {
		t.Errorf("installed config differs from deploy/systemd/config.yaml")
	}

	// A second install keeps the operator's config.
	mine := []byte("# edited by the operator\n")
	if err := os.WriteFile(conf, mine, 0o600); err != nil {
		t.Fatal(err)
	}
	out = install(t, dest, "/usr", bin)
	if got, _ := os.ReadFile(conf); !bytes.Equal(got, mine) {
		t.Errorf("second install overwrote the existing config: %q", got)
	}
	if !strings.Contains(out, "kept the existing") {
		t.Errorf("second install did not say it kept the config: %q", out)
	}

	// PREFIX /usr/local (make's default; also what an empty PREFIX means), with the
	// units where systemd looks for local ones.
	dest2 := t.TempDir()
	install(t, dest2, "", bin)
	for _, p := range []string{"usr/local/bin/nodeagent", "usr/local/lib/systemd/system/nodeagent.service"} {
		if _, err := os.Stat(filepath.Join(dest2, p)); err != nil {
			t.Errorf("default PREFIX: %v", err)
		}
	}
}

// The systemd config is valid for the binary (exit 0 or 1 on this machine, never 2).
func TestSystemdConfigPassesCheck(t *testing.T) {
	t.Parallel()
	code, res, stderr := runCheck(t, deployPath(t, "systemd", "config.yaml"), nil)
	if code == 2 {
		t.Fatalf("nodeagent check exit 2: deploy/systemd/config.yaml is invalid:\n%s", stderr)
	}
	if code != 0 && code != 1 {
		t.Fatalf("nodeagent check exit %d; want 0 or 1\n%s", code, stderr)
	}
	if res.Node == "" {
		t.Errorf("check node is empty; want the hostname")
	}
}
