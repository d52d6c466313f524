package netcfg

import (
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// fakeHost builds a host tree under a temp dir, laid out as a real kernel lays out
// sysfs (relative symlinks from /sys/class/net and /sys/bus into /sys/devices).
type fakeHost struct {
	t    *testing.T
	root string
}

func newFakeHost(t *testing.T) *fakeHost {
	t.Helper()
	return &fakeHost{t: t, root: t.TempDir()}
}

// guard fails the test when p would be reached through a symlink: the fake host has
// absolute symlinks (/var/run -> /run) that would lead a write out of the temp tree
// and onto the real host.
func (h *fakeHost) guard(p string) {
	h.t.Helper()
	cur := h.root
	for _, c := range strings.Split(strings.Trim(filepath.Clean("/"+p), "/"), "/") {
		cur = filepath.Join(cur, c)
		fi, err := os.Lstat(cur)
		if err != nil {
			return // the rest is created as plain directories
		}
		if fi.Mode()&fs.ModeSymlink != 0 && cur != filepath.Join(h.root, p) {
			h.t.Fatalf("fake host path %s goes through symlink %s; write to its target instead", p, cur)
		}
	}
}

func (h *fakeHost) file(p, content string) {
	h.t.Helper()
	h.guard(p)
	full := filepath.Join(h.root, p)
	if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
		h.t.Fatal(err)
	}
	if err := os.WriteFile(full, []byte(content), 0o644); err != nil {
		h.t.Fatal(err)
	}
}

func (h *fakeHost) dir(p string) {
	h.t.Helper()
	h.guard(p)
	if err := os.MkdirAll(filepath.Join(h.root, p), 0o755); err != nil {
		h.t.Fatal(err)
	}
}

func (h *fakeHost) symlink(p, target string) {
	h.t.Helper()
	h.guard(p)
	full := filepath.Join(h.root, p)
	if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
		h.t.Fatal(err)
	}
	if err := os.Symlink(target, full); err != nil {
		h.t.Fatal(err)
	}
}

// pciFunc adds PCI function addr on bus pci0000:00 with a class, a NUMA node and,
// when driver is not "", a bound PCI driver.
func (h *fakeHost) pciFunc(addr, class, numa, driver string) string {
	dev := "/sys/devices/pci0000:00/" + addr
	h.file(dev+"/class", class+"\n")
	h.file(dev+"/numa_node", numa+"\n")
	if driver != "" {
		h.dir("/sys/bus/pci/drivers/" + driver)
		h.symlink(dev+"/driver", "../../../bus/pci/drivers/"+driver)
		h.symlink("/sys/bus/pci/drivers/"+driver+"/"+addr, "../../../../devices/pci0000:00/"+addr)
	}
	h.symlink("/sys/bus/pci/devices/"+addr, "../../../devices/pci0000:00/"+addr)
	return dev
}

// virtioNIC adds ifname as virtio-net: the netdev's device is virtioN, a child of the
// PCI function, as on KVM guests and most clouds.
func (h *fakeHost) virtioNIC(ifname, addr, virtio, numa string) {
	dev := h.pciFunc(addr, "0x020000", numa, "virtio-pci")
	vdev := dev + "/" + virtio
	h.dir("/sys/bus/virtio/drivers/virtio_net")
	h.symlink(vdev+"/driver", "../../../../bus/virtio/drivers/virtio_net")
	h.dir(vdev + "/net/" + ifname)
	h.symlink(vdev+"/net/"+ifname+"/device", "../../../"+virtio)
	h.symlink("/sys/class/net/"+ifname, "../../devices/pci0000:00/"+addr+"/"+virtio+"/net/"+ifname)
}

// pciNIC adds ifname as a NIC whose netdev sits right on the PCI function (ixgbe, mlx5, ...).
func (h *fakeHost) pciNIC(ifname, addr, driver, numa string) {
	dev := h.pciFunc(addr, "0x020000", numa, driver)
	h.dir(dev + "/net/" + ifname)
	h.symlink(dev+"/net/"+ifname+"/device", "../../../"+addr)
	h.symlink("/sys/class/net/"+ifname, "../../devices/pci0000:00/"+addr+"/net/"+ifname)
}

// virtualNIC adds ifname with no device, as veth, bridges and taps have.
func (h *fakeHost) virtualNIC(ifname string) {
	h.dir("/sys/devices/virtual/net/" + ifname)
	h.symlink("/sys/class/net/"+ifname, "../../devices/virtual/net/"+ifname)
}

