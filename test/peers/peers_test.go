package peers

import (
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// buildScriptTools parses the table between "# BEGIN TOOLS" and "# END TOOLS" in
// test/tools/build.sh.
func buildScriptTools(t *testing.T) []Tool {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "tools", "build.sh"))
	if err != nil {
		t.Fatalf("read build.sh: %v", err)
	}
	s := string(b)
	begin := strings.Index(s, "# BEGIN TOOLS\n")
	end := strings.Index(s, "# END TOOLS\n")
	if begin < 0 || end < begin {
		t.Fatalf("build.sh has no # BEGIN TOOLS ... # END TOOLS block")
	}
	var tools []Tool
	for _, line := range strings.Split(s[begin:end], "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, "TOOLS_TABLE=") || line == "'" {
			continue
		}
		f := strings.Fields(line)
		if len(f) < 3 {
			t.Fatalf("build.sh table line %q: want tool version binary:pkg...", line)
		}
		tl := Tool{Name: f[0], Version: f[1]}
		for _, spec := range f[2:] {
			bin, _, ok := strings.Cut(spec, ":")
			if !ok {
				t.Fatalf("build.sh table line %q: %q is not binary:pkg", line, spec)
			}
			tl.Binaries = append(tl.Binaries, bin)
		}
		tools = append(tools, tl)
	}
	return tools
}

func TestToolsMatchBuildScript(t *testing.T) {
	got := buildScriptTools(t)
	if !reflect.DeepEqual(got, Tools) {
		t.Errorf("build.sh tools = %+v; want peers.Tools %+v (keep both in step)", got, Tools)
	}
}

func TestBuildScriptListsSameTools(t *testing.T) {
	if _, err := exec.LookPath("bash"); err != nil {
		t.Skip("no bash")
	}
	out, err := exec.Command("bash", filepath.Join("..", "tools", "build.sh"), "--list").Output()
	if err != nil {
		t.Fatalf("build.sh --list: %v", err)
	}
	var names []string
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		names = append(names, strings.Fields(line)[0])
	}
	var want []string
	for _, tl := range Tools {
		want = append(want, tl.Name)
	}
	if !reflect.DeepEqual(names, want) {
		t.Errorf("build.sh --list tools = %v; want %v", names, want)
	}
}

func TestLookup(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("NODEAGENT_TOOLS_CACHE", dir)
	if got := Dir(); got != dir {
		t.Fatalf("Dir() = %q; want %q", got, dir)
	}
	built := filepath.Join(dir, "spire-v1.13.3", "spire-agent")
	if err := os.MkdirAll(filepath.Dir(built), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(built, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	notExec := filepath.Join(dir, "jaeger-v1.76.0", "jaeger")
	if err := os.MkdirAll(filepath.Dir(notExec), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(notExec, nil, 0o644); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name     string
		wantPath string
		wantErr  error
	}{
		{"spire-agent", built, nil},
		{"spire-server", "", fs.ErrNotExist},
		{"jaeger", "", fs.ErrNotExist},
		{"kubectl", "", ErrUnknown},
	}
	for _, tc := range tests {
		got, err := Lookup(tc.name)
		if got != tc.wantPath || !errors.Is(err, tc.wantErr) {
			t.Errorf("Lookup(%q) = %q, %v; want %q, %v", tc.name, got, err, tc.wantPath, tc.wantErr)
		}
	}
}

func TestDirDefault(t *testing.T) {
	t.Setenv("NODEAGENT_TOOLS_CACHE", "")
	if got := Dir(); got != DefaultDir {
		t.Errorf("Dir() = %q; want %q", got, DefaultDir)
	}
}

// TestBinariesRun runs every built peer's version or help command.
func TestBinariesRun(t *testing.T) {
	tests := []struct {
		bin  string
		args []string
		want string // in the combined output
	}{
		{"spire-server", []string{"--version"}, "1.13.3"},
		{"spire-agent", []string{"--version"}, "1.13.3"},
		{"jaeger", []string{"version"}, "gitVersion"},
		{"otel-cli", []string{"help"}, "create an OpenTelemetry span"}, // 0.4.5 has no version command
		{"telemetrygen", []string{"--help"}, "traces"},
		{"golangci-lint", []string{"version"}, "2.15.0"},
		{"otelcol", []string{"components"}, "otlp"},
	}
	for _, tc := range tests {
		t.Run(tc.bin, func(t *testing.T) {
			p := Path(t, tc.bin)
			out, err := exec.Command(p, tc.args...).CombinedOutput()
			if err != nil {
				t.Fatalf("%s %v: %v\n%s", tc.bin, tc.args, err, out)
			}
			if !strings.Contains(string(out), tc.want) {
				t.Errorf("%s %v printed %q; want it to contain %q", tc.bin, tc.args, out, tc.want)
			}
		})
	}
}
