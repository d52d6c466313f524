// Package deploytest tests the deployment files in deploy/: the Kubernetes manifests
// (decoded strictly into k8s.io/api types and checked against the config they ship),
// the systemd units (systemd-analyze verify, and a harness that passes sockets and a
// notify socket exactly as systemd does), and the install script.
//
// It is a module of its own so that k8s.io/api stays out of the product's go.mod:
//
//	cd deploy/test && go test ./...
//
// The tests build cmd/nodeagent from the repository root (or use $NODEAGENT_BIN), and
// need systemd-analyze (Debian package systemd) for the unit checks.
package deploytest
