package agent

import (
	"fmt"
	"log/slog"
	"net"
	"time"

	"github.com/coreos/go-systemd/v22/activation"
	"github.com/coreos/go-systemd/v22/daemon"
)

// Socket-activation names (FileDescriptorName= in the .socket units).
const (
	ListenerHealth   = "health"
	ListenerProxy    = "proxy"
	ListenerOTLPGRPC = "otlp-grpc"
	ListenerOTLPHTTP = "otlp-http"
)

// systemdListeners returns the sockets systemd passed (LISTEN_FDS, LISTEN_FDNAMES),
// by name. Without socket activation it returns an empty map.
func systemdListeners() (map[string][]net.Listener, error) {
	ls, err := activation.ListenersWithNames()
	if err != nil {
		return nil, fmt.Errorf("socket activation: %w", err)
	}
	for name, l := range ls {
		for i, x := range l {
			if x == nil {
				return nil, fmt.Errorf("socket activation: %s[%d] is not a stream listener", name, i)
			}
		}
	}
	return ls, nil
}

// notifier speaks sd_notify when NOTIFY_SOCKET is set and is silent otherwise.
type notifier struct {
	log      *slog.Logger
	watchdog time.Duration // WatchdogSec=, 0 when not asked for
	ready    bool
	status   string
}

func newNotifier(log *slog.Logger) *notifier {
	n := &notifier{log: log}
	if d, err := daemon.SdWatchdogEnabled(false); err == nil {
		n.watchdog = d
	} else {
		log.Warn("ignoring systemd watchdog settings", "error", err)
	}
	return n
}

func (n *notifier) send(state string) {
	if _, err := daemon.SdNotify(false, state); err != nil {
		n.log.Warn("sd_notify failed", "state", state, "error", err)
	}
}

// update sends READY=1 the first time the agent is ready, and STATUS= when the summary changes.
func (n *notifier) update(doc StatusDoc) {
	if summary := doc.Summary(); summary != n.status {
		n.status = summary
		n.send("STATUS=" + summary)
	}
	if doc.Ready && !n.ready {
		n.ready = true
		n.send(daemon.SdNotifyReady)
	}
}

func (n *notifier) reloading() {
	n.send(daemon.SdNotifyReloading + "\n" + "MONOTONIC_USEC=" + daemon.SdNotifyMonotonicUsec())
}
func (n *notifier) reloaded() {
	if n.ready {
		n.send(daemon.SdNotifyReady)
	}
}
func (n *notifier) stopping() { n.send(daemon.SdNotifyStopping) }
func (n *notifier) alive()    { n.send(daemon.SdNotifyWatchdog) }
