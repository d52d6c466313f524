package hostprep

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// The block of lines nodeagent owns in a shared file. Lines outside it belong to
// someone else and are kept as they are.
const (
	blockBegin = "# BEGIN nodeagent hostprep (managed: edits inside this block are overwritten)"
	blockEnd   = "# END nodeagent hostprep"
	tmpInfix   = ".nodeagent-tmp-"
)

// errReadOnly is returned when a file nodeagent would change has no write permission
// for its owner: the operator has locked it, so it is left alone.
var errReadOnly = errors.New("file is read-only (no owner write permission): not changing it")

// managedFile is a file's lines split around nodeagent's block.
type managedFile struct {
	exists  bool
	mode    fs.FileMode
	uid     int
	gid     int
	content []byte
	before  []string // foreign lines before the block (or all foreign lines when there is none)
	block   []string // lines inside the first block, markers excluded
	after   []string // foreign lines after the block
	hasBlk  bool
}

// readManaged reads path (missing is fine: an empty file) and finds nodeagent's block.
// A second block (a hand copy, a bad merge) is dropped; its lines are not foreign.
func readManaged(path string) (*managedFile, error) {
	mf := &managedFile{mode: 0o644}
	st, err := os.Lstat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return mf, nil
	case err != nil:
		return nil, fmt.Errorf("stat %s: %w", path, err)
	case st.Mode()&fs.ModeSymlink != 0:
		// Its target may be absolute, meant for the host's /, not host_root; and the
		// rename would replace the link, not the file. Name the file itself instead.
		return nil, fmt.Errorf("%s is a symbolic link: not following it (configure the file it points to)", path)
	case !st.Mode().IsRegular():
		return nil, fmt.Errorf("%s is not a regular file", path)
	}
	mf.exists = true
	mf.mode = st.Mode().Perm()
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		mf.uid, mf.gid = int(sys.Uid), int(sys.Gid)
	}
	mf.content, err = os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	text := strings.TrimSuffix(string(mf.content), "\n")
	if text == "" {
		return mf, nil
	}
	in := false
	for _, line := range strings.Split(text, "\n") {
		trimmed := strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(trimmed, "# BEGIN nodeagent"):
			in = true
		case strings.HasPrefix(trimmed, "# END nodeagent"):
			in = false
			mf.hasBlk = true
		case in && !mf.hasBlk:
			mf.block = append(mf.block, line)
		case in:
			// a later duplicate block: dropped
		case mf.hasBlk:
			mf.after = append(mf.after, line)
		default:
			mf.before = append(mf.before, line)
		}
	}
	if in { // BEGIN without END: everything after BEGIN was ours
		mf.hasBlk = true
	}
	return mf, nil
}

// render returns the file's content with block as nodeagent's lines, in the place of the
// old block or appended at the end. An empty block removes the block.
func (mf *managedFile) render(before, block, after []string) []byte {
	var b bytes.Buffer
	for _, l := range before {
		b.WriteString(l)
		b.WriteByte('\n')
	}
	if len(block) > 0 {
		b.WriteString(blockBegin + "\n")
		for _, l := range block {
			b.WriteString(l)
			b.WriteByte('\n')
		}
		b.WriteString(blockEnd + "\n")
	}
	for _, l := range after {
		b.WriteString(l)
		b.WriteByte('\n')
	}
	return b.Bytes()
}

// writeResult says what a write did, for details and the change counter.
type writeResult int

const (
	unchanged writeResult = iota
	created
	updated
)

func (w writeResult) String() string {
	switch w {
	case created:
		return "created"
	case updated:
		return "updated"
	default:
		return "unchanged"
	}
}

// writeAtomic replaces path with content unless it already holds exactly that: a
// temporary file in the same directory is written, fsynced, given the old file's mode
// and owner, renamed over path, and the directory is fsynced. A crash leaves either the
// old or the new file, never a mix; leftovers of an earlier crash are removed first.
func writeAtomic(mf *managedFile, path string, content []byte) (writeResult, error) {
	if mf.exists && bytes.Equal(mf.content, content) {
		return unchanged, nil
	}
	if mf.exists && mf.mode&0o200 == 0 {
		return unchanged, fmt.Errorf("%s: %w", path, errReadOnly)
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return unchanged, fmt.Errorf("create directory %s: %w", dir, err)
	}
	removeStaleTemps(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+tmpInfix+"*")
	if err != nil {
		return unchanged, fmt.Errorf("create temporary file for %s: %w", path, err)
	}
	tmp := f.Name()
	fail := func(what string, err error) (writeResult, error) {
		f.Close()
		os.Remove(tmp)
		return unchanged, fmt.Errorf("%s %s: %w", what, tmp, err)
	}
	if _, err := f.Write(content); err != nil {
		return fail("write", err)
	}
	if err := f.Chmod(mf.mode); err != nil {
		return fail("chmod", err)
	}
	if mf.exists {
		if err := f.Chown(mf.uid, mf.gid); err != nil {
			return fail("chown", err)
		}
	}
	if err := f.Sync(); err != nil {
		return fail("fsync", err)
	}
	if err := f.Close(); err != nil {
		os.Remove(tmp)
		return unchanged, fmt.Errorf("close %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return unchanged, fmt.Errorf("rename %s to %s: %w", tmp, path, err)
	}
	if err := syncDir(dir); err != nil {
		return updated, err
	}
	if mf.exists {
		return updated, nil
	}
	return created, nil
}

// removeStaleTemps removes temporary files a crashed earlier write left next to path.
func removeStaleTemps(path string) {
	matches, _ := filepath.Glob(filepath.Join(filepath.Dir(path), "."+globEscape(filepath.Base(path))+tmpInfix+"*"))
	for _, m := range matches {
		os.Remove(m)
	}
}

func globEscape(s string) string {
	r := strings.NewReplacer(`*`, `\*`, `?`, `\?`, `[`, `\[`, `\`, `\\`)
	return r.Replace(s)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("open directory %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync directory %s: %w", dir, err)
	}
	return nil
}
