package deploytest

import (
	"math"
	"net"
	"net/netip"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"
	"sigs.k8s.io/yaml"
)

// Values the downward API would give, for expanding the ConfigMap's config in tests.
const (
	testNodeName = "worker-1"
	testNodeIP   = "10.11.12.13"
)

// Defaults of the binary that the probes must match (SPEC: Health endpoint).
const (
	livenessPath  = "/healthz"
	readinessPath = "/readyz"
)

// k8sBundle is everything in deploy/kubernetes, decoded.
type k8sBundle struct {
	objs      []object
	ns        *corev1.Namespace
	sa        *corev1.ServiceAccount
	cm        *corev1.ConfigMap
	ds        *appsv1.DaemonSet
	container corev1.Container
	// configText is the config file the DaemonSet's command reads (from the ConfigMap).
	configText string
	configPath string // as the container sees it
	cfg        conf   // configText expanded with the downward API's values
	hostRoot   string // host_root as the DaemonSet sets it
}

func loadK8s(t *testing.T) *k8sBundle {
	t.Helper()
	b := &k8sBundle{objs: loadManifests(t, deployPath(t, "kubernetes"), "kustomization.yaml")}
	if t.Failed() {
		t.FailNow()
	}
	b.ns = only[*corev1.Namespace](t, b.objs)
	b.sa = only[*corev1.ServiceAccount](t, b.objs)
	b.cm = only[*corev1.ConfigMap](t, b.objs)
	b.ds = only[*appsv1.DaemonSet](t, b.objs)
	if n := len(b.ds.Spec.Template.Spec.Containers); n != 1 {
		t.Fatalf("DaemonSet has %d containers; want 1", n)
	}
	b.container = b.ds.Spec.Template.Spec.Containers[0]

	argv := append(append([]string{}, b.container.Command...), b.container.Args...)
	if len(argv) != 4 || path.Base(argv[0]) != "nodeagent" || argv[1] != "run" || argv[2] != "--config" {
		t.Fatalf("container runs %q; want [.../nodeagent run --config FILE]", argv)
	}
	b.configPath = argv[3]
	key := b.configMapKeyAt(t, b.configPath)
	text, ok := b.cm.Data[key]
	if !ok {
		t.Fatalf("ConfigMap %s has no key %q (the file %s)", b.cm.Name, key, b.configPath)
	}
	b.configText = text
	env := b.containerEnvValues()
	b.cfg = parseConf(t, text, env)
	b.hostRoot = "/"
	if b.cfg.has("host_root") {
		b.hostRoot = b.cfg.str(t, "host_root")
	}
	return b
}

// containerEnvValues is what the downward API would put in the environment, for the
// variables the config may expand.
func (b *k8sBundle) containerEnvValues() map[string]string {
	env := map[string]string{}
	for _, e := range b.container.Env {
		switch {
		case e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "spec.nodeName":
			env[e.Name] = testNodeName
		case e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "status.hostIP":
			env[e.Name] = testNodeIP
		case e.ValueFrom == nil:
			env[e.Name] = e.Value
		}
	}
	return env
}

// configMapKeyAt returns the ConfigMap key whose file the container sees at file.
func (b *k8sBundle) configMapKeyAt(t *testing.T, file string) string {
	t.Helper()
	m, vol := b.mountFor(file)
	if vol == nil || vol.ConfigMap == nil {
		t.Fatalf("%s is not in a ConfigMap volume", file)
	}
	if vol.ConfigMap.Name != b.cm.Name {
		t.Fatalf("%s is in ConfigMap %q; want %q (configmap.yaml)", file, vol.ConfigMap.Name, b.cm.Name)
	}
	if m.SubPath != "" {
		t.Fatalf("the config is mounted with subPath %q: subPath mounts never see ConfigMap updates", m.SubPath)
	}
	rel := strings.TrimPrefix(strings.TrimPrefix(file, m.MountPath), "/")
	if len(vol.ConfigMap.Items) == 0 {
		return rel
	}
	for _, it := range vol.ConfigMap.Items {
		if it.Path == rel {
			return it.Key
		}
	}
	t.Fatalf("ConfigMap volume %s has no item with path %q", vol.Name, rel)
	return ""
}

// mountFor returns the container's volume mount that holds the path p (the deepest
// mount point above it) and its volume.
func (b *k8sBundle) mountFor(p string) (*corev1.VolumeMount, *corev1.Volume) {
	return mountFor(b.ds.Spec.Template.Spec, b.container, p)
}

func mountFor(spec corev1.PodSpec, c corev1.Container, p string) (*corev1.VolumeMount, *corev1.Volume) {
	var best *corev1.VolumeMount
	for i := range c.VolumeMounts {
		m := &c.VolumeMounts[i]
		if within(p, m.MountPath) && (best == nil || len(m.MountPath) > len(best.MountPath)) {
			best = m
		}
	}
	if best == nil {
		return nil, nil
	}
	for i := range spec.Volumes {
		if spec.Volumes[i].Name == best.Name {
			return best, &spec.Volumes[i]
		}
	}
	return best, nil
}

