package agent

import "runtime/debug"

// version is set at build time: -ldflags "-X github.com/nodeagent/nodeagent/agent.version=v0.1.0".
var version string

// Version returns the build's version: the one stamped at link time, else the module
// version or VCS revision recorded by the Go toolchain, else "devel".
func Version() string {
	if version != "" {
		return version
	}
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return "devel"
	}
	if v := info.Main.Version; v != "" && v != "(devel)" {
		return v
	}
	for _, s := range info.Settings {
		if s.Key == "vcs.revision" && len(s.Value) >= 12 {
			return "devel-" + s.Value[:12]
		}
	}
	return "devel"
}
