package deploytest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// apiserverResult is one line of the apiserver-validate program (deploy/test/apiserver).
type apiserverResult struct {
	File       string   `json:"file"`
	Kind       string   `json:"kind"`
	Name       string   `json:"name"`
	Errors     []string `json:"errors"`
	Baseline   []string `json:"baseline"`
	Restricted []string `json:"restricted"`
}

// apiserverValidate builds deploy/test/apiserver (its own module: k8s.io/kubernetes
// stays out of this one) and runs it on files.
func apiserverValidate(t *testing.T, files ...string) (map[string]apiserverResult, int) {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "apiserver-validate")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	build := exec.CommandContext(ctx, "go", "build", "-o", bin, ".")
	build.Dir = filepath.Join(repoRoot(t), "deploy", "test", "apiserver")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build deploy/test/apiserver: %v\n%s", err, out)
	}
	cmd := exec.CommandContext(ctx, bin, files...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	if code > 1 {
		t.Fatalf("apiserver-validate exit %d: %s", code, stderr.String())
	}
	results := map[string]apiserverResult{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var r apiserverResult
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatalf("apiserver-validate output %q: %v", sc.Text(), err)
		}
		results[filepath.Base(r.File)] = r
	}
	return results, code
}

// The manifests pass the API server's own validation (k8s.io/kubernetes at the
// version of k8s.io/api), and Pod Security Admission asks of each what we claim: the
// agent needs the privileged level; the mapped-address workload is "restricted"; the
// OTLP workload is "restricted" but for its hostPath volume.
func TestAPIServerAdmitsManifests(t *testing.T) {
	t.Parallel()
	var files []string
	for _, glob := range []string{"kubernetes/*.yaml", "kubernetes/uninstall/*.yaml", "examples/*.yaml"} {
		matches, _ := filepath.Glob(deployPath(t, glob))
		for _, f := range matches {
			if b := filepath.Base(f); b != "kustomization.yaml" && b != "local.yaml" {
				files = append(files, f)
			}
		}
	}
	res, code := apiserverValidate(t, files...)
	if len(res) != len(files) {
		t.Errorf("validated %d documents; want %d", len(res), len(files))
	}
	for name, r := range res {
		for _, e := range r.Errors {
			t.Errorf("%s: the API server would reject %s %s: %s", name, r.Kind, r.Name, e)
		}
	}
	if code != 0 && !t.Failed() {
		t.Errorf("apiserver-validate exit %d with no errors listed", code)
	}

	if r := res["daemonset.yaml"]; !anyContains(r.Baseline, "privileged") {
		t.Errorf("DaemonSet baseline findings %q; want it to need the privileged level", r.Baseline)
	}
	if r := res["mapped-address-workload.yaml"]; len(r.Baseline)+len(r.Restricted) != 0 {
		t.Errorf("mapped-address workload: baseline %q, restricted %q; want none (it needs no privilege)", r.Baseline, r.Restricted)
	}
	r := res["otlp-workload.yaml"]
	for level, found := range map[string][]string{"baseline": r.Baseline, "restricted": r.Restricted} {
		if len(found) != 1 || !strings.Contains(found[0], "hostPath") {
			t.Errorf("otlp workload %s findings %q; want only its hostPath volume", level, found)
		}
	}

	// The validation is real: an unprivileged copy of the DaemonSet is rejected for its
	// Bidirectional mounts.
	data, err := os.ReadFile(deployPath(t, "kubernetes", "daemonset.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	bad := filepath.Join(t.TempDir(), "unprivileged.yaml")
	os.WriteFile(bad, bytes.Replace(data, []byte("privileged: true"), []byte("privileged: false"), 1), 0o644)
	res, code = apiserverValidate(t, bad)
	if code != 1 || !anyContains(res["unprivileged.yaml"].Errors, "Bidirectional") {
		t.Errorf("unprivileged DaemonSet: exit %d, errors %q; want a Bidirectional rejection", code, res["unprivileged.yaml"].Errors)
	}
}

func anyContains(list []string, s string) bool {
	for _, x := range list {
		if strings.Contains(x, s) {
			return true
		}
	}
	return false
}
