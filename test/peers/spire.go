package peers

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Spire is a real SPIRE server and agent started for a test: sqlite datastore,
// join_token node attestation, unix workload attestor, the server on a loopback port,
// the agent's Workload API on a unix socket. Keys are kept on disk, so the server and
// the agent can each be stopped and started again and keep their identity.
type Spire struct {
	Dir          string // configs, data, logs
	TrustDomain  string // "example.org"
	NodeID       string // SPIFFE ID the agent is aliased to: the parent of entries made with CreateEntry
	ServerAddr   string // 127.0.0.1:port of the server's agent API
	ServerSocket string // server admin API socket (spire-server -socketPath)
	AgentSocket  string // agent Workload API socket; go-spiffe wants WorkloadAddr()
	ServerLog    string
	AgentLog     string

	serverBin, agentBin string
	serverConf          string
	agentConf           string
	server, agent       *process
}

// spireServerConfig: %[1]s bind port, %[2]s admin socket, %[3]s data dir.
const spireServerConfig = `server {
    bind_address = "127.0.0.1"
    bind_port = "%[1]s"
    socket_path = "%[2]s"
    trust_domain = "example.org"
    data_dir = "%[3]s"
    log_level = "DEBUG"
    default_x509_svid_ttl = "1h"
    experimental {
        cache_reload_interval = "1s"
    }
}

plugins {
    DataStore "sql" {
        plugin_data {
            database_type = "sqlite3"
            connection_string = "%[3]s/datastore.sqlite3"
        }
    }
    NodeAttestor "join_token" {
        plugin_data {}
    }
    KeyManager "disk" {
        plugin_data {
            keys_path = "%[3]s/keys.json"
        }
    }
}
`

// spireAgentConfig: %[1]s server port, %[2]s workload socket, %[3]s data dir.
// The join token is given on the command line (-joinToken) at the first start.
const spireAgentConfig = `agent {
    data_dir = "%[3]s"
    log_level = "DEBUG"
    server_address = "127.0.0.1"
    server_port = "%[1]s"
    socket_path = "%[2]s"
    trust_domain = "example.org"
    insecure_bootstrap = true
    experimental {
        sync_interval = "1s"
    }
}

plugins {
    NodeAttestor "join_token" {
        plugin_data {}
    }
    KeyManager "disk" {
        plugin_data {
            directory = "%[3]s"
        }
    }
    WorkloadAttestor "unix" {
        plugin_data {}
    }
}
`

// StartSpire starts a SPIRE server and an agent attested with a fresh join token,
// both stopped when t ends. dir holds their configs, data and logs ("" means a new
// temporary directory); sockets go to a short temporary directory. It returns once
// the agent's Workload API is healthy, or fails t (within ~1.5 min).
func StartSpire(t testing.TB, dir string) *Spire {
	t.Helper()
	s := &Spire{
		TrustDomain: "example.org",
		NodeID:      "spiffe://example.org/nodeagent-test/node",
		serverBin:   Path(t, "spire-server"),
		agentBin:    Path(t, "spire-agent"),
	}
	if dir == "" {
		dir = t.TempDir()
	}
	s.Dir = dir
	sock := shortTempDir(t, "spire")
	s.ServerSocket = filepath.Join(sock, "server.sock")
	s.AgentSocket = filepath.Join(sock, "agent.sock")
	s.ServerLog = filepath.Join(dir, "spire-server.log")
	s.AgentLog = filepath.Join(dir, "spire-agent.log")
	s.serverConf = filepath.Join(dir, "server.conf")
	s.agentConf = filepath.Join(dir, "agent.conf")
	for _, d := range []string{"server-data", "agent-data"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o700); err != nil {
			t.Fatalf("make spire dir: %v", err)
		}
	}
	t.Cleanup(func() {
		if s.agent != nil {
			s.agent.stop(10 * time.Second)
		}
		if s.server != nil {
			s.server.stop(10 * time.Second)
		}
		if t.Failed() {
			for _, p := range []*process{s.server, s.agent} {
				if p != nil {
					t.Logf("--- %s (last lines) ---\n%s", p.logPath, p.logTail(25))
				}
			}
		}
	})

	var err error
	for range 3 { // the free port may be taken before the server binds it
		var ports []int
		if ports, err = freePorts(1); err != nil {
			t.Fatal(err)
		}
		s.ServerAddr = loopback(ports[0])
		conf := fmt.Sprintf(spireServerConfig, strconv.Itoa(ports[0]), s.ServerSocket, filepath.Join(dir, "server-data"))
		if err := os.WriteFile(s.serverConf, []byte(conf), 0o600); err != nil {
			t.Fatalf("write spire server config: %v", err)
		}
		if err = s.startServer(); err == nil {
			break
		}
	}
	if err != nil {
		t.Fatalf("start spire server: %v", err)
	}
	_, port, _ := splitHostPort(s.ServerAddr)
	conf := fmt.Sprintf(spireAgentConfig, port, s.AgentSocket, filepath.Join(dir, "agent-data"))
	if err := os.WriteFile(s.agentConf, []byte(conf), 0o600); err != nil {
		t.Fatalf("write spire agent config: %v", err)
	}
	token := s.JoinToken(t, s.NodeID)
	if err := s.startAgent("-joinToken", token); err != nil {
		t.Fatalf("start spire agent: %v", err)
	}
	return s
}

