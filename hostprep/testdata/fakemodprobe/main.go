// Command fakemodprobe stands in for the host's modprobe in hostprep's privileged test:
// it runs chrooted into a temporary host_root, proves it (a marker file only that tree
// has), and "loads" a module by creating its /sys/module entry there, or fails as
// modprobe does for an unknown module.
package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

func main() {
	name := os.Args[len(os.Args)-1]
	if _, err := os.Stat("/fake-host-root"); err != nil {
		fmt.Fprintln(os.Stderr, "fakemodprobe: not chrooted into the fake host root")
		os.Exit(2)
	}
	if name == "nosuch" {
		fmt.Fprintf(os.Stderr, "modprobe: FATAL: Module %s not found in directory /lib/modules/6.18.0-test\n", name)
		os.Exit(1)
	}
	dir := filepath.Join("/sys/module", strings.ReplaceAll(name, "-", "_"))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if err := os.WriteFile(filepath.Join(dir, "initstate"), []byte("live\n"), 0o644); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
