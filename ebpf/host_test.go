package ebpf

import (
	"errors"
	"strings"
	"testing"
)

func TestCgroup2Mount(t *testing.T) {
	tests := []struct {
		name    string
		mounts  string
		want    string
		wantErr error
	}{
		{"hybrid", "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n", "/sys/fs/cgroup/unified", nil},
		{"unified", "proc /proc proc rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n", "/sys/fs/cgroup", nil},
		{"escaped", `none /run/my\040cgroup cgroup2 rw 0 0` + "\n", "/run/my cgroup", nil},
		{"v1 only", "cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n", "", errNoCgroup2},
		{"empty", "", "", errNoCgroup2},
	}
	for _, tc := range tests {
		got, err := cgroup2Mount(strings.NewReader(tc.mounts))
		if got != tc.want || !errors.Is(err, tc.wantErr) {
			t.Errorf("%s: got %q, %v; want %q, %v", tc.name, got, err, tc.want, tc.wantErr)
		}
	}
}

func TestUnescapeMount(t *testing.T) {
	for in, want := range map[string]string{
		`/a\040b`:     "/a b",
		`/tab\011x`:   "/tab\tx",
		`/back\134s`:  `/back\s`,
		`/short\04`:   `/short\04`,
		`/notoct\089`: `/notoct\089`,
		"/plain":      "/plain",
	} {
		if got := unescapeMount(in); got != want {
			t.Errorf("unescapeMount(%q): got %q; want %q", in, got, want)
		}
	}
}