// WorkloadAddr is the agent's Workload API address as go-spiffe takes it
// (workloadapi.WithAddr): "unix://" + AgentSocket.
func (s *Spire) WorkloadAddr() string { return "unix://" + s.AgentSocket }

func (s *Spire) startServer() error {
	p, err := startProcess("spire-server", s.ServerLog, s.serverBin, "run", "-config", s.serverConf)
	if err != nil {
		return err
	}
	s.server = p
	err = p.waitReady(60*time.Second, func(ctx context.Context) error {
		_, err := run(ctx, s.serverBin, "healthcheck", "-socketPath", s.ServerSocket)
		return err
	})
	if err != nil {
		p.stop(5 * time.Second)
		return fmt.Errorf("%w\n--- %s ---\n%s", err, s.ServerLog, p.logTail(25))
	}
	return nil
}

func (s *Spire) startAgent(args ...string) error {
	p, err := startProcess("spire-agent", s.AgentLog, s.agentBin, append([]string{"run", "-config", s.agentConf}, args...)...)
	if err != nil {
		return err
	}
	s.agent = p
	err = p.waitReady(60*time.Second, func(ctx context.Context) error {
		_, err := run(ctx, s.agentBin, "healthcheck", "-socketPath", s.AgentSocket)
		return err
	})
	if err != nil {
		p.stop(5 * time.Second)
		return fmt.Errorf("%w\n--- %s ---\n%s", err, s.AgentLog, p.logTail(25))
	}
	return nil
}

// serverCmd runs a spire-server CLI command against the admin socket, with JSON output.
func (s *Spire) serverCmd(t testing.TB, out any, args ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	args = append(args, "-socketPath", s.ServerSocket, "-output", "json")
	res, err := run(ctx, s.serverBin, args...)
	if err != nil {
		t.Fatalf("spire-server: %v", err)
	}
	if out != nil {
		if err := json.Unmarshal([]byte(res), out); err != nil {
			t.Fatalf("spire-server %v: decode %q: %v", args, res, err)
		}
	}
}

// JoinToken makes a join token (valid 10 min) for another agent; when spiffeID is not
// "", the agent that uses it is also given that ID.
func (s *Spire) JoinToken(t testing.TB, spiffeID string) string {
	t.Helper()
	args := []string{"token", "generate", "-ttl", "600"}
	if spiffeID != "" {
		args = append(args, "-spiffeID", spiffeID)
	}
	var r struct {
		Value string `json:"value"`
	}
	s.serverCmd(t, &r, args...)
	if r.Value == "" {
		t.Fatalf("spire-server token generate: empty token")
	}
	return r.Value
}