func TestReadDevice(t *testing.T) {
	h := newFakeHost(t)
	h.virtioNIC("eth1", "0000:00:05.0", "virtio3", "0")
	h.pciNIC("ens1f0", "0000:3b:00.0", "ixgbe", "1")
	h.pciNIC("ens2", "0000:00:06.0", "ena", "-1")
	h.virtualNIC("veth0")

	tests := []struct {
		ifname string
		want   deviceInfo
	}{
		{"eth1", deviceInfo{present: true, pci: "0000:00:05.0", driver: "virtio_net", numa: 0, numaOK: true}},
		{"ens1f0", deviceInfo{present: true, pci: "0000:3b:00.0", driver: "ixgbe", numa: 1, numaOK: true}},
		{"ens2", deviceInfo{present: true, pci: "0000:00:06.0", driver: "ena"}},
		{"veth0", deviceInfo{}},
		{"missing", deviceInfo{}},
		{"../../etc", deviceInfo{}},
		{"", deviceInfo{}},
	}
	for _, tt := range tests {
		t.Run(tt.ifname, func(t *testing.T) {
			if got := readDevice(h.root, tt.ifname); got != tt.want {
				t.Errorf("readDevice(%q) got %+v; want %+v", tt.ifname, got, tt.want)
			}
		})
	}
}

func TestNUMANodeOf(t *testing.T) {
	h := newFakeHost(t)
	h.virtioNIC("eth1", "0000:00:05.0", "virtio0", "1")
	h.pciNIC("eth2", "0000:00:06.0", "ena", "-1")
	tests := []struct {
		ifname string
		node   int
		ok     bool
	}{
		{"eth1", 1, true},
		{"eth2", 0, false},
		{"eth9", 0, false},
	}
	for _, tt := range tests {
		if n, ok := NUMANodeOf(h.root, tt.ifname); n != tt.node || ok != tt.ok {
			t.Errorf("NUMANodeOf(%q) got %d, %v; want %d, %v", tt.ifname, n, ok, tt.node, tt.ok)
		}
	}
}

func TestUserspaceBoundNICs(t *testing.T) {
	h := newFakeHost(t)
	h.pciFunc("0000:00:07.0", "0x020000", "0", "vfio-pci")
	h.pciFunc("0000:00:08.0", "0x010802", "0", "vfio-pci") // an NVMe drive passed through: not a NIC
	h.pciFunc("0000:00:09.0", "0x020000", "0", "uio_pci_generic")
	h.pciFunc("0000:00:04.0", "0x020000", "0", "vfio-pci")
	h.virtioNIC("eth0", "0000:00:03.0", "virtio0", "0")
	h.file("/sys/bus/pci/drivers/vfio-pci/new_id", "")
	h.file("/sys/bus/pci/drivers/vfio-pci/bind", "")

	got := userspaceBoundNICs(h.root)
	want := []pciBinding{
		{addr: "0000:00:04.0", driver: "vfio-pci"},
		{addr: "0000:00:07.0", driver: "vfio-pci"},
		{addr: "0000:00:09.0", driver: "uio_pci_generic"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %+v; want %+v", got, want)
	}
	if got := userspaceBoundNICs(t.TempDir()); got != nil {
		t.Errorf("on an empty host got %+v; want none", got)
	}
}

func TestResolveInStaysInRoot(t *testing.T) {
	h := newFakeHost(t)
	h.file("/run/vpp/vppmanagerinfofile", `{"Status":"ready"}`)
	h.symlink("/var/run", "/run") // absolute, as on every modern distribution
	h.symlink("/escape", "../../../../../../etc")
	h.file("/etc/marker", "inside")
	h.symlink("/loop", "/loop")

	tests := []struct {
		path    string
		want    string
		wantErr bool
	}{
		{"/var/run/vpp/vppmanagerinfofile", "/run/vpp/vppmanagerinfofile", false},
		{"var/run/vpp/../vpp/vppmanagerinfofile", "/run/vpp/vppmanagerinfofile", false},
		{"/escape/marker", "/etc/marker", false},
		{"/../../etc/marker", "/etc/marker", false},
		{"/loop/x", "", true},
		{"/nope", "", true},
	}
	for _, tt := range tests {
		got, err := resolveIn(h.root, tt.path)
		if (err != nil) != tt.wantErr || got != tt.want {
			t.Errorf("resolveIn(%q) got %q, %v; want %q (error: %v)", tt.path, got, err, tt.want, tt.wantErr)
		}
	}
}

func TestReadVPPStatus(t *testing.T) {
	tests := []struct {
		name    string
		content *string
		want    string
	}{
		{"missing", nil, "missing"},
		{"ready", ptr(`{"Status": "ready", "UplinkStatuses": {}}`), "ready"},
		{"starting", ptr(`{"Status": "starting"}`), "starting"},
		{"case", ptr(`{"status": "Ready"}`), "ready"},
		{"no status", ptr(`{}`), "no status"},
		{"garbage", ptr(`ready`), "unreadable (parse /var/run/vpp/vppmanagerinfofile: invalid character 'r' looking for beginning of value)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newFakeHost(t)
			h.symlink("/var/run", "/run")
			if tt.content != nil {
				h.file("/run/vpp/vppmanagerinfofile", *tt.content)
			}
			if got := readVPPStatus(h.root).String(); got != tt.want {
				t.Errorf("got %q; want %q", got, tt.want)
			}
		})
	}
}

func ptr[T any](v T) *T { return &v }