// within reports whether p is dir or below it.
func within(p, dir string) bool {
	p, dir = path.Clean(p), path.Clean(dir)
	return p == dir || dir == "/" || strings.HasPrefix(p, dir+"/")
}

// hostPathOf returns the node's path that the container sees at p, and the mount.
func (b *k8sBundle) hostPathOf(p string) (string, *corev1.VolumeMount, bool) {
	m, vol := b.mountFor(p)
	if m == nil || vol == nil || vol.HostPath == nil {
		return "", m, false
	}
	rel := strings.TrimPrefix(path.Clean(p), path.Clean(m.MountPath))
	return path.Join(vol.HostPath.Path, rel), m, true
}

func TestManifestsDecodeStrictly(t *testing.T) {
	t.Parallel()
	objs := loadManifests(t, deployPath(t, "kubernetes"), "kustomization.yaml")
	objs = append(objs, loadManifests(t, deployPath(t, "examples"), "local.yaml")...)
	if len(objs) < 6 {
		t.Errorf("decoded %d objects; want at least 6 (namespace, sa, configmap, daemonset, 2 examples)", len(objs))
	}
	for _, o := range objs {
		meta := objectMeta(o.obj)
		for _, msg := range validation.IsDNS1123Subdomain(meta.name) {
			t.Errorf("%s: %s name %q: %s", o.file, o.kind, meta.name, msg)
		}
	}
}

// A document with a misspelt field must fail to decode: the strictness the other
// tests rely on.
func TestStrictDecodingRejectsUnknownFields(t *testing.T) {
	t.Parallel()
	for _, doc := range []string{
		"apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: x}\nspec:\n  template:\n    spec:\n      hostNetwrk: true\n",
		"apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec:\n  containers: [{name: c, image: i, volumeMount: []}]\n",
		"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {a: b}\ndata: {c: d}\n",
		"apiVersion: v1\nkind: Service\nmetadata: {name: x}\n",
	} {
		if _, _, err := decodeStrict([]byte(doc)); err == nil {
			t.Errorf("decodeStrict(%q) = nil error; want one", doc)
		}
	}
}

type meta struct{ name, namespace string }

func objectMeta(o any) meta {
	switch v := o.(type) {
	case *corev1.Namespace:
		return meta{v.Name, v.Namespace}
	case *corev1.ServiceAccount:
		return meta{v.Name, v.Namespace}
	case *corev1.ConfigMap:
		return meta{v.Name, v.Namespace}
	case *corev1.Pod:
		return meta{v.Name, v.Namespace}
	case *appsv1.DaemonSet:
		return meta{v.Name, v.Namespace}
	}
	return meta{}
}

func TestKustomizationListsEveryManifest(t *testing.T) {
	t.Parallel()
	data, err := os.ReadFile(deployPath(t, "kubernetes", "kustomization.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var k struct {
		APIVersion string   `json:"apiVersion"`
		Kind       string   `json:"kind"`
		Resources  []string `json:"resources"`
		Images     []struct {
			Name    string `json:"name"`
			NewName string `json:"newName,omitempty"`
			NewTag  string `json:"newTag,omitempty"`
			Digest  string `json:"digest,omitempty"`
		} `json:"images"`
	}
	if err := yaml.UnmarshalStrict(data, &k); err != nil {
		t.Fatalf("kustomization.yaml: %v", err)
	}
	if k.APIVersion != "kustomize.config.k8s.io/v1beta1" || k.Kind != "Kustomization" {
		t.Errorf("kustomization.yaml is %s %s; want kustomize.config.k8s.io/v1beta1 Kustomization", k.APIVersion, k.Kind)
	}
	files, _ := filepath.Glob(deployPath(t, "kubernetes", "*.yaml"))
	var want []string
	for _, f := range files {
		if b := filepath.Base(f); b != "kustomization.yaml" {
			want = append(want, b)
		}
	}
	got := append([]string(nil), k.Resources...)
	sort.Strings(got)
	sort.Strings(want)
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("kustomization resources = %v; want every manifest: %v", got, want)
	}

	b := loadK8s(t)
	image := b.container.Image
	repo := image
	if i := strings.LastIndex(image, ":"); i > strings.LastIndex(image, "/") {
		repo = image[:i]
	}
	if len(k.Images) != 1 || k.Images[0].Name != repo {
		t.Errorf("kustomization images = %+v; want one entry named %q (the DaemonSet's image)", k.Images, repo)
	}
}

