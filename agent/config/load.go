package config

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"reflect"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
)

// ErrInvalid marks every error that means "the configuration is wrong" (exit code 2).
var ErrInvalid = errors.New("invalid configuration")

// Load reads, expands, strictly decodes, defaults and validates the file at path.
// Every error it returns wraps ErrInvalid.
func Load(path string) (*Config, error) {
	cfg, err := load(path)
	if cfg == nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	// Decoding problems and validation problems are reported together.
	if verr := cfg.Validate(); verr != nil {
		if err != nil {
			return nil, fmt.Errorf("%w: %w\n%s: %w", ErrInvalid, err, path, verr)
		}
		return nil, fmt.Errorf("%w: %s: %w", ErrInvalid, path, verr)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	return cfg, nil
}

func load(path string) (*Config, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	if st.IsDir() {
		return nil, fmt.Errorf("read config: %s is a directory, not a file", path)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	cfg, err := Parse(data)
	if cfg != nil {
		cfg.File = path
	}
	if err != nil {
		lines := strings.Split(err.Error(), "\n")
		for i, l := range lines {
			lines[i] = path + ":" + l
		}
		return cfg, errors.New(strings.Join(lines, "\n"))
	}
	return cfg, nil
}

// Parse decodes a configuration document (without validating it). Errors are of the
// form "LINE: key.path: problem" (one per line) so that the caller can prefix the file.
// On unknown keys and type errors it still returns what it decoded, so that Validate
// can report its problems in the same pass; on a syntax error the Config is nil.
func Parse(data []byte) (*Config, error) {
	// ${...} is hidden behind a brace-free token while parsing, so that it is allowed
	// anywhere a scalar is, flow style included ({ k8s.node.name: ${NODE_NAME} }).
	var refs []string
	data = envRef.ReplaceAllFunc(data, func(ref []byte) []byte {
		refs = append(refs, string(ref))
		return fmt.Appendf(nil, "__nodeagent_env_%d__", len(refs)-1)
	})
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf(" %s", strings.TrimPrefix(err.Error(), "yaml: "))
	}
	if doc.Kind == 0 || len(doc.Content) == 0 || isNull(doc.Content[0]) {
		return nil, fmt.Errorf(" empty file: want a YAML mapping of sections (see the configuration reference)")
	}
	root := doc.Content[0]
	if root.Kind != yaml.MappingNode {
		return nil, fmt.Errorf("%d: want a YAML mapping of sections at the top level", root.Line)
	}

	cfg := defaultConfig()
	cfg.unset = expandEnv(root, refs)

	paths := map[int]string{}
	var problems []string
	checkKeys(root, reflect.TypeOf(cfg), "", paths, &problems)

	// Present sections start from their defaults; the decoder fills in what the file says.
	for i := 0; i+1 < len(root.Content); i += 2 {
		if isNull(root.Content[i+1]) {
			continue
		}
		switch root.Content[i].Value {
		case "hostprep":
			cfg.Hostprep = defaultHostprep()
		case "uplink":
			cfg.Uplink = defaultUplink()
		case "spire":
			cfg.Spire = defaultSpire()
		case "steering":
			cfg.Steering = defaultSteering()
		case "proxy":
			cfg.Proxy = defaultProxy()
		case "otlp":
			cfg.OTLP = defaultOTLP()
		}
	}
	if err := root.Decode(&cfg); err != nil {
		var te *yaml.TypeError
		if !errors.As(err, &te) {
			return nil, fmt.Errorf(" %w", err)
		}
		for _, e := range te.Errors {
			problems = append(problems, withPath(e, paths))
		}
	}
	cfg.fillDerived()
	if len(problems) > 0 {
		sort.SliceStable(problems, func(i, j int) bool { return lineOf(problems[i]) < lineOf(problems[j]) })
		return &cfg, errors.New(strings.Join(problems, "\n"))
	}
	return &cfg, nil
}

func isNull(n *yaml.Node) bool { return n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null" }

var envRef = regexp.MustCompile(`\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}`)

// envToken stands in for a ${...} reference while the document is parsed.
var envToken = regexp.MustCompile(`__nodeagent_env_(\d+)__`)

// expandEnv replaces ${VAR} and ${VAR:-default} in every scalar value (never in keys,
// and after parsing, so a variable cannot inject YAML structure). A plain scalar that
// changed has its type re-resolved, so `count: ${PAGES}` decodes as a number.
// It returns the variables referenced without a default that are not set.
func expandEnv(n *yaml.Node, refs []string) (unset []string) {
	var walk func(n *yaml.Node, isKey bool)
	walk = func(n *yaml.Node, isKey bool) {
		switch n.Kind {
		case yaml.ScalarNode:
			if !envToken.MatchString(n.Value) {
				return
			}
			n.Value = envToken.ReplaceAllStringFunc(n.Value, func(tok string) string {
				i, _ := strconv.Atoi(envToken.FindStringSubmatch(tok)[1])
				return expandRef(refs[i], isKey, &unset)
			})
			if n.Style == 0 && !isKey {
				n.Tag = ""
			}
		case yaml.MappingNode:
			for i, c := range n.Content {
				walk(c, i%2 == 0)
			}
		default:
			for _, c := range n.Content {
				walk(c, false)
			}
		}
	}
	walk(n, false)
	return unset
}

// expandRef expands one ${VAR} or ${VAR:-default}; keys are never expanded.
func expandRef(ref string, isKey bool, unset *[]string) string {
	if isKey {
		return ref
	}
	m := envRef.FindStringSubmatch(ref)
	v, ok := os.LookupEnv(m[1])
	if m[2] != "" && v == "" {
		return m[3]
	}
	if !ok {
		*unset = append(*unset, m[1])
	}
	return v
}

// checkKeys walks the document beside the Go type it decodes into, reports every key
// the type does not have, and records the key path of every line for error messages.
func checkKeys(n *yaml.Node, t reflect.Type, path string, paths map[int]string, problems *[]string) {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if path != "" && n.Kind != yaml.MappingNode && n.Kind != yaml.SequenceNode {
		record(paths, n.Line, path)
	}
	switch {
	case n.Kind == yaml.MappingNode && t.Kind() == reflect.Struct:
		fields := yamlFields(t)
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			p := join(path, k.Value)
			record(paths, k.Line, p)
			f, ok := fields[k.Value]
			if !ok {
				*problems = append(*problems, fmt.Sprintf("%d: %s: unknown key%s", k.Line, p, suggest(k.Value, fields)))
				continue
			}
			checkKeys(v, f, p, paths, problems)
		}
	case n.Kind == yaml.MappingNode && t.Kind() == reflect.Map:
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			p := join(path, k.Value)
			record(paths, k.Line, p)
			checkKeys(v, t.Elem(), p, paths, problems)
		}
	case n.Kind == yaml.SequenceNode && t.Kind() == reflect.Slice:
		for i, c := range n.Content {
			checkKeys(c, t.Elem(), fmt.Sprintf("%s[%d]", path, i), paths, problems)
		}
	}
}

