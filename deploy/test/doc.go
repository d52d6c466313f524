// Package deploytest tests the deployment files in deploy/: the Kubernetes manifests
// (decoded strictly into k8s.io/api types and checked against the config they ship),
// the systemd units (systemd-analyze verify, and a harness that passes sockets and a
// notify socket exactly as systemd does), and the install script.
//
// It is a module of its own so that k8s.io/api stays out of the product's go.mod:
//
//	cd deploy/test && go test ./...
//
// The tests build cmd/nodeagent from the repository root (or use $NODEAGENT_BIN) and
// deploy/test/apiserver (the API server's validation, a module of its own); they need
// systemd-analyze (Debian: systemd), setpriv and unshare (util-linux), strace, and telemetrygen
// from the peers cache (test/peers). Privileged tests run as root and skip otherwise,
// or fail with NODEAGENT_REQUIRE_PRIVILEGED=1.
package deploytest