func TestNamespaceAndServiceAccount(t *testing.T) {
	t.Parallel()
	b := loadK8s(t)
	if got := b.ns.Labels["pod-security.kubernetes.io/enforce"]; got != "privileged" {
		t.Errorf("namespace label pod-security.kubernetes.io/enforce = %q; want privileged (the DaemonSet is privileged)", got)
	}
	for _, o := range b.objs {
		if _, isNS := o.obj.(*corev1.Namespace); isNS {
			continue
		}
		if m := objectMeta(o.obj); m.namespace != b.ns.Name {
			t.Errorf("%s: %s %s is in namespace %q; want %q (namespace.yaml)", o.file, o.kind, m.name, m.namespace, b.ns.Name)
		}
	}
	spec := b.ds.Spec.Template.Spec
	if spec.ServiceAccountName != b.sa.Name {
		t.Errorf("DaemonSet serviceAccountName = %q; want %q", spec.ServiceAccountName, b.sa.Name)
	}
	if b.sa.AutomountServiceAccountToken == nil || *b.sa.AutomountServiceAccountToken {
		t.Errorf("ServiceAccount automountServiceAccountToken = %v; want false (nodeagent never calls the API)", b.sa.AutomountServiceAccountToken)
	}
	if spec.AutomountServiceAccountToken == nil || *spec.AutomountServiceAccountToken {
		t.Errorf("pod automountServiceAccountToken = %v; want false", spec.AutomountServiceAccountToken)
	}
}

func (b *k8sBundle) checkPod(t *testing.T, p *problems) {
	spec := b.ds.Spec.Template.Spec
	sel, err := metav1LabelSelector(b.ds)
	if err != nil {
		t.Fatal(err)
	}
	if !sel.Matches(labels.Set(b.ds.Spec.Template.Labels)) {
		p.addf("selector %v does not match the template's labels %v", sel, b.ds.Spec.Template.Labels)
	}
	if !spec.HostNetwork {
		p.addf("hostNetwork = false; want true (node interfaces, loopback and node-IP listeners)")
	}
	if spec.HostPID {
		p.addf("hostPID = true; want false: /host/proc is the node's procfs, nothing else needs the node's PID namespace")
	}
	if spec.DNSPolicy != corev1.DNSClusterFirstWithHostNet {
		p.addf("dnsPolicy = %q; want ClusterFirstWithHostNet (cluster names for the exporter and DNS targets)", spec.DNSPolicy)
	}
	if spec.PriorityClassName != "system-node-critical" {
		p.addf("priorityClassName = %q; want system-node-critical", spec.PriorityClassName)
	}
	tolerateAll := false
	for _, tol := range spec.Tolerations {
		if tol.Operator == corev1.TolerationOpExists && tol.Key == "" && tol.Effect == "" {
			tolerateAll = true
		}
	}
	if !tolerateAll {
		p.addf("tolerations = %+v; want one {operator: Exists} that tolerates every taint", spec.Tolerations)
	}
	sc := b.container.SecurityContext
	if sc == nil || sc.Privileged == nil || !*sc.Privileged {
		p.addf("container is not privileged; want privileged (BPF, modules, Bidirectional mounts)")
	}
	if sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		p.addf("readOnlyRootFilesystem is not true; every write goes to a mount")
	}
}

func metav1LabelSelector(ds *appsv1.DaemonSet) (labels.Selector, error) {
	if ds.Spec.Selector == nil {
		return labels.Nothing(), nil
	}
	return labels.ValidatedSelectorFromSet(ds.Spec.Selector.MatchLabels)
}

