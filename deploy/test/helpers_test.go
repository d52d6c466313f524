package deploytest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"
)

// repoRoot is the repository root, two levels above this module.
func repoRoot(t testing.TB) string {
	t.Helper()
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
		t.Fatalf("repository root %s: %v", root, err)
	}
	return root
}

func deployPath(t testing.TB, parts ...string) string {
	return filepath.Join(append([]string{repoRoot(t), "deploy"}, parts...)...)
}

// object is one decoded manifest document.
type object struct {
	file string
	kind string // apiVersion/kind, e.g. "apps/v1/DaemonSet"
	obj  any
}

// kinds maps apiVersion/kind to a constructor of the typed object it decodes into.
var kinds = map[string]func() any{
	"v1/Namespace":      func() any { return &corev1.Namespace{} },
	"v1/ServiceAccount": func() any { return &corev1.ServiceAccount{} },
	"v1/ConfigMap":      func() any { return &corev1.ConfigMap{} },
	"v1/Pod":            func() any { return &corev1.Pod{} },
	"apps/v1/DaemonSet": func() any { return &appsv1.DaemonSet{} },
}

// splitDocs splits a YAML stream at its "---" lines, dropping documents that hold only
// comments or whitespace.
func splitDocs(data []byte) [][]byte {
	var docs [][]byte
	for _, d := range regexp.MustCompile(`(?m)^---\s*$`).Split(string(data), -1) {
		meaningful := false
		for _, l := range strings.Split(d, "\n") {
			if s := strings.TrimSpace(l); s != "" && !strings.HasPrefix(s, "#") {
				meaningful = true
				break
			}
		}
		if meaningful {
			docs = append(docs, []byte(d))
		}
	}
	return docs
}

// decodeStrict decodes one Kubernetes document into its k8s.io/api type: unknown or
// duplicate fields are errors.
func decodeStrict(doc []byte) (string, any, error) {
	var tm metav1.TypeMeta
	if err := yaml.Unmarshal(doc, &tm); err != nil {
		return "", nil, fmt.Errorf("read apiVersion and kind: %w", err)
	}
	kind := tm.APIVersion + "/" + tm.Kind
	newObj, ok := kinds[kind]
	if !ok {
		return kind, nil, fmt.Errorf("unexpected kind %q", kind)
	}
	obj := newObj()
	if err := yaml.UnmarshalStrict(doc, obj); err != nil {
		return kind, nil, err
	}
	return kind, obj, nil
}

