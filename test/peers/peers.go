// Package peers finds the real peer programs that nodeagent's tests run against
// (SPIRE, Jaeger, otel-cli, telemetrygen, an OpenTelemetry Collector, golangci-lint)
// and starts some of them for a test.
//
// The binaries are built from the Go module proxy by test/tools/build.sh into a cache
// outside the clone, one directory per tool and version:
//
//	$NODEAGENT_TOOLS_CACHE/<tool>-<version>/<binary>   (default /var/cache/nodeagent-tools)
//
// A test asks for one with Path, which skips the test when the binary was not built
// (or fails it when NODEAGENT_REQUIRE_PRIVILEGED=1, as CI sets).
package peers

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"testing"

	"github.com/nodeagent/nodeagent/test/privtest"
)

// Tool is one entry of test/tools/build.sh's table: a module built at one version
// into Binaries.
type Tool struct {
	Name     string   // directory prefix in the cache and build.sh's argument
	Version  string   // module version (otelcol: the collector release of test/tools/otelcol/go.mod)
	Binaries []string // programs it provides
}

// Tools is the same table as in test/tools/build.sh (TestToolsMatchBuildScript keeps
// them in step): change a version in both.
var Tools = []Tool{
	{Name: "spire", Version: "v1.13.3", Binaries: []string{"spire-server", "spire-agent"}},
	{Name: "jaeger", Version: "v1.76.0", Binaries: []string{"jaeger"}},
	{Name: "otel-cli", Version: "v0.4.5", Binaries: []string{"otel-cli"}},
	{Name: "telemetrygen", Version: "v0.161.0", Binaries: []string{"telemetrygen"}},
	{Name: "golangci-lint", Version: "v2.15.0", Binaries: []string{"golangci-lint"}},
	{Name: "otelcol", Version: "v0.165.0", Binaries: []string{"otelcol"}},
}

// DefaultDir is the cache root when NODEAGENT_TOOLS_CACHE is unset.
const DefaultDir = "/var/cache/nodeagent-tools"

// ErrUnknown is returned by Lookup for a name that no tool provides.
var ErrUnknown = errors.New("unknown peer binary")

// Dir returns the cache root: $NODEAGENT_TOOLS_CACHE, or DefaultDir.
func Dir() string {
	if d := os.Getenv("NODEAGENT_TOOLS_CACHE"); d != "" {
		return d
	}
	return DefaultDir
}

// ToolOf returns the tool that provides the binary name.
func ToolOf(name string) (Tool, bool) {
	for _, tl := range Tools {
		for _, b := range tl.Binaries {
			if b == name {
				return tl, true
			}
		}
	}
	return Tool{}, false
}

// Lookup returns the absolute path of the built binary name ("spire-server",
// "spire-agent", "jaeger", "otel-cli", "telemetrygen", "otelcol", "golangci-lint").
// It is for programs (benchmarks); tests use Path. The error wraps fs.ErrNotExist when
// the binary was not built, and ErrUnknown for a name no tool provides.
func Lookup(name string) (string, error) {
	tl, ok := ToolOf(name)
	if !ok {
		return "", fmt.Errorf("%w %q", ErrUnknown, name)
	}
	dir, err := filepath.Abs(Dir())
	if err != nil {
		return "", fmt.Errorf("resolve tools cache: %w", err)
	}
	p := filepath.Join(dir, tl.Name+"-"+tl.Version, name)
	st, err := os.Stat(p)
	if err != nil {
		return "", fmt.Errorf("peer %s not built (run test/tools/build.sh %s): %w", name, tl.Name, err)
	}
	if !st.Mode().IsRegular() || st.Mode().Perm()&0o111 == 0 {
		return "", fmt.Errorf("peer %s at %s is not an executable file: %w", name, p, fs.ErrNotExist)
	}
	return p, nil
}

// Path returns the absolute path of the built binary name. When it is missing, t is
// skipped, or failed when NODEAGENT_REQUIRE_PRIVILEGED=1 (CI builds every peer first).
// An unknown name fails t.
func Path(t testing.TB, name string) string {
	t.Helper()
	p, err := Lookup(name)
	if errors.Is(err, ErrUnknown) {
		t.Fatalf("peers.Path: %v", err)
	}
	if err != nil {
		privtest.Skip(t, err.Error())
	}
	return p
}
