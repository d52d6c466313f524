// Package e2e holds end-to-end tests of the real nodeagent binary: it is built
// once, started with `nsenter --net` inside a test network namespace, and steers
// connections of helper processes placed in a temporary cgroup v2 directory to
// its real proxy, with its programs pinned in a temporary bpffs mount.
//
// The tests are privileged (test/privtest): they skip without root, and fail
// instead when NODEAGENT_REQUIRE_PRIVILEGED=1. Every namespace, cgroup, mount
// and process they make is removed when the test ends, pass or fail. Nothing
// is dialled outside the test namespaces, which have no route out.
package e2e
