package agent

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// newHealthServer serves /healthz, /readyz, /status and /metrics. allow, when not
// empty, limits /status and /metrics to clients in those prefixes; the probes stay
// open so the kubelet can always reach them.
func newHealthServer(st *Status, gather prometheus.Gatherer, allow []netip.Prefix) *http.Server {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		// Liveness: the process answers. Dependencies never fail it, or the kubelet
		// would restart the agent for a missing NIC.
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		doc := st.Snapshot()
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if doc.Ready {
			fmt.Fprintln(w, "ready")
			return
		}
		w.WriteHeader(http.StatusServiceUnavailable)
		if failing := doc.Failing(); len(failing) > 0 {
			fmt.Fprintf(w, "not ready: %s\n", strings.Join(failing, ", "))
		} else {
			fmt.Fprintln(w, "not ready: starting or stopping")
		}
	})
	mux.Handle("GET /status", allowOnly(allow, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(st.Snapshot())
	})))
	mux.Handle("GET /metrics", allowOnly(allow, promhttp.HandlerFor(gather, promhttp.HandlerOpts{})))
	return &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       60 * time.Second,
		MaxHeaderBytes:    16 << 10,
	}
}

func allowOnly(allow []netip.Prefix, h http.Handler) http.Handler {
	if len(allow) == 0 {
		return h
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		host, _, err := net.SplitHostPort(r.RemoteAddr)
		ip, perr := netip.ParseAddr(host)
		if err == nil && perr == nil {
			for _, p := range allow {
				if p.Contains(ip.Unmap()) {
					h.ServeHTTP(w, r)
					return
				}
			}
		}
		http.Error(w, "forbidden: client not in health.allow_from", http.StatusForbidden)
	})
}
