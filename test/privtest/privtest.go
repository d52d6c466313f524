// Package privtest gates tests that need root and real kernel features. They skip
// without privileges, and fail instead when NODEAGENT_REQUIRE_PRIVILEGED=1 (CI sets
// it), so a green CI run always means they ran.
package privtest

import (
	"os"
	"testing"
)

// Required reports whether privileged tests must run rather than skip.
func Required() bool { return os.Getenv("NODEAGENT_REQUIRE_PRIVILEGED") == "1" }

// Skip skips t (or fails it, when privileged tests are required) with reason.
func Skip(t testing.TB, reason string) {
	t.Helper()
	if Required() {
		t.Fatalf("privileged test cannot run: %s (NODEAGENT_REQUIRE_PRIVILEGED=1)", reason)
	}
	t.Skip(reason)
}

// Root skips or fails t unless the process runs as root.
func Root(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Skip(t, "needs root")
	}
}
