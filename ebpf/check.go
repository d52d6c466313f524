package ebpf

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf/link"

	"github.com/nodeagent/nodeagent/agent/health"
)

// Check runs the steering check once, for `nodeagent check`, changing nothing
// on the host: the kernel features, the cgroup v2 directory, and whether the
// programs pinned under opts.BPFFS are attached to it. Not being attached, or
// pins left for another cgroup, are not failures (the agent attaches, and
// replaces stale pins, on start), but are said in the detail.
func Check(ctx context.Context, opts Options) []health.Result {
	opts = opts.withDefaults()
	res := health.Result{Name: health.Steering}
	if err := opts.validate(); err != nil {
		res.Detail = err.Error()
		return []health.Result{res}
	}
	if err := probeKernel(); err != nil {
		res.Detail = err.Error()
		return []health.Result{res}
	}
	cgroup, err := resolveCgroup(opts.HostRoot, opts.Cgroup)
	if err != nil {
		res.Detail = err.Error()
		return []health.Result{res}
	}
	id, err := cgroupID(cgroup)
	if err != nil {
		res.Detail = err.Error()
		return []health.Result{res}
	}
	var attached, other []string
	for _, h := range hooks {
		path := filepath.Join(linksDir(opts.BPFFS), h.name)
		lk, err := link.LoadPinnedLink(path, nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			other = append(other, fmt.Sprintf("%s: %v", h.name, err))
			continue
		}
		info, err := lk.Info()
		_ = lk.Close()
		if err == nil && info.Cgroup() != nil && info.Cgroup().CgroupId == id {
			attached = append(attached, h.name)
		} else {
			other = append(other, h.name+": pinned for another cgroup")
		}
	}
	res.OK = true
	switch {
	case len(other) > 0:
		res.Detail = fmt.Sprintf("kernel ready; cgroup %s; stale pins under %s, replaced on start: %s", cgroup, opts.BPFFS, strings.Join(other, "; "))
	case len(attached) == len(hooks):
		res.Detail = fmt.Sprintf("%d programs attached to %s", len(attached), cgroup)
	case len(attached) == 0:
		res.Detail = fmt.Sprintf("kernel ready; not attached to %s (the agent attaches on start)", cgroup)
	default:
		res.Detail = fmt.Sprintf("partly attached to %s: %s", cgroup, strings.Join(attached, ", "))
	}
	return []health.Result{res}
}
