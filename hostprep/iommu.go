package hostprep

import (
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/nodeagent/nodeagent/agent/health"
)

const (
	iommuGroups = "/sys/kernel/iommu_groups"
	noIOMMUParm = "/sys/module/vfio/parameters/enable_unsafe_noiommu_mode"
	noIOMMURisk = "unsafe: a device bound to vfio-pci can DMA to any memory of the node, and the kernel is tainted"
	iommuHowTo  = "add intel_iommu=on (Intel) or amd_iommu=on (AMD), with iommu=pt, to the kernel command line and reboot, with VT-d/AMD-Vi enabled in the firmware"
)

// iommu says whether vfio-pci can bind a device here, and turns on vfio's no-IOMMU mode
// when there is no IOMMU, the mode is allowed, and hostprep applies.
func (p *pass) iommu() health.Result {
	o := p.o
	res := health.Result{Name: health.IOMMU}
	entries, err := os.ReadDir(o.path(iommuGroups))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		res.Detail = fmt.Sprintf("read %s: %v", iommuGroups, err)
		return res
	}
	if len(entries) > 0 {
		res.OK = true
		res.Detail = fmt.Sprintf("IOMMU on (%d groups): vfio-pci can bind devices", len(entries))
		return res
	}

	val, err := readTrim(o.path(noIOMMUParm))
	switch {
	case err == nil && (val == "Y" || val == "1"):
		res.OK = true
		res.Detail = "no IOMMU; vfio no-IOMMU mode is on: vfio-pci can bind devices (" + noIOMMURisk + ")"
		if !o.AllowNoIOMMU {
			res.Detail += "; warning: it was turned on outside nodeagent (hostprep.allow_noiommu is false)"
		}
		return res
	case err == nil && o.AllowNoIOMMU && p.apply:
		if werr := p.d.sysfs.WriteFile(o.path(noIOMMUParm), []byte("1")); werr != nil {
			res.Detail = fmt.Sprintf("no IOMMU, and turning on vfio no-IOMMU mode failed: %v; %s", werr, iommuHowTo)
			return res
		}
		if v, _ := readTrim(o.path(noIOMMUParm)); v != "Y" && v != "1" {
			res.Detail = fmt.Sprintf("no IOMMU, and vfio no-IOMMU mode stayed %q after turning it on; %s", v, iommuHowTo)
			return res
		}
		p.m.change("noiommu")
		p.log.Warn("turned on vfio no-IOMMU mode (hostprep.allow_noiommu is true)", "risk", noIOMMURisk)
		res.OK = true
		res.Detail = "no IOMMU; turned on vfio no-IOMMU mode (allowed by hostprep.allow_noiommu): vfio-pci can bind devices (" + noIOMMURisk + "); not persisted across reboots"
		return res
	case err == nil && o.AllowNoIOMMU:
		res.Detail = "no IOMMU and vfio no-IOMMU mode is off (mode check: not turning it on): vfio-pci cannot bind a device; " + iommuHowTo
		return res
	case err == nil:
		res.Detail = "no IOMMU: vfio-pci cannot bind a device; " + iommuHowTo +
			"; or set hostprep.allow_noiommu: true to use vfio no-IOMMU mode (" + noIOMMURisk + ")"
		return res
	case errors.Is(err, fs.ErrNotExist):
		res.Detail = "no IOMMU, and the vfio module (with its no-IOMMU mode) is not loaded: vfio-pci cannot bind a device; " + iommuHowTo
		return res
	default:
		res.Detail = fmt.Sprintf("no IOMMU, and reading vfio no-IOMMU mode failed: %v", err)
		return res
	}
}
