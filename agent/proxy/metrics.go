package proxy

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// Values of the result label of nodeagent_proxy_connections_total.
const (
	resultConnected     = "connected"       // relayed to an endpoint
	resultNoOriginalDst = "no_original_dst" // the steering layer did not know the connection
	resultUnmapped      = "unmapped"        // its original destination is not in address_map
	resultUnresolved    = "unresolved"      // the target's DNS name has no address
	resultConnectFailed = "connect_failed"  // every attempt was refused or timed out
	resultShutdown      = "shutdown"        // the proxy stopped while connecting
)

// mappingNone is the mapping label of connections no mapping matched.
const mappingNone = "none"

var mappedResults = []string{resultConnected, resultUnresolved, resultConnectFailed, resultShutdown}

// Directions of nodeagent_proxy_bytes_total.
const (
	dirUpstream   = "upstream"   // client → target
	dirDownstream = "downstream" // target → client
)

type metrics struct {
	connections     *prometheus.CounterVec
	active          prometheus.Gauge
	bytes           *prometheus.CounterVec
	bytesUp         prometheus.Counter
	bytesDown       prometheus.Counter
	connectDuration prometheus.Histogram
	acceptErrors    prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		connections: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "nodeagent_proxy_connections_total",
			Help: "Accepted connections by mapping (address_map key, or none) and result: connected, no_original_dst, unmapped, unresolved, connect_failed, shutdown.",
		}, []string{"mapping", "result"}),
		active: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "nodeagent_proxy_active_connections",
			Help: "Connections being relayed.",
		}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "nodeagent_proxy_bytes_total",
			Help: "Bytes relayed: upstream is client to target, downstream target to client.",
		}, []string{"direction"}),
		connectDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "nodeagent_proxy_connect_duration_seconds",
			Help:    "Time from accept to a connected upstream, all attempts included.",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}),
		acceptErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "nodeagent_proxy_accept_errors_total",
			Help: "Failed accept calls (EMFILE and the like), each followed by a backoff.",
		}),
	}
	m.bytesUp = m.bytes.WithLabelValues(dirUpstream)
	m.bytesDown = m.bytes.WithLabelValues(dirDownstream)
	m.connections.WithLabelValues(mappingNone, resultNoOriginalDst)
	m.connections.WithLabelValues(mappingNone, resultUnmapped)
	if reg != nil {
		for _, c := range []prometheus.Collector{m.connections, m.active, m.bytes, m.connectDuration, m.acceptErrors} {
			if err := reg.Register(c); err != nil {
				return nil, fmt.Errorf("register proxy metrics: %w", err)
			}
		}
	}
	return m, nil
}

// initMappings creates the zero series of every mapping of t.
func (m *metrics) initMappings(t *table) {
	for _, r := range t.routes {
		for _, res := range mappedResults {
			m.connections.WithLabelValues(r.key, res)
		}
		r.connected = m.connections.WithLabelValues(r.key, resultConnected)
	}
}