type entryResults struct {
	Results []struct {
		Status struct {
			Code    int    `json:"code"`
			Message string `json:"message"`
		} `json:"status"`
		Entry struct {
			ID string `json:"id"`
		} `json:"entry"`
	} `json:"results"`
}

// CreateEntry registers spiffeID for workloads on this agent that match every
// selector ("unix:uid:1000", "unix:gid:0", ...) and returns the entry ID. The agent
// learns of it within about two seconds (1s server cache reload, 1s agent sync).
func (s *Spire) CreateEntry(t testing.TB, spiffeID string, selectors ...string) string {
	t.Helper()
	args := []string{"entry", "create", "-parentID", s.NodeID, "-spiffeID", spiffeID}
	for _, sel := range selectors {
		args = append(args, "-selector", sel)
	}
	var r entryResults
	s.serverCmd(t, &r, args...)
	if len(r.Results) != 1 || r.Results[0].Status.Code != 0 || r.Results[0].Entry.ID == "" {
		t.Fatalf("spire-server entry create %s: %+v", spiffeID, r)
	}
	return r.Results[0].Entry.ID
}

// CreateUIDEntry registers spiffeID for processes running as uid (selector unix:uid).
func (s *Spire) CreateUIDEntry(t testing.TB, spiffeID string, uid int) string {
	t.Helper()
	return s.CreateEntry(t, spiffeID, "unix:uid:"+strconv.Itoa(uid))
}

// DeleteEntry deletes the registration entry id.
func (s *Spire) DeleteEntry(t testing.TB, id string) {
	t.Helper()
	var r entryResults
	s.serverCmd(t, &r, "entry", "delete", "-entryID", id)
	if len(r.Results) != 1 || r.Results[0].Status.Code != 0 {
		t.Fatalf("spire-server entry delete %s: %+v", id, r)
	}
}

// StopAgent stops the agent (SIGTERM); its Workload API socket goes away.
func (s *Spire) StopAgent(t testing.TB) {
	t.Helper()
	s.agent.stop(10 * time.Second)
}

// StartAgent starts the agent again after StopAgent, with the identity it stored on
// its first start, and waits until it is healthy.
func (s *Spire) StartAgent(t testing.TB) {
	t.Helper()
	if !s.agent.exited() {
		t.Fatalf("spire agent is already running")
	}
	if err := s.startAgent(); err != nil {
		t.Fatalf("restart spire agent: %v", err)
	}
}

// RestartAgent stops and starts the agent.
func (s *Spire) RestartAgent(t testing.TB) {
	t.Helper()
	s.StopAgent(t)
	s.StartAgent(t)
}

// StopServer stops the server; the agent keeps serving the SVIDs it has.
func (s *Spire) StopServer(t testing.TB) {
	t.Helper()
	s.server.stop(10 * time.Second)
}

// StartServer starts the server again after StopServer (same port, datastore and keys).
func (s *Spire) StartServer(t testing.TB) {
	t.Helper()
	if !s.server.exited() {
		t.Fatalf("spire server is already running")
	}
	if err := s.startServer(); err != nil {
		t.Fatalf("restart spire server: %v", err)
	}
}

// AgentRunning reports whether the agent process is running.
func (s *Spire) AgentRunning() bool { return s.agent != nil && !s.agent.exited() }

// WaitSVID polls the agent's Workload API as this process (`spire-agent api fetch
// x509`) until it is issued an X509-SVID for spiffeID, or fails t after timeout. Use it
// after CreateUIDEntry(t, id, os.Getuid()) to know the agent has synced the entry.
func (s *Spire) WaitSVID(t testing.TB, spiffeID string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		out, err := run(ctx, s.agentBin, "api", "fetch", "x509", "-socketPath", s.AgentSocket, "-timeout", "5s")
		cancel()
		if err == nil && slices.Contains(strings.Split(out, "\n"), "SPIFFE ID:\t\t"+spiffeID) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("spire agent issued no X509-SVID for %s within %v; last fetch: %v\n%s", spiffeID, timeout, err, out)
		}
		time.Sleep(250 * time.Millisecond)
	}
}
