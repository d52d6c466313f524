package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nodeagent/nodeagent/agent"
)

var binary string

// TestMain builds the real binary once: these tests drive it the way an operator
// and systemd do, with signals, exit codes and file descriptors.
func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "nodeagent-bin")
	if err != nil {
		panic(err)
	}
	binary = filepath.Join(dir, "nodeagent")
	out, err := exec.Command("go", "build", "-o", binary, ".").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "build: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func writeFile(t *testing.T, dir, name, body string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func TestUsageAndExitCodes(t *testing.T) {
	dir := t.TempDir()
	bad := writeFile(t, dir, "bad.yaml", "proxy:\n  clusters:\n    db:\n      endpoints: [10.0.0.4:5432, 10.0.0.5]\n")
	good := writeFile(t, dir, "good.yaml", "node_name: n1\n")
	// Valid for the config package, refused by the spire subsystem's own rules.
	subsys := writeFile(t, dir, "subsys.yaml", "spire: {socket: /api.sock}\n")
	tests := []struct {
		args     []string
		code     int
		inStderr string
		inStdout string
	}{
		{nil, 2, "usage:", ""},
		{[]string{"frobnicate"}, 2, `unknown command "frobnicate"`, ""},
		{[]string{"version"}, 0, "", "nodeagent "},
		{[]string{"run"}, 2, "--config FILE is required", ""},
		{[]string{"run", "--config", bad}, 2, `proxy.clusters.db.endpoints[1]: "10.0.0.5" has no port`, ""},
		{[]string{"check", "--config", bad}, 2, "bad.yaml", ""},
		{[]string{"check", "--config", dir}, 2, "is a directory", ""},
		{[]string{"check", "--config", subsys}, 2, `spire.socket: "/api.sock" must be in a directory of its own`, ""},
		{[]string{"check", "--config", good, "--output", "yaml"}, 2, `--output "yaml"`, ""},
		{[]string{"check", "--config", good, "extra"}, 2, `unexpected argument "extra"`, ""},
		{[]string{"check", "--config", good}, 0, "", "CHECK"},
		{[]string{"status", "--addr", freePort(t)}, 1, "no agent answers", ""},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			cmd := exec.Command(binary, tt.args...)
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			err := cmd.Run()
			code := 0
			if ee, ok := err.(*exec.ExitError); ok {
				code = ee.ExitCode()
			} else if err != nil {
				t.Fatal(err)
			}
			if code != tt.code {
				t.Errorf("exit %d; want %d\nstderr: %s", code, tt.code, stderr.String())
			}
			if !strings.Contains(stderr.String(), tt.inStderr) {
				t.Errorf("stderr %q; want it to contain %q", stderr.String(), tt.inStderr)
			}
			if !strings.Contains(stdout.String(), tt.inStdout) {
				t.Errorf("stdout %q; want it to contain %q", stdout.String(), tt.inStdout)
			}
		})
	}
}

// notifyListener is a fake systemd NOTIFY_SOCKET.
func notifyListener(t *testing.T) (string, <-chan string) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	msgs := make(chan string, 128)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				close(msgs)
				return
			}
			msgs <- string(buf[:n])
		}
	}()
	return sock, msgs
}

func awaitMsg(t *testing.T, msgs <-chan string, want string) {
	t.Helper()
	deadline := time.After(15 * time.Second)
	var seen []string
	for {
		select {
		case m := <-msgs:
			seen = append(seen, m)
			if strings.Contains(m, want) {
				return
			}
		case <-deadline:
			t.Fatalf("no %q from the agent; saw %q", want, seen)
		}
	}
}

func status(t *testing.T, addr string) agent.StatusDoc {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/status")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var doc agent.StatusDoc
	if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil {
		t.Fatal(err)
	}
	return doc
}

func TestRunNotifiesReadyAndStoppingAndSurvivesABadReload(t *testing.T) {
	dir := t.TempDir()
	addr := freePort(t)
	cfgPath := writeFile(t, dir, "config.yaml", fmt.Sprintf("node_name: n1\nhealth: {listen: %q}\nlog: {format: text}\n", addr))
	sock, msgs := notifyListener(t)

	cmd := exec.Command(binary, "run", "--config", cfgPath)
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+sock)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	waited := make(chan struct{})
	go func() { exited <- cmd.Wait(); close(waited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-waited
	})
	awaitMsg(t, msgs, "READY=1")

	// A broken file on SIGHUP: the old config keeps running and /status says why.
	writeFile(t, dir, "config.yaml", "node_name: n1\nhealth: {listen: nowhere}\n")
	if err := cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		doc := status(t, addr)
		if doc.Config != nil && strings.Contains(doc.Config.ReloadError, `health.listen: "nowhere"`) {
			if !doc.Ready {
				t.Error("a bad reload made the agent unready")
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/status never showed the reload error: %+v", doc)
		}
		time.Sleep(20 * time.Millisecond)
	}
	var out bytes.Buffer
	st := exec.Command(binary, "status", "--addr", addr)
	st.Stdout = &out
	if err := st.Run(); err != nil {
		t.Errorf("nodeagent status: %v", err)
	}
	if !strings.Contains(out.String(), "last reload failed") {
		t.Errorf("nodeagent status output lacks the reload failure:\n%s", out.String())
	}

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	awaitMsg(t, msgs, "STOPPING=1")
	select {
	case err := <-exited:
		if err != nil {
			t.Errorf("exit after SIGTERM: %v\n%s", err, stderr.String())
		}
	case <-time.After(15 * time.Second):
		t.Fatal("agent did not exit after SIGTERM")
	}
	if !strings.Contains(stderr.String(), "reload failed; keeping the running configuration") {
		t.Errorf("the bad reload was not logged:\n%s", stderr.String())
	}
}

// TestSocketActivation hands the agent its health listener the way systemd does:
// fd 3, LISTEN_FDS=1, LISTEN_FDNAMES=health and LISTEN_PID set to the agent's own pid.
func TestSocketActivation(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f, err := ln.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	ln.Close() // the duplicate in f keeps the socket listening
	addr := ln.Addr().String()

	dir := t.TempDir()
	// health.listen names a port that is not the passed socket's: the passed one must win.
	cfgPath := writeFile(t, dir, "config.yaml", fmt.Sprintf("node_name: n1\nhealth: {listen: %q}\n", freePort(t)))
	sock, msgs := notifyListener(t)
	// LISTEN_PID must be the pid of the process that reads it; sh's exec keeps $$.
	cmd := exec.Command("sh", "-c", `LISTEN_PID=$$ exec "$0" run --config "$1"`, binary, cfgPath)
	cmd.Env = append(os.Environ(), "LISTEN_FDS=1", "LISTEN_FDNAMES=health", "NOTIFY_SOCKET="+sock)
	cmd.ExtraFiles = []*os.File{f}
	cmd.Stderr = io.Discard
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
	})
	awaitMsg(t, msgs, "READY=1")
	if doc := status(t, addr); doc.Node != "n1" || !doc.Ready {
		t.Errorf("status over the passed socket = %+v", doc)
	}
}
