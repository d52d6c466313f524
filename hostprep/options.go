package hostprep

import (
	"path/filepath"
	"slices"
	"time"
)

// Mode says whether hostprep changes the host or only looks at it.
type Mode string

const (
	// ModeApply sets the hugepage pool, loads modules, writes the persistent files,
	// mounts bpffs (and turns on vfio no-IOMMU mode when allowed), then verifies.
	ModeApply Mode = "apply"
	// ModeCheck only verifies and reports; it changes nothing on the host.
	ModeCheck Mode = "check"
)

// Options mirror the `hostprep` section of the config file (and the top-level
// `host_root`). The config package fills them already defaulted and validated; hostprep
// still copes with bad values by reporting a failing check, never by crashing or by
// writing half a file.
type Options struct {
	// Mode is hostprep.mode: apply (default when empty) or check.
	Mode Mode
	// HostRoot is host_root: the host's / as this process sees it ("/" by default,
	// "/host" in the DaemonSet). Every path below is relative to it.
	HostRoot string
	// Hugepages is hostprep.hugepages.
	Hugepages Hugepages
	// Modules is hostprep.modules: kernel modules that must be loaded or built in,
	// e.g. [vfio-pci]. "vfio-pci" and "vfio_pci" are the same module; the spelling written
	// to ModulesFile follows the host's distribution (see distroModuleName).
	Modules []string
	// ModulesFile is hostprep.modules_file (default in the config:
	// /etc/modules-load.d/calico-vfio-pci.conf). Empty: modules are loaded but not persisted.
	ModulesFile string
	// AllowNoIOMMU is hostprep.allow_noiommu: when the host has no IOMMU, turn on vfio's
	// unsafe no-IOMMU mode. False by default: it is never turned on silently.
	AllowNoIOMMU bool
	// BPFFS is the bpffs mount point the steering subsystem pins under (the config
	// default is /sys/fs/bpf, the parent of steering.bpffs). It is mounted when absent.
	// Empty: bpffs is not checked.
	BPFFS string
	// UplinkInterface is uplink.interface; its NUMA node
	// (/sys/class/net/<if>/device/numa_node) must hold 2 MiB pages. Empty: not checked.
	UplinkInterface string

	// RetryInitial and RetryMax bound the backoff of Run while a check fails
	// (defaults 1s doubling up to 1m); Reverify is the period of re-verification while
	// all checks pass, so drift is noticed (default 30s). Not config keys; tests shorten them.
	RetryInitial time.Duration
	RetryMax     time.Duration
	Reverify     time.Duration
}

// Hugepages is hostprep.hugepages: the 2 MiB page pool.
type Hugepages struct {
	// Count is hugepages.count, in 2 MiB pages. 0: no pages requested, the pool is left
	// alone and nothing is persisted.
	Count int
	// AllowShrink is hugepages.allow_shrink: a larger existing pool is lowered to Count
	// only when true; otherwise the larger pool is kept (and persisted).
	AllowShrink bool
	// SysctlFile is hugepages.sysctl_file (default in the config:
	// /etc/sysctl.d/calico.conf), under HostRoot. Empty: the pool is not persisted.
	SysctlFile string
}

func (o Options) withDefaults() Options {
	if o.Mode == "" {
		o.Mode = ModeApply
	}
	if o.HostRoot == "" {
		o.HostRoot = "/"
	}
	if o.RetryInitial <= 0 {
		o.RetryInitial = time.Second
	}
	if o.RetryMax <= 0 {
		o.RetryMax = time.Minute
	}
	if o.RetryMax < o.RetryInitial {
		o.RetryMax = o.RetryInitial
	}
	if o.Reverify <= 0 {
		o.Reverify = 30 * time.Second
	}
	o.Modules = slices.Clone(o.Modules)
	return o
}

// path returns the host path made of p under HostRoot. The host path is cleaned as an
// absolute path first, so "..", in a configured file name or an interface name, never
// leads out of HostRoot.
func (o Options) path(p ...string) string {
	return filepath.Join(o.HostRoot, filepath.Clean("/"+filepath.Join(p...)))
}
