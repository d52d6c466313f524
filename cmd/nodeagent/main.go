// Command nodeagent is the node agent for Calico-VPP, SPIRE and OpenTelemetry nodes.
// This file is wiring only: flags, strict config load, logger, signals, agent.
package main

import (
	"context"
	"encoding/json"

	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/nodeagent/nodeagent/agent"
	"github.com/nodeagent/nodeagent/agent/config"
)

// Exit codes, as in the product contract.
const (
	exitOK     = 0
	exitFailed = 1 // a required check failed, or the daemon failed
	exitUsage  = 2 // bad usage or bad configuration; nothing on the host was changed
)

const usage = `usage:
  nodeagent run    --config FILE [--cleanup]
  nodeagent check  --config FILE [--output text|json]
  nodeagent status [--addr HOST:PORT] [--output text|json]
  nodeagent version
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return exitUsage
	}
	switch args[0] {
	case "run":
		return cmdRun(args[1:], stderr)
	case "check":
		return cmdCheck(args[1:], stdout, stderr)
	case "status":
		return cmdStatus(args[1:], stdout, stderr)
	case "version":
		fmt.Fprintln(stdout, "nodeagent", agent.Version())
		return exitOK
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return exitOK
	default:
		fmt.Fprintf(stderr, "nodeagent: unknown command %q\n%s", args[0], usage)
		return exitUsage
	}
}

func newFlags(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("nodeagent "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	return fs
}

// parse parses flags and rejects stray arguments; ok is false on bad usage.
func parse(fs *flag.FlagSet, args []string, stderr io.Writer) bool {
	if err := fs.Parse(args); err != nil {
		return false
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "%s: unexpected argument %q\n", fs.Name(), fs.Arg(0))
		return false
	}
	return true
}

func loadConfig(path string, stderr io.Writer) (*config.Config, bool) {
	if path == "" {
		fmt.Fprintln(stderr, "nodeagent: --config FILE is required")
		return nil, false
	}
	cfg, err := agent.LoadConfig(path)
	if err != nil {
		fmt.Fprintln(stderr, "nodeagent:", err)
		return nil, false
	}
	return cfg, true
}

func newLogger(cfg *config.Config, w io.Writer) (*slog.Logger, *slog.LevelVar) {
	level := new(slog.LevelVar)
	if l, err := config.ParseLevel(cfg.Log.Level); err == nil {
		level.Set(l)
	}
	opts := &slog.HandlerOptions{Level: level}
	if cfg.Log.Format == "text" {
		return slog.New(slog.NewTextHandler(w, opts)), level
	}
	return slog.New(slog.NewJSONHandler(w, opts)), level
}

func cmdRun(args []string, stderr io.Writer) int {
	fs := newFlags("run", stderr)
	file := fs.String("config", "", "configuration file (YAML)")
	cleanup := fs.Bool("cleanup", false, "remove pinned programs and attachments left by a previous run, then exit")
	if !parse(fs, args, stderr) {
		return exitUsage
	}
	cfg, ok := loadConfig(*file, stderr)
	if !ok {
		return exitUsage
	}
	log, level := newLogger(cfg, stderr)
	if *cleanup {
		if err := agent.Cleanup(cfg, log); err != nil {
			log.Error("cleanup failed", "error", err)
			return exitFailed
		}
		log.Info("cleanup done")
		return exitOK
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	reload := make(chan struct{}, 1)
	go func() {
		for range hup {
			select {
			case reload <- struct{}{}:
			default: // a reload is already pending
			}
		}
	}()
	if err := agent.New(cfg, log, level).Run(ctx, reload); err != nil {
		log.Error("nodeagent failed", "error", err)
		return exitFailed
	}
	return exitOK
}

func cmdCheck(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("check", stderr)
	file := fs.String("config", "", "configuration file (YAML)")
	output := fs.String("output", "text", "text or json")
	if !parse(fs, args, stderr) || !validOutput(*output, stderr) {
		return exitUsage
	}
	cfg, ok := loadConfig(*file, stderr)
	if !ok {
		return exitUsage
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	doc := agent.Check(ctx, cfg)
	printDoc(stdout, doc, *output)
	if !doc.Ready {
		return exitFailed
	}
	return exitOK
}

func cmdStatus(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("status", stderr)
	addr := fs.String("addr", "127.0.0.1:9874", "the agent's health endpoint")
	output := fs.String("output", "text", "text or json")
	if !parse(fs, args, stderr) || !validOutput(*output, stderr) {
		return exitUsage
	}
	client := &http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get("http://" + *addr + "/status")
	if err != nil {
		fmt.Fprintf(stderr, "nodeagent: no agent answers at %s: %v\n", *addr, err)
		return exitFailed
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		fmt.Fprintf(stderr, "nodeagent: %s/status: %s\n", *addr, resp.Status)
		return exitFailed
	}
	var doc agent.StatusDoc
	if err := json.NewDecoder(io.LimitReader(resp.Body, 4<<20)).Decode(&doc); err != nil {
		fmt.Fprintf(stderr, "nodeagent: %s/status: %v\n", *addr, err)
		return exitFailed
	}
	printDoc(stdout, doc, *output)
	if !doc.Ready {
		return exitFailed
	}
	return exitOK
}

func validOutput(o string, stderr io.Writer) bool {
	if o == "text" || o == "json" {
		return true
	}
	fmt.Fprintf(stderr, "nodeagent: --output %q: want text or json\n", o)
	return false
}

func printDoc(w io.Writer, doc agent.StatusDoc, output string) {
	if output == "json" {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(doc)
		return
	}
	ready := "READY"
	if !doc.Ready {
		ready = "NOT READY"
	}
	fmt.Fprintf(w, "node %s, nodeagent %s: %s\n\n", doc.Node, doc.Version, ready)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "CHECK\tSTATUS\tREQUIRED\tDETAIL")
	for _, c := range doc.Checks {
		status, req := "OK", "no"
		if !c.OK {
			status = "FAIL"
		}
		if c.Required {
			req = "yes"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", c.Name, status, req, strings.ReplaceAll(c.Detail, "\n", " "))
	}
	_ = tw.Flush()
	if doc.Config != nil && doc.Config.ReloadError != "" {
		fmt.Fprintf(w, "\nlast reload failed, running the previous configuration:\n%s\n", doc.Config.ReloadError)
	}
	if failing := doc.Failing(); len(failing) > 0 {
		fmt.Fprintf(w, "\nrequired checks failing: %s\n", strings.Join(failing, ", "))
	}
}
