package collector

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/nodeagent/nodeagent/agent/health"
)

// Check runs the otlp check once for `nodeagent check`, changing nothing on the host: the
// options are valid, the listen addresses are free (bound and released at once, unless
// socket-activated), the queue directory is usable, and the upstream can be reached.
func Check(ctx context.Context, opts Options) []health.Result {
	opts = opts.withDefaults()
	var problems, facts []string
	if err := opts.Validate(); err != nil {
		problems = append(problems, strings.ReplaceAll(err.Error(), "\n", "; "))
	}
	for _, l := range []struct {
		name  string
		valid bool
		addr  string
	}{{ListenerNameGRPC, opts.GRPCListen.IsValid(), opts.GRPCListen.String()}, {ListenerNameHTTP, opts.HTTPListen.IsValid(), opts.HTTPListen.String()}} {
		if _, ok := opts.Listeners[l.name]; ok {
			facts = append(facts, l.name+" socket-activated")
			continue
		}
		if !l.valid {
			continue
		}
		ln, err := net.Listen("tcp", l.addr)
		if err != nil {
			problems = append(problems, fmt.Sprintf("%s: cannot listen on %s: %v", l.name, l.addr, err))
			continue
		}
		ln.Close()
		facts = append(facts, l.name+" "+l.addr+" free")
	}
	if err := dirUsable(opts.Queue.Dir); err != nil {
		problems = append(problems, "queue dir: "+err.Error())
	}
	if opts.Exporter.Protocol == "grpc" || opts.Exporter.Protocol == "http" || opts.Exporter.Protocol == "file" {
		if s, err := newSender(opts.Exporter); err != nil {
			problems = append(problems, "exporter: "+err.Error())
		} else {
			if err := s.probe(ctx); err != nil {
				problems = append(problems, "upstream "+opts.Exporter.Endpoint+opts.Exporter.Path+": "+err.Error())
			} else {
				facts = append(facts, "upstream reachable")
			}
			s.close()
		}
	}
	if len(problems) > 0 {
		return []health.Result{{Name: health.OTLP, OK: false, Detail: strings.Join(problems, "; ")}}
	}
	return []health.Result{{Name: health.OTLP, OK: true, Detail: strings.Join(facts, "; ")}}
}

// dirUsable reports whether dir exists and is writable, or could be created.
func dirUsable(dir string) error {
	for d := dir; ; d = filepath.Dir(d) {
		fi, err := os.Stat(d)
		if errors.Is(err, os.ErrNotExist) && d != filepath.Dir(d) {
			continue
		}
		if err != nil {
			return err
		}
		if !fi.IsDir() {
			return fmt.Errorf("%s is not a directory", d)
		}
		if err := unix.Access(d, unix.W_OK|unix.X_OK); err != nil {
			return fmt.Errorf("%s not writable: %w", d, err)
		}
		return nil
	}
}
