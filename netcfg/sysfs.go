package netcfg

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// Paths read from the host, relative to Options.HostRoot.
const (
	sysClassNet        = "/sys/class/net"
	sysPCIDrivers      = "/sys/bus/pci/drivers"
	sysPCIDevices      = "/sys/bus/pci/devices"
	vppManagerInfoFile = "/var/run/vpp/vppmanagerinfofile"
)

// userspaceDrivers are the PCI drivers that take a NIC away from the kernel's network
// stack so that a userspace dataplane (VPP, DPDK) can drive it.
var userspaceDrivers = []string{"vfio-pci", "uio_pci_generic"}

var pciAddrRE = regexp.MustCompile(`^[0-9a-f]{4,8}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$`)

var errTooManyLinks = errors.New("too many levels of symbolic links")

// resolveIn resolves every symbolic link in p as if root were "/", and returns the
// result as an absolute path relative to root. Absolute link targets restart at root
// and ".." never climbs above it, so /host/var/run -> /run stays inside /host.
func resolveIn(root, p string) (string, error) {
	resolved := "/"
	rest := strings.Split(filepath.Clean("/"+p), "/")
	links := 0
	for len(rest) > 0 {
		c := rest[0]
		rest = rest[1:]
		switch c {
		case "", ".":
			continue
		case "..":
			resolved = filepath.Dir(resolved)
			continue
		}
		next := filepath.Join(resolved, c)
		full := filepath.Join(root, next)
		fi, err := os.Lstat(full)
		if err != nil {
			return "", err
		}
		if fi.Mode()&fs.ModeSymlink == 0 {
			resolved = next
			continue
		}
		if links++; links > 40 {
			return "", fmt.Errorf("resolve %s: %w", p, errTooManyLinks)
		}
		target, err := os.Readlink(full)
		if err != nil {
			return "", err
		}
		if filepath.IsAbs(target) {
			resolved = "/"
		}
		rest = append(strings.Split(target, "/"), rest...)
	}
	return resolved, nil
}

// deviceInfo is what sysfs says about the device behind a network interface.
type deviceInfo struct {
	present bool   // /sys/class/net/<if>/device exists: a real device, not a virtual link
	pci     string // PCI address of the device or of its nearest PCI ancestor; "" if none
	driver  string // driver bound to the interface's device (virtio_net, ixgbe, ...)
	numa    int
	numaOK  bool // numa is known (sysfs reports -1 on machines without NUMA information)
}

// readDevice reads /sys/class/net/<ifname>/device under root. A missing device
// (virtual interfaces, taps, an interface in another namespace) is not an error: the
// result simply has present == false.
func readDevice(root, ifname string) deviceInfo {
	var d deviceInfo
	if ifname == "" || strings.ContainsRune(ifname, '/') {
		return d
	}
	dev, err := resolveIn(root, filepath.Join(sysClassNet, ifname, "device"))
	if err != nil {
		return d
	}
	d.present = true
	if drv, err := resolveIn(root, filepath.Join(dev, "driver")); err == nil {
		d.driver = filepath.Base(drv)
	}
	// virtio-net hangs its netdev under a virtioN device whose parent is the PCI
	// function; other drivers put it right on the PCI function.
	numaDir := dev
	for dir := dev; dir != "/" && dir != "."; dir = filepath.Dir(dir) {
		if pciAddrRE.MatchString(filepath.Base(dir)) {
			d.pci = filepath.Base(dir)
			numaDir = dir
			break
		}
	}
	d.numa, d.numaOK = readNUMA(filepath.Join(root, numaDir, "numa_node"))
	return d
}

func readNUMA(path string) (int, bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, false
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || n < 0 {
		return 0, false
	}
	return n, true
}

// pciNUMA reads the NUMA node of PCI function addr under root.
func pciNUMA(root, addr string) (int, bool) {
	dev, err := resolveIn(root, filepath.Join(sysPCIDevices, addr))
	if err != nil {
		return 0, false
	}
	return readNUMA(filepath.Join(root, dev, "numa_node"))
}

// NUMANodeOf returns the NUMA node of the device behind interface ifname, read from
// /sys/class/net/<ifname>/device under hostRoot, and false when it is unknown (no such
// interface, a virtual interface, or a machine whose firmware reports no NUMA node).
func NUMANodeOf(hostRoot, ifname string) (int, bool) {
	d := readDevice(hostRoot, ifname)
	return d.numa, d.numaOK
}

// pciBinding is a PCI function bound to a userspace-I/O driver.
type pciBinding struct {
	addr   string
	driver string
}

// userspaceBoundNICs lists the network-class PCI functions bound to vfio-pci or
// uio_pci_generic under root, sorted by address.
func userspaceBoundNICs(root string) []pciBinding {
	var out []pciBinding
	for _, drv := range userspaceDrivers {
		dir, err := resolveIn(root, filepath.Join(sysPCIDrivers, drv))
		if err != nil {
			continue
		}
		entries, err := os.ReadDir(filepath.Join(root, dir))
		if err != nil {
			continue
		}
		for _, e := range entries {
			if !pciAddrRE.MatchString(e.Name()) {
				continue
			}
			if !isNetworkClass(root, filepath.Join(dir, e.Name())) {
				continue
			}
			out = append(out, pciBinding{addr: e.Name(), driver: drv})
		}
	}
	slices.SortFunc(out, func(a, b pciBinding) int { return strings.Compare(a.addr, b.addr) })
	return out
}

// isNetworkClass reports whether the PCI function at dev (relative to root) is a
// network controller (PCI class 0x02). A function whose class cannot be read counts,
// so that a half-readable sysfs errs towards naming the device.
func isNetworkClass(root, dev string) bool {
	p, err := resolveIn(root, dev)
	if err != nil {
		return true
	}
	b, err := os.ReadFile(filepath.Join(root, p, "class"))
	if err != nil {
		return true
	}
	return strings.HasPrefix(strings.TrimSpace(string(b)), "0x02")
}

// vppStatus is the state of Calico-VPP's vpp-manager, read from its info file.
type vppStatus struct {
	state string // "ready", "starting", ... as written; "missing" when there is no file
	err   error  // the file exists but could not be read or parsed
}

func (s vppStatus) String() string {
	if s.err != nil {
		return "unreadable (" + s.err.Error() + ")"
	}
	return s.state
}

// readVPPStatus reads /var/run/vpp/vppmanagerinfofile under root: vpp-manager writes
// it as JSON ({"Status": "ready", "UplinkStatuses": ...}) once VPP has taken the
// uplink over.
func readVPPStatus(root string) vppStatus {
	p, err := resolveIn(root, vppManagerInfoFile)
	if errors.Is(err, fs.ErrNotExist) {
		return vppStatus{state: "missing"}
	}
	if err != nil {
		return vppStatus{err: fmt.Errorf("resolve %s: %w", vppManagerInfoFile, err)}
	}
	b, err := os.ReadFile(filepath.Join(root, p))
	if errors.Is(err, fs.ErrNotExist) {
		return vppStatus{state: "missing"}
	}
	if err != nil {
		return vppStatus{err: fmt.Errorf("read %s: %w", vppManagerInfoFile, err)}
	}
	var info struct{ Status string }
	if err := json.Unmarshal(b, &info); err != nil {
		return vppStatus{err: fmt.Errorf("parse %s: %w", vppManagerInfoFile, err)}
	}
	if info.Status == "" {
		return vppStatus{state: "no status"}
	}
	return vppStatus{state: strings.ToLower(info.Status)}
}