// record notes that line holds path. Several keys on one line (flow style) leave the
// path they share, since the decoder's messages give only the line.
func record(paths map[int]string, line int, path string) {
	old, ok := paths[line]
	if !ok || strings.HasPrefix(path, old) {
		if !ok {
			paths[line] = path
		}
		return
	}
	for !strings.HasPrefix(path, old+".") && old != "" {
		i := strings.LastIndexAny(old, ".[")
		if i < 0 {
			old = ""
			break
		}
		old = old[:i]
	}
	paths[line] = old
}

func yamlFields(t reflect.Type) map[string]reflect.Type {
	out := map[string]reflect.Type{}
	for i := range t.NumField() {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if name == "-" || !f.IsExported() {
			continue
		}
		out[name] = f.Type
	}
	return out
}

// suggest names a known key that differs from the unknown one only in case or in
// '_' versus '.' or '-' (the classic `vm_nr.hugepages` kind of slip).
func suggest(key string, fields map[string]reflect.Type) string {
	norm := func(s string) string { return strings.NewReplacer("-", "_", ".", "_").Replace(strings.ToLower(s)) }
	for name := range fields {
		if norm(name) == norm(key) || editDistance(norm(name), norm(key)) <= 2 {
			return fmt.Sprintf(" (did you mean %q?)", name)
		}
	}
	names := make([]string, 0, len(fields))
	for name := range fields {
		names = append(names, name)
	}
	sort.Strings(names)
	return " (known keys: " + strings.Join(names, ", ") + ")"
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

var linePrefix = regexp.MustCompile(`^line (\d+): `)

// withPath turns the decoder's "line 7: cannot unmarshal ..." into "7: proxy.listen: cannot unmarshal ...".
func withPath(e string, paths map[int]string) string {
	m := linePrefix.FindStringSubmatch(e)
	if m == nil {
		return " " + e
	}
	line, _ := strconv.Atoi(m[1])
	msg := strings.TrimPrefix(e, m[0])
	msg = strings.ReplaceAll(msg, "config.", "")
	if p, ok := paths[line]; ok {
		return fmt.Sprintf("%d: %s: %s", line, p, msg)
	}
	return fmt.Sprintf("%d: %s", line, msg)
}

func lineOf(problem string) int {
	n, _ := strconv.Atoi(problem[:max(0, bytes.IndexByte([]byte(problem), ':'))])
	return n
}

func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur := make([]int, len(b)+1)
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev = cur
	}
	return prev[len(b)]
}