// loadManifests decodes every document of every *.yaml file in dir (except skip).
func loadManifests(t testing.TB, dir string, skip ...string) []object {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var out []object
	for _, f := range files {
		base := filepath.Base(f)
		if contains(skip, base) {
			continue
		}
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		docs := splitDocs(data)
		if len(docs) == 0 {
			t.Errorf("%s: no document", base)
		}
		for i, doc := range docs {
			kind, obj, err := decodeStrict(doc)
			if err != nil {
				t.Errorf("%s: document %d: %v", base, i, err)
				continue
			}
			out = append(out, object{file: base, kind: kind, obj: obj})
		}
	}
	return out
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// only returns the single object of type T among objs.
func only[T any](t testing.TB, objs []object) T {
	t.Helper()
	var found []T
	for _, o := range objs {
		if v, ok := o.obj.(T); ok {
			found = append(found, v)
		}
	}
	if len(found) != 1 {
		var zero T
		t.Fatalf("got %d objects of type %T; want 1", len(found), zero)
	}
	return found[0]
}

// envRef matches ${VAR} and ${VAR:-default} as the config file expands them.
var envRef = regexp.MustCompile(`\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}`)

// configRefs lists the variables a config text references, split into those without a
// default (the environment must set them) and those with one.
func configRefs(text string) (required, optional []string) {
	seen := map[string]bool{}
	for _, line := range strings.Split(text, "\n") {
		if i := strings.Index(line, "#"); i >= 0 {
			line = line[:i] // comments may mention ${VAR} for the reader
		}
		for _, m := range envRef.FindAllStringSubmatch(line, -1) {
			key := m[1] + m[2]
			if seen[key] {
				continue
			}
			seen[key] = true
			if m[2] == "" {
				required = append(required, m[1])
			} else {
				optional = append(optional, m[1])
			}
		}
	}
	return required, optional
}

// expand expands ${VAR} and ${VAR:-default} from env the way the config loader does.
func expand(text string, env map[string]string) string {
	return envRef.ReplaceAllStringFunc(text, func(ref string) string {
		m := envRef.FindStringSubmatch(ref)
		if v, ok := env[m[1]]; ok && (v != "" || m[2] == "") {
			return v
		}
		return m[3]
	})
}

// conf is a parsed config file, navigated by dotted key paths.
type conf map[string]any

func parseConf(t testing.TB, text string, env map[string]string) conf {
	t.Helper()
	var c conf
	if err := yaml.Unmarshal([]byte(expand(text, env)), &c); err != nil {
		t.Fatalf("parse config: %v", err)
	}
	return c
}

func (c conf) get(path string) (any, bool) {
	var cur any = map[string]any(c)
	for _, k := range strings.Split(path, ".") {
		m, ok := cur.(map[string]any)
		if !ok {
			return nil, false
		}
		if cur, ok = m[k]; !ok {
			return nil, false
		}
	}
	return cur, true
}

func (c conf) has(path string) bool { _, ok := c.get(path); return ok }

func (c conf) str(t testing.TB, path string) string {
	t.Helper()
	v, ok := c.get(path)
	if !ok {
		t.Fatalf("config has no %s", path)
	}
	s, ok := v.(string)
	if !ok {
		t.Fatalf("config %s is %T; want a string", path, v)
	}
	return s
}

func (c conf) strs(t testing.TB, path string) []string {
	t.Helper()
	v, ok := c.get(path)
	if !ok {
		t.Fatalf("config has no %s", path)
	}
	list, ok := v.([]any)
	if !ok {
		t.Fatalf("config %s is %T; want a list", path, v)
	}
	var out []string
	for _, x := range list {
		out = append(out, fmt.Sprint(x))
	}
	return out
}

func (c conf) duration(t testing.TB, path string) time.Duration {
	t.Helper()
	d, err := time.ParseDuration(c.str(t, path))
	if err != nil {
		t.Fatalf("config %s: %v", path, err)
	}
	return d
}

// size parses a config size such as 256MiB.
func (c conf) size(t testing.TB, path string) int64 {
	t.Helper()
	n, err := parseSize(c.str(t, path))
	if err != nil {
		t.Fatalf("config %s: %v", path, err)
	}
	return n
}

// parseSize parses a byte count with an optional B, KiB, MiB, GiB or TiB suffix — the
// syntax of both the config's sizes and GOMEMLIMIT.
func parseSize(s string) (int64, error) {
	units := []struct {
		suffix string
		mult   int64
	}{{"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}, {"B", 1}}
	mult := int64(1)
	for _, u := range units {
		if strings.HasSuffix(s, u.suffix) {
			s, mult = strings.TrimSuffix(s, u.suffix), u.mult
			break
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("%q is not a size", s)
	}
	return n * mult, nil
}

var (
	buildOnce sync.Once
	builtBin  string
	buildErr  error
)

// nodeagentBinary returns the nodeagent binary: $NODEAGENT_BIN, or cmd/nodeagent built
// once from the repository root.
func nodeagentBinary(t testing.TB) string {
	t.Helper()
	if p := os.Getenv("NODEAGENT_BIN"); p != "" {
		return p
	}
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "nodeagent-deploytest-")
		if err != nil {
			buildErr = err
			return
		}
		builtBin = filepath.Join(dir, "nodeagent")
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, "go", "build", "-o", builtBin, "./cmd/nodeagent")
		cmd.Dir = repoRoot(t)
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build ./cmd/nodeagent: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return builtBin
}

func TestMain(m *testing.M) {
	code := m.Run()
	if builtBin != "" {
		os.RemoveAll(filepath.Dir(builtBin))
	}
	os.Exit(code)
}

// checkResult is the part of `nodeagent check --output json` (the /status document)
// these tests read.
type checkResult struct {
	Node   string `json:"node"`
	Ready  bool   `json:"ready"`
	Checks []struct {
		Name     string `json:"name"`
		OK       bool   `json:"ok"`
		Required bool   `json:"required"`
		Detail   string `json:"detail"`
	} `json:"checks"`
}

// runCheck runs `nodeagent check --config file --output json` with env added to this
// process's environment, and returns the exit code, the parsed document (nil when the
// exit code is 2) and stderr.
func runCheck(t testing.TB, file string, env map[string]string) (int, *checkResult, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, nodeagentBinary(t), "check", "--config", file, "--output", "json")
	cmd.Env = os.Environ()
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		code = ee.ExitCode()
	case err != nil:
		t.Fatalf("run nodeagent check: %v", err)
	}
	if code == 2 {
		return code, nil, stderr.String()
	}
	var res checkResult
	if err := json.Unmarshal(stdout.Bytes(), &res); err != nil {
		t.Fatalf("nodeagent check --output json (exit %d): %v\nstdout:\n%s\nstderr:\n%s", code, err, stdout.String(), stderr.String())
	}
	return code, &res, stderr.String()
}

// requireRoot skips a privileged test without root, and fails it instead when
// NODEAGENT_REQUIRE_PRIVILEGED=1 — test/privtest's rule, repeated here so that this
// module does not depend on the product module (whose go.mod would then have to stay
// in step with this go.sum).
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("NODEAGENT_REQUIRE_PRIVILEGED") == "1" {
		t.Fatal("privileged test cannot run: not root (NODEAGENT_REQUIRE_PRIVILEGED=1)")
	}
	t.Skip("needs root")
}

// peerPath finds a peer binary named like its tool (telemetrygen) in the tools cache
// that test/peers fills
// ($NODEAGENT_TOOLS_CACHE or /var/cache/nodeagent-tools, as <tool>-<version>/<name>),
// skipping the test when it is missing (failing under NODEAGENT_REQUIRE_PRIVILEGED=1,
// as CI builds every peer first).
func peerPath(t *testing.T, name string) string {
	t.Helper()
	dir := os.Getenv("NODEAGENT_TOOLS_CACHE")
	if dir == "" {
		dir = "/var/cache/nodeagent-tools"
	}
	matches, _ := filepath.Glob(filepath.Join(dir, name+"-*", name))
	sort.Strings(matches)
	if len(matches) == 0 {
		msg := fmt.Sprintf("peer %s not built in %s (run test/tools/build.sh %s)", name, dir, name)
		if os.Getenv("NODEAGENT_REQUIRE_PRIVILEGED") == "1" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	return matches[len(matches)-1]
}