func TestDaemonSetCommandRunsTheConfigMap(t *testing.T) {
	t.Parallel()
	b := loadK8s(t) // checks command, config path and key
	m, _ := b.mountFor(b.configPath)
	if !m.ReadOnly {
		t.Errorf("config mount %s is writable; want readOnly", m.MountPath)
	}
	// The image's entrypoint runs the same binary.
	df, err := os.ReadFile(deployPath(t, "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	ep := regexp.MustCompile(`(?m)^ENTRYPOINT \["([^"]+)"\]`).FindSubmatch(df)
	if ep == nil || string(ep[1]) != b.container.Command[0] {
		t.Errorf("Dockerfile ENTRYPOINT = %q; want [%q], the DaemonSet's command", ep, b.container.Command[0])
	}
	cmd := regexp.MustCompile(`(?m)^CMD \[(.*)\]`).FindSubmatch(df)
	if want := `"run", "--config", "` + b.configPath + `"`; cmd == nil || string(cmd[1]) != want {
		t.Errorf("Dockerfile CMD = %q; want [%s]", cmd, want)
	}
}

func (b *k8sBundle) checkEnv(t *testing.T, p *problems) {
	required, optional := configRefs(b.configText)
	wantField := map[string]string{"NODE_NAME": "spec.nodeName", "NODE_IP": "status.hostIP"}
	env := map[string]corev1.EnvVar{}
	for _, e := range b.container.Env {
		env[e.Name] = e
	}
	for name, field := range wantField {
		if !contains(required, name) {
			p.addf("the config does not use ${%s}", name)
		}
		e, ok := env[name]
		if !ok {
			p.addf("env %s is not set; the config expands ${%s}", name, name)
			continue
		}
		if e.ValueFrom == nil || e.ValueFrom.FieldRef == nil || e.ValueFrom.FieldRef.FieldPath != field {
			p.addf("env %s = %+v; want the downward API's %s", name, e, field)
		}
	}
	for _, name := range required {
		if _, ok := env[name]; !ok {
			p.addf("the config expands ${%s} but the container does not set it", name)
		}
	}
	// ${VAR:-default} references are for running the file elsewhere (tests); in the
	// DaemonSet the default applies.
	for _, name := range optional {
		if _, ok := env[name]; ok {
			p.addf("env %s is set; the config's ${%s:-...} default is what the DaemonSet means", name, name)
		}
	}
	if b.hostRoot != "/host" {
		p.addf("host_root in the DaemonSet = %q; want /host", b.hostRoot)
	}
}

// checkEnvRefs checks that every $(VAR) in a container's command, args and env values
// names a variable defined before it (the kubelet leaves unknown references as text).
func checkEnvRefs(t *testing.T, what string, c corev1.Container) {
	t.Helper()
	ref := regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)
	defined := map[string]bool{}
	for _, e := range c.Env {
		for _, m := range ref.FindAllStringSubmatch(e.Value, -1) {
			if !defined[m[1]] {
				t.Errorf("%s: env %s uses $(%s), which is not defined before it", what, e.Name, m[1])
			}
		}
		defined[e.Name] = true
	}
	for _, s := range append(append([]string{}, c.Command...), c.Args...) {
		for _, m := range ref.FindAllStringSubmatch(s, -1) {
			if !defined[m[1]] {
				t.Errorf("%s: command or args use $(%s), which is not in env", what, m[1])
			}
		}
	}
}

// expandEnvValue returns the value the kubelet gives env var name, with resource
// fields computed for the given memory limit.
func expandEnvValue(t *testing.T, c corev1.Container, name string, memLimit resource.Quantity) string {
	t.Helper()
	vals := map[string]string{}
	ref := regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)
	for _, e := range c.Env {
		v := e.Value
		if rf := e.ValueFrom; rf != nil && rf.FieldRef != nil {
			v = "$(" + e.Name + ")" // known only on the node: kept as the reference
		}
		if rf := e.ValueFrom; rf != nil && rf.ResourceFieldRef != nil {
			if rf.ResourceFieldRef.Resource != "limits.memory" {
				t.Fatalf("env %s: resource %s; want limits.memory", e.Name, rf.ResourceFieldRef.Resource)
			}
			if rf.ResourceFieldRef.ContainerName != "" && rf.ResourceFieldRef.ContainerName != c.Name {
				t.Fatalf("env %s: containerName %q; want %q", e.Name, rf.ResourceFieldRef.ContainerName, c.Name)
			}
			div := rf.ResourceFieldRef.Divisor
			if div.IsZero() {
				div = resource.MustParse("1")
			}
			// The kubelet rounds up: ceil(limit / divisor).
			v = strconv.FormatInt(int64(math.Ceil(float64(memLimit.Value())/float64(div.Value()))), 10)
		}
		v = ref.ReplaceAllStringFunc(v, func(r string) string {
			if x, ok := vals[ref.FindStringSubmatch(r)[1]]; ok {
				return x
			}
			return r
		})
		vals[e.Name] = v
	}
	v, ok := vals[name]
	if !ok {
		t.Fatalf("env %s is not set", name)
	}
	return v
}

func (b *k8sBundle) checkMemory(t *testing.T, p *problems) {
	limit, ok := b.container.Resources.Limits[corev1.ResourceMemory]
	if !ok {
		p.addf("no memory limit")
		return
	}
	if req, ok := b.container.Resources.Requests[corev1.ResourceMemory]; !ok || req.Cmp(limit) > 0 {
		p.addf("memory request %v; want one no larger than the limit %v", req.String(), limit.String())
	}
	otlpLimit := b.cfg.size(t, "otlp.memory_limit")
	// The shipped limit, and others an operator may set: GOMEMLIMIT must follow.
	for _, l := range []resource.Quantity{limit, resource.MustParse("300Mi"), resource.MustParse("2Gi"), resource.MustParse("1000M")} {
		s := expandEnvValue(t, b.container, "GOMEMLIMIT", l)
		got, err := parseSize(s)
		if err != nil {
			p.addf("limit %v: GOMEMLIMIT=%q is not a Go memory limit: %v", l.String(), s, err)
			continue
		}
		ratio := float64(got) / float64(l.Value())
		if ratio >= 1 || ratio < 0.9 {
			p.addf("limit %v: GOMEMLIMIT=%s is %.1f%% of it; want 90%%..100%%", l.String(), s, 100*ratio)
		}
		if l.Equal(limit) && got <= otlpLimit {
			p.addf("GOMEMLIMIT %d <= otlp.memory_limit %d: the relay's limit must come first", got, otlpLimit)
		}
	}
}

func (b *k8sBundle) checkProbes(t *testing.T, p *problems) {
	listen := b.cfg.str(t, "health.listen")
	ap, err := netip.ParseAddrPort(listen)
	if err != nil {
		p.addf("health.listen %q: %v", listen, err)
		return
	}
	spec := b.ds.Spec.Template.Spec
	probes := []struct {
		name  string
		probe *corev1.Probe
		path  string
	}{
		{"startupProbe", b.container.StartupProbe, livenessPath},
		{"livenessProbe", b.container.LivenessProbe, livenessPath},
		{"readinessProbe", b.container.ReadinessProbe, readinessPath},
	}
	for _, pr := range probes {
		if pr.probe == nil || pr.probe.HTTPGet == nil {
			p.addf("%s: not an httpGet probe", pr.name)
			continue
		}
		g := pr.probe.HTTPGet
		if g.Path != pr.path {
			p.addf("%s path = %q; want %q", pr.name, g.Path, pr.path)
		}
		if g.Scheme != "" && g.Scheme != corev1.URISchemeHTTP {
			p.addf("%s scheme = %q; want HTTP", pr.name, g.Scheme)
		}
		if g.Port.Type != intstr.Int || g.Port.IntValue() != int(ap.Port()) {
			p.addf("%s port = %s; want %d (health.listen %s) as a number", pr.name, g.Port.String(), ap.Port(), listen)
		}
		// Where the kubelet connects: probe.host, else the pod IP, which with
		// hostNetwork is the node IP.
		target := g.Host
		if target == "" {
			if !spec.HostNetwork {
				p.addf("%s: no host and no hostNetwork: the pod IP is not a node address", pr.name)
				continue
			}
			target = testNodeIP
		}
		tip, err := netip.ParseAddr(target)
		if err != nil {
			p.addf("%s host %q is not an IP", pr.name, target)
			continue
		}
		if ap.Addr() != tip && !ap.Addr().IsUnspecified() {
			p.addf("%s goes to %s:%d but health.listen is %s: the probe would be refused", pr.name, target, g.Port.IntValue(), listen)
		}
	}
	if d := b.container.LivenessProbe; d != nil && b.container.StartupProbe != nil {
		s := b.container.StartupProbe
		if window := time.Duration(s.PeriodSeconds*s.FailureThreshold) * time.Second; window < 30*time.Second {
			p.addf("startup probe allows %v; want at least 30s for hugepages and modules", window)
		}
	}
}

func (b *k8sBundle) checkRollout(t *testing.T, p *problems) {
	u := b.ds.Spec.UpdateStrategy
	if u.Type != appsv1.RollingUpdateDaemonSetStrategyType || u.RollingUpdate == nil {
		p.addf("updateStrategy = %+v; want RollingUpdate", u)
		return
	}
	if s := u.RollingUpdate.MaxSurge; s == nil || s.String() == "0" || s.String() == "0%" {
		p.addf("maxSurge = %v; want more than 0 so the new pod overlaps the old", s)
	}
	if s := u.RollingUpdate.MaxUnavailable; s == nil || (s.String() != "0" && s.String() != "0%") {
		p.addf("maxUnavailable = %v; want 0 (required when surging, and no node without an agent)", s)
	}
	// With hostNetwork every container port is a host port, and two pods with the same
	// host port never share a node: the surge pod would stay Pending.
	for _, port := range b.container.Ports {
		p.addf("container declares port %+v: with hostNetwork it is a hostPort and blocks maxSurge", port)
	}
	grace := b.ds.Spec.Template.Spec.TerminationGracePeriodSeconds
	need := b.cfg.duration(t, "shutdown_grace") + b.cfg.duration(t, "proxy.drain_timeout")
	if grace == nil || time.Duration(*grace)*time.Second < need {
		p.addf("terminationGracePeriodSeconds = %v; want at least shutdown_grace + proxy.drain_timeout = %v", grace, need)
	}
	if v, ok := b.cfg.get("steering.keep_on_exit"); !ok || v != true {
		p.addf("steering.keep_on_exit = %v; want true, so the old pod's exit does not unsteer the node during the overlap", v)
	}
}

// need is a path the config needs on the node.
type need struct {
	why       string
	container string // as nodeagent sees it
	host      string // on the node
	writable  bool
	propagate bool // Bidirectional: mounts made by nodeagent must reach the node
	own       bool // a mount of exactly this path (not a parent's)
}

func (b *k8sBundle) needs(t *testing.T) []need {
	c, hr := b.cfg, b.hostRoot
	under := func(p string) string { return path.Join(hr, p) }
	ns := []need{
		{why: "host_root", container: hr, host: "/"},
		{why: "host_root/proc (hugepages: kubelet start time, meminfo)", container: under("/proc"), host: "/proc"},
	}
	if c.has("hostprep") {
		sysctl := path.Dir(c.str(t, "hostprep.hugepages.sysctl_file"))
		mods := path.Dir(c.str(t, "hostprep.modules_file"))
		bpffs := c.str(t, "hostprep.bpffs")
		ns = append(ns,
			need{why: "hostprep.hugepages.sysctl_file", container: under(sysctl), host: sysctl, writable: true},
			need{why: "hostprep.modules_file", container: under(mods), host: mods, writable: true},
			need{why: "hugepage pool", container: under("/sys/kernel/mm/hugepages"), host: "/sys/kernel/mm/hugepages", writable: true},
			need{why: "hostprep.bpffs", container: under(bpffs), host: bpffs, writable: true, propagate: true},
		)
	}
	if c.has("spire") {
		dir := path.Dir(c.str(t, "spire.socket"))
		ns = append(ns, need{why: "spire.socket's directory", container: under(dir), host: dir, writable: true, propagate: true})
		if e := c.str(t, "spire.expose_at"); e != "" {
			d := path.Dir(e)
			ns = append(ns, need{why: "spire.expose_at's directory", container: under(d), host: d, writable: true, propagate: true})
		}
	}
	if c.has("steering") {
		bpffs := c.str(t, "steering.bpffs")
		// Read as a path under host_root, and as the process sees it: both must be
		// the node's bpffs (see the DaemonSet).
		ns = append(ns,
			need{why: "steering.bpffs under host_root", container: under(bpffs), host: bpffs, writable: true, propagate: true},
			need{why: "steering.bpffs", container: bpffs, host: bpffs, writable: true, propagate: true},
			need{why: "bpffs", container: under("/sys/fs/bpf"), host: "/sys/fs/bpf", writable: true, propagate: true, own: true},
		)
		cg := c.str(t, "steering.cgroup")
		if cg == "" {
			cg = "/sys/fs/cgroup" // the unified cgroup v2 root
		}
		ns = append(ns, need{why: "steering.cgroup", container: under(cg), host: cg, own: true})
	}
	if c.has("otlp") {
		q := c.str(t, "otlp.queue.dir")
		ns = append(ns, need{why: "otlp.queue.dir", container: q, host: q, writable: true})
	}
	return ns
}

func (b *k8sBundle) checkMounts(t *testing.T, p *problems) {
	for _, n := range b.needs(t) {
		host, m, ok := b.hostPathOf(n.container)
		if !ok {
			p.addf("%s: %s is not on a hostPath mount", n.why, n.container)
			continue
		}
		if host != n.host {
			p.addf("%s: %s is the node's %s; want %s", n.why, n.container, host, n.host)
		}
		if n.writable && m.ReadOnly {
			p.addf("%s: %s is on read-only mount %s; nodeagent writes there", n.why, n.container, m.MountPath)
		}
		if n.writable && path.Clean(m.MountPath) == path.Clean(b.hostRoot) {
			p.addf("%s: %s relies on the host_root mount; want its own mount", n.why, n.container)
		}
		if n.own && path.Clean(m.MountPath) != path.Clean(n.container) {
			p.addf("%s: %s is on mount %s; want a mount of its own", n.why, n.container, m.MountPath)
		}
		if n.propagate && (m.MountPropagation == nil || *m.MountPropagation != corev1.MountPropagationBidirectional) {
			p.addf("%s: mount %s propagation = %v; want Bidirectional", n.why, m.MountPath, m.MountPropagation)
		}
	}
	// host_root itself: read-only, and following the node's later mounts.
	m, vol := b.mountFor(b.hostRoot)
	if m == nil || vol == nil || vol.HostPath == nil || vol.HostPath.Path != "/" || path.Clean(m.MountPath) != b.hostRoot {
		p.addf("host_root %s: want the node's / mounted there", b.hostRoot)
	} else {
		if !m.ReadOnly {
			p.addf("host_root mount is writable; want readOnly with the written paths mounted on their own")
		}
		if m.MountPropagation == nil || *m.MountPropagation != corev1.MountPropagationHostToContainer {
			p.addf("host_root propagation = %v; want HostToContainer", m.MountPropagation)
		}
	}
	// Every volume is mounted and every mount has a volume.
	spec := b.ds.Spec.Template.Spec
	used := map[string]bool{}
	for _, vm := range b.container.VolumeMounts {
		used[vm.Name] = true
		if _, v := b.mountFor(vm.MountPath); v == nil {
			p.addf("mount %s names volume %q, which does not exist", vm.MountPath, vm.Name)
		}
	}
	for _, v := range spec.Volumes {
		if !used[v.Name] {
			p.addf("volume %q is not mounted", v.Name)
		}
	}
}

func TestWorkloadExamples(t *testing.T) {
	t.Parallel()
	b := loadK8s(t)
	objs := loadManifests(t, deployPath(t, "examples"), "local.yaml")
	pods := map[string]*corev1.Pod{}
	for _, o := range objs {
		if p, ok := o.obj.(*corev1.Pod); ok {
			pods[p.Name] = p
			for _, c := range p.Spec.Containers {
				checkEnvRefs(t, o.file, c)
			}
		}
	}

	t.Run("otlp and spire", func(t *testing.T) {
		p := pods["otlp-workload"]
		if p == nil {
			t.Fatal("no pod otlp-workload in deploy/examples")
		}
		c := p.Spec.Containers[0]
		grpc := b.cfg.str(t, "otlp.grpc_listen")
		if !strings.HasPrefix(lineOf(b.configText, "grpc_listen:"), "grpc_listen: ${NODE_IP}:") {
			t.Errorf("otlp.grpc_listen is %q; want ${NODE_IP}:PORT so pods reach it", grpc)
		}
		_, port, _ := net.SplitHostPort(grpc)
		nodeIPVar := ""
		for _, e := range c.Env {
			if e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "status.hostIP" {
				nodeIPVar = e.Name
			}
		}
		if nodeIPVar == "" {
			t.Fatal("the workload has no env var from status.hostIP")
		}
		endpoint := expandEnvValue(t, c, "OTEL_EXPORTER_OTLP_ENDPOINT", resource.MustParse("1Mi"))
		if want := "http://$(" + nodeIPVar + "):" + port; endpoint != want {
			t.Errorf("OTEL_EXPORTER_OTLP_ENDPOINT = %q; want %q", endpoint, want)
		}
		for _, a := range c.Args {
			if strings.HasPrefix(a, "--otlp-endpoint=") && a != "--otlp-endpoint=$("+nodeIPVar+"):"+port {
				t.Errorf("telemetrygen %s; want --otlp-endpoint=$(%s):%s", a, nodeIPVar, port)
			}
		}
		sock := b.cfg.str(t, "spire.socket")
		m, vol := mountFor(p.Spec, c, path.Dir(sock))
		if m == nil || vol == nil || vol.HostPath == nil || vol.HostPath.Path != path.Dir(sock) {
			t.Fatalf("the workload does not mount the node's %s (spire.socket's directory)", path.Dir(sock))
		}
		if !m.ReadOnly {
			t.Errorf("SPIRE socket mount is writable; read-only is enough to connect")
		}
		wantSock := "unix://" + path.Join(m.MountPath, path.Base(sock))
		if got := expandEnvValue(t, c, "SPIFFE_ENDPOINT_SOCKET", resource.MustParse("1Mi")); got != wantSock {
			t.Errorf("SPIFFE_ENDPOINT_SOCKET = %q; want %q", got, wantSock)
		}
	})

	t.Run("mapped address", func(t *testing.T) {
		p := pods["mapped-address-workload"]
		if p == nil {
			t.Fatal("no pod mapped-address-workload in deploy/examples")
		}
		c := p.Spec.Containers[0]
		host := expandEnvValue(t, c, "TARGET_HOST", resource.MustParse("1Mi"))
		port := expandEnvValue(t, c, "TARGET_PORT", resource.MustParse("1Mi"))
		amap, ok := b.cfg.get("proxy.address_map")
		if !ok {
			t.Fatal("the config has no proxy.address_map")
		}
		m := amap.(map[string]any)
		_, byIP := m[host]
		_, byIPPort := m[net.JoinHostPort(host, port)]
		if !byIP && !byIPPort {
			t.Errorf("the workload dials %s:%s, which proxy.address_map does not map", host, port)
		}
		redirect := b.cfg.str(t, "steering.pod_redirect")
		if redirect == "" || !contains(b.cfg.strs(t, "proxy.listen"), redirect) {
			t.Errorf("steering.pod_redirect %q is not one of proxy.listen %v: pod connections would not reach the proxy", redirect, b.cfg.strs(t, "proxy.listen"))
		}
		script := strings.Join(c.Command, " ")
		if !strings.Contains(script, "${TARGET_HOST}") || !strings.Contains(script, "${TARGET_PORT}") {
			t.Errorf("the workload's command does not dial ${TARGET_HOST} ${TARGET_PORT}: %q", script)
		}
	})
}

// lineOf returns the first line of text containing s, trimmed.
func lineOf(text, s string) string {
	for _, l := range strings.Split(text, "\n") {
		if strings.Contains(l, s) {
			return strings.TrimSpace(l)
		}
	}
	return ""
}

// The shipped config passes `nodeagent check` with host_root pointed at a temporary
// tree: exit 0 or 1 (checks may fail on this machine), never 2 (invalid config). The
// check changes nothing in that tree.
func TestConfigMapPassesCheck(t *testing.T) {
	t.Parallel()
	b := loadK8s(t)
	dir := t.TempDir()
	file := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(file, []byte(b.configText), 0o644); err != nil {
		t.Fatal(err)
	}
	hostRoot := filepath.Join(dir, "host")
	for _, d := range []string{"proc", "sys/fs/cgroup", "sys/fs/bpf", "etc/sysctl.d", "etc/modules-load.d", "run/spire/agent-sockets"} {
		if err := os.MkdirAll(filepath.Join(hostRoot, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	before := snapshot(t, hostRoot)
	// 127.0.0.2: a loopback address of this machine that is not 127.0.0.1, so the
	// listeners on 127.0.0.1 and on ${NODE_IP} are distinct, as on a node.
	env := map[string]string{"NODE_NAME": testNodeName, "NODE_IP": "127.0.0.2", "HOST_ROOT": hostRoot}
	code, res, stderr := runCheck(t, file, env)
	if code == 2 {
		t.Fatalf("nodeagent check exit 2: the shipped ConfigMap config is invalid:\n%s", stderr)
	}
	if code != 0 && code != 1 {
		t.Fatalf("nodeagent check exit %d; want 0 or 1\n%s", code, stderr)
	}
	if res.Node != testNodeName {
		t.Errorf("check node = %q; want %q (from ${NODE_NAME})", res.Node, testNodeName)
	}
	got := map[string]bool{}
	for _, c := range res.Checks {
		got[c.Name] = true
	}
	for _, name := range []string{"hugepages", "modules", "iommu", "uplink", "spire", "steering", "proxy", "otlp"} {
		if !got[name] {
			t.Errorf("check output has no %q check; the config enables it (got %v)", name, res.Checks)
		}
	}
	if after := snapshot(t, hostRoot); after != before {
		t.Errorf("nodeagent check changed host_root:\nbefore:\n%s\nafter:\n%s", before, after)
	}

	// The same run fails with exit 2 when the file is broken: the check above can fail.
	bad := filepath.Join(dir, "bad.yaml")
	if err := os.WriteFile(bad, []byte(b.configText+"\nno_such_key: 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if code, _, _ := runCheck(t, bad, env); code != 2 {
		t.Errorf("nodeagent check on a config with an unknown key: exit %d; want 2", code)
	}
}

// snapshot lists every file and directory under root with mode, size and content.
func snapshot(t *testing.T, root string) string {
	t.Helper()
	var sb strings.Builder
	err := filepath.Walk(root, func(p string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		sb.WriteString(rel + " " + info.Mode().String() + " " + strconv.FormatInt(info.Size(), 10))
		if info.Mode().IsRegular() {
			data, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			sb.WriteString(" " + strconv.Quote(string(data)))
		}
		sb.WriteString("\n")
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return sb.String()
}

// The uninstall DaemonSet runs `nodeagent run --cleanup` with the same config and the
// same mounts as the agent, so it finds and removes exactly what the agent left.
func TestUninstallCleanupDaemonSet(t *testing.T) {
	t.Parallel()
	b := loadK8s(t)
	objs := loadManifests(t, deployPath(t, "kubernetes", "uninstall"))
	ds := only[*appsv1.DaemonSet](t, objs)
	if ds.Namespace != b.ns.Name {
		t.Errorf("cleanup DaemonSet namespace %q; want %q", ds.Namespace, b.ns.Name)
	}
	spec := ds.Spec.Template.Spec
	if len(spec.InitContainers) != 1 {
		t.Fatalf("cleanup DaemonSet has %d init containers; want 1", len(spec.InitContainers))
	}
	c := spec.InitContainers[0]
	want := []string{b.container.Command[0], "run", "--cleanup", "--config", b.configPath}
	if got := append(append([]string{}, c.Command...), c.Args...); strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("cleanup runs %q; want %q", got, want)
	}
	if c.Image != b.container.Image {
		t.Errorf("cleanup image %q; want the agent's %q", c.Image, b.container.Image)
	}
	mainSpec := b.ds.Spec.Template.Spec
	gotVols, _ := yaml.Marshal(spec.Volumes)
	wantVols, _ := yaml.Marshal(mainSpec.Volumes)
	if string(gotVols) != string(wantVols) {
		t.Errorf("cleanup volumes differ from the agent's:\n%s\nwant:\n%s", gotVols, wantVols)
	}
	gotMounts, _ := yaml.Marshal(c.VolumeMounts)
	wantMounts, _ := yaml.Marshal(b.container.VolumeMounts)
	if string(gotMounts) != string(wantMounts) {
		t.Errorf("cleanup mounts differ from the agent's:\n%s\nwant:\n%s", gotMounts, wantMounts)
	}
	for _, name := range []string{"NODE_NAME", "NODE_IP"} {
		found := false
		for _, e := range c.Env {
			found = found || e.Name == name
		}
		if !found {
			t.Errorf("cleanup does not set %s, which the config expands", name)
		}
	}
	if c.SecurityContext == nil || c.SecurityContext.Privileged == nil || !*c.SecurityContext.Privileged {
		t.Errorf("cleanup is not privileged; detaching programs needs it")
	}
	if !spec.HostNetwork || spec.HostPID || spec.PriorityClassName != mainSpec.PriorityClassName {
		t.Errorf("cleanup pod hostNetwork=%v hostPID=%v priority=%q; want the agent's", spec.HostNetwork, spec.HostPID, spec.PriorityClassName)
	}
}
