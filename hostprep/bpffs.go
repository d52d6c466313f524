package hostprep

import (
	"errors"
	"fmt"
	"io/fs"

	"github.com/nodeagent/nodeagent/agent/health"
)

// CheckBPFFS is the name of the bpffs check. It is not among the SPEC's check names
// (the steering check fails on its own when it cannot pin), so the agent may treat it
// as informational.
const CheckBPFFS = "bpffs"

// bpffs checks that the bpffs steering pins under is mounted, and mounts it in apply mode.
// In the DaemonSet, host_root must be mounted with Bidirectional propagation for the
// mount to reach the host.
func (p *pass) bpffs() (health.Result, bool) {
	o := p.o
	if o.BPFFS == "" {
		return health.Result{}, false
	}
	res := health.Result{Name: CheckBPFFS}
	path := o.path(o.BPFFS)
	ok, err := p.d.mnt.IsBPFFS(path)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		res.Detail = fmt.Sprintf("check bpffs at %s: %v", o.BPFFS, err)
		return res, true
	}
	if ok {
		res.OK = true
		res.Detail = "bpffs mounted at " + o.BPFFS
		return res, true
	}
	if !p.apply {
		res.Detail = "bpffs not mounted at " + o.BPFFS + " (mode check: not mounting)"
		return res, true
	}
	if err := p.d.mnt.MountBPFFS(path); err != nil {
		res.Detail = fmt.Sprintf("bpffs not mounted at %s: %v", o.BPFFS, p.rel(err))
		return res, true
	}
	if ok, err := p.d.mnt.IsBPFFS(path); err != nil || !ok {
		res.Detail = fmt.Sprintf("mounted bpffs at %s but it does not show as bpffs (error: %v)", o.BPFFS, err)
		return res, true
	}
	p.m.change("bpffs_mount")
	p.log.Info("mounted bpffs", "path", path)
	res.OK = true
	res.Detail = "mounted bpffs at " + o.BPFFS
	return res, true
}
