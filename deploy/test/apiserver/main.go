// Command apiserver-validate runs the API server's own validation (k8s.io/kubernetes,
// as kube-apiserver --allow-privileged=true does on create) and the Pod Security
// Admission checks on Kubernetes manifests, and prints one JSON line per document:
//
//	{"file": ..., "kind": ..., "name": ..., "errors": [...], "baseline": [...], "restricted": [...]}
//
// errors are what the API server would reject; baseline and restricted list what Pod
// Security Admission would forbid at those levels (informational). Exit status 1 when
// any document has errors or cannot be decoded.
//
// It is a module of its own (k8s.io/kubernetes is heavy and needs replace directives),
// built and run by the tests in deploy/test.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/kubernetes/pkg/api/legacyscheme"
	"k8s.io/kubernetes/pkg/apis/apps"
	_ "k8s.io/kubernetes/pkg/apis/apps/install"
	appsvalidation "k8s.io/kubernetes/pkg/apis/apps/validation"
	"k8s.io/kubernetes/pkg/apis/core"
	_ "k8s.io/kubernetes/pkg/apis/core/install"
	corevalidation "k8s.io/kubernetes/pkg/apis/core/validation"
	"k8s.io/kubernetes/pkg/capabilities"
	psaapi "k8s.io/pod-security-admission/api"
	"k8s.io/pod-security-admission/policy"
)

type result struct {
	File       string   `json:"file"`
	Kind       string   `json:"kind"`
	Name       string   `json:"name"`
	Errors     []string `json:"errors"`
	Baseline   []string `json:"baseline"`
	Restricted []string `json:"restricted"`
}

func main() {
	capabilities.Setup(true, 0) // kube-apiserver --allow-privileged=true (the default)
	psa, err := policy.NewEvaluator(policy.DefaultChecks(), nil)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	failed := false
	enc := json.NewEncoder(os.Stdout)
	for _, f := range os.Args[1:] {
		data, err := os.ReadFile(f)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		for _, doc := range regexp.MustCompile(`(?m)^---\s*$`).Split(string(data), -1) {
			if strings.TrimSpace(regexp.MustCompile(`(?m)^\s*#.*$`).ReplaceAllString(doc, "")) == "" {
				continue
			}
			r := validate(f, []byte(doc), psa)
			failed = failed || len(r.Errors) > 0
			if err := enc.Encode(r); err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(2)
			}
		}
	}
	if failed {
		os.Exit(1)
	}
}

func validate(file string, doc []byte, psa policy.Evaluator) result {
	r := result{File: file, Errors: []string{}, Baseline: []string{}, Restricted: []string{}}
	obj, gvk, err := legacyscheme.Codecs.UniversalDeserializer().Decode(doc, nil, nil)
	if err != nil {
		r.Errors = append(r.Errors, "decode: "+err.Error())
		return r
	}
	r.Kind = gvk.Kind
	// Pod Security Admission looks at the versioned pod spec, as admission does.
	var podMeta *metav1.ObjectMeta
	var podSpec *corev1.PodSpec
	switch o := obj.(type) {
	case *corev1.Pod:
		podMeta, podSpec = &o.ObjectMeta, &o.Spec
	case *appsv1.DaemonSet:
		podMeta, podSpec = &o.Spec.Template.ObjectMeta, &o.Spec.Template.Spec
	}
	if podSpec != nil {
		for _, lv := range []struct {
			level psaapi.Level
			out   *[]string
		}{{psaapi.LevelBaseline, &r.Baseline}, {psaapi.LevelRestricted, &r.Restricted}} {
			for _, c := range psa.EvaluatePod(psaapi.LevelVersion{Level: lv.level, Version: psaapi.LatestVersion()}, podMeta, podSpec) {
				if !c.Allowed {
					*lv.out = append(*lv.out, c.ForbiddenReason+": "+c.ForbiddenDetail)
				}
			}
		}
	}

	legacyscheme.Scheme.Default(obj)
	internal, err := legacyscheme.Scheme.ConvertToVersion(obj, runtime.InternalGroupVersioner)
	if err != nil {
		r.Errors = append(r.Errors, "convert: "+err.Error())
		return r
	}
	opts := corevalidation.PodValidationOptions{}
	var errs []error
	switch o := internal.(type) {
	case *apps.DaemonSet:
		r.Name = o.Name
		for _, e := range appsvalidation.ValidateDaemonSet(o, opts) {
			errs = append(errs, e)
		}
	case *core.Pod:
		r.Name = o.Name
		if o.Namespace == "" {
			o.Namespace = "default" // kubectl apply sends the current namespace
		}
		for _, e := range corevalidation.ValidatePodCreate(o, opts) {
			errs = append(errs, e)
		}
	case *core.ConfigMap:
		r.Name = o.Name
		for _, e := range corevalidation.ValidateConfigMap(o) {
			errs = append(errs, e)
		}
	case *core.Namespace:
		r.Name = o.Name
		for _, e := range corevalidation.ValidateNamespace(o) {
			errs = append(errs, e)
		}
	case *core.ServiceAccount:
		r.Name = o.Name
		for _, e := range corevalidation.ValidateServiceAccount(o) {
			errs = append(errs, e)
		}
	default:
		errs = append(errs, fmt.Errorf("no validation for %T", o))
	}
	for _, e := range errs {
		r.Errors = append(r.Errors, e.Error())
	}
	return r
}
