package deploytest

import (
	"fmt"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// problems collects what is wrong, so that the same checks run on the shipped manifests
// (want none) and on broken copies (want each break found).
type problems []string

func (p *problems) addf(format string, args ...any) { *p = append(*p, fmt.Sprintf(format, args...)) }

func (p problems) report(t *testing.T) {
	t.Helper()
	for _, msg := range p {
		t.Error(msg)
	}
}

// daemonSetChecks are the checks of the agent's DaemonSet against its config.
var daemonSetChecks = map[string]func(*k8sBundle, *testing.T, *problems){
	"pod privileges":               (*k8sBundle).checkPod,
	"env matches config":           (*k8sBundle).checkEnv,
	"GOMEMLIMIT follows the limit": (*k8sBundle).checkMemory,
	"probes match health.listen":   (*k8sBundle).checkProbes,
	"rolling update overlaps":      (*k8sBundle).checkRollout,
	"mounts what the config needs": (*k8sBundle).checkMounts,
}

func TestDaemonSet(t *testing.T) {
	t.Parallel()
	for name, check := range daemonSetChecks {
		t.Run(name, func(t *testing.T) {
			b := loadK8s(t)
			var p problems
			check(b, t, &p)
			p.report(t)
		})
	}
	checkEnvRefs(t, "DaemonSet", loadK8s(t).container)
}

// Each break of the DaemonSet or its config is found by the checks above.
func TestDaemonSetChecksFindBreaks(t *testing.T) {
	t.Parallel()
	mount := func(b *k8sBundle, at string) *corev1.VolumeMount {
		for i := range b.container.VolumeMounts {
			if b.container.VolumeMounts[i].MountPath == at {
				return &b.container.VolumeMounts[i]
			}
		}
		t.Fatalf("no mount at %s", at)
		return nil
	}
	dropMount := func(b *k8sBundle, at string) {
		var keep []corev1.VolumeMount
		for _, m := range b.container.VolumeMounts {
			if m.MountPath != at {
				keep = append(keep, m)
			}
		}
		b.container.VolumeMounts = keep
	}
	setEnv := func(b *k8sBundle, name string, e corev1.EnvVar) {
		for i := range b.container.Env {
			if b.container.Env[i].Name == name {
				b.container.Env[i] = e
			}
		}
	}
	for _, tc := range []struct {
		name   string
		mutate func(b *k8sBundle)
		want   string
	}{
		{"hostPID", func(b *k8sBundle) { b.ds.Spec.Template.Spec.HostPID = true }, "hostPID"},
		{"no hostNetwork", func(b *k8sBundle) { b.ds.Spec.Template.Spec.HostNetwork = false }, "hostNetwork"},
		{"not privileged", func(b *k8sBundle) { b.container.SecurityContext.Privileged = nil }, "privileged"},
		{"no tolerations", func(b *k8sBundle) { b.ds.Spec.Template.Spec.Tolerations = nil }, "tolerations"},
		{"bpffs not Bidirectional", func(b *k8sBundle) { mount(b, "/host/sys/fs/bpf").MountPropagation = nil }, "Bidirectional"},
		{"no bpffs at /sys/fs/bpf", func(b *k8sBundle) { dropMount(b, "/sys/fs/bpf") }, "steering.bpffs"},
		{"no SPIRE socket dir", func(b *k8sBundle) { dropMount(b, "/host/run/spire") }, "spire.socket"},
		{"no cgroup root mount", func(b *k8sBundle) { dropMount(b, "/host/sys/fs/cgroup") }, "steering.cgroup"},
		{"sysctl.d read-only", func(b *k8sBundle) { mount(b, "/host/etc/sysctl.d").ReadOnly = true }, "read-only"},
		{"no state dir", func(b *k8sBundle) { dropMount(b, "/var/lib/nodeagent") }, "otlp.queue.dir"},
		{"host_root writable", func(b *k8sBundle) { mount(b, "/host").ReadOnly = false }, "host_root mount is writable"},
		{"liveness port", func(b *k8sBundle) { b.container.LivenessProbe.HTTPGet.Port = intstr.FromInt32(9875) }, "livenessProbe port"},
		{"readiness path", func(b *k8sBundle) { b.container.ReadinessProbe.HTTPGet.Path = "/healthz" }, "readinessProbe path"},
		{"health on loopback", func(b *k8sBundle) { b.cfg["health"] = map[string]any{"listen": "127.0.0.1:9874"} }, "would be refused"},
		{"named port", func(b *k8sBundle) { b.container.LivenessProbe.HTTPGet.Port = intstr.FromString("health") }, "as a number"},
		{"a hostPort", func(b *k8sBundle) {
			b.container.Ports = []corev1.ContainerPort{{ContainerPort: 9874}}
		}, "hostPort"},
		{"maxUnavailable 1", func(b *k8sBundle) {
			one := intstr.FromInt32(1)
			b.ds.Spec.UpdateStrategy.RollingUpdate.MaxUnavailable = &one
		}, "maxUnavailable"},
		{"no surge", func(b *k8sBundle) { b.ds.Spec.UpdateStrategy.RollingUpdate.MaxSurge = nil }, "maxSurge"},
		{"short grace", func(b *k8sBundle) {
			g := int64(30)
			b.ds.Spec.Template.Spec.TerminationGracePeriodSeconds = &g
		}, "terminationGracePeriodSeconds"},
		{"NODE_IP from the pod IP", func(b *k8sBundle) {
			setEnv(b, "NODE_IP", corev1.EnvVar{Name: "NODE_IP", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "status.podIP"}}})
		}, "status.hostIP"},
		{"HOST_ROOT set", func(b *k8sBundle) {
			b.container.Env = append(b.container.Env, corev1.EnvVar{Name: "HOST_ROOT", Value: "/"})
		}, "HOST_ROOT"},
		{"GOMEMLIMIT equal to the limit", func(b *k8sBundle) {
			setEnv(b, "GOMEMLIMIT", corev1.EnvVar{Name: "GOMEMLIMIT", Value: "$(MEMORY_LIMIT_MIB)MiB"})
		}, "GOMEMLIMIT"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := loadK8s(t)
			tc.mutate(b)
			b.ds.Spec.Template.Spec.Containers[0] = b.container
			var p problems
			for _, check := range daemonSetChecks {
				check(b, t, &p)
			}
			found := false
			for _, msg := range p {
				found = found || strings.Contains(msg, tc.want)
			}
			if !found {
				t.Errorf("no problem mentions %q; got %q", tc.want, p)
			}
		})
	}
}
