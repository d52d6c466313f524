package collector

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Span results counted in nodeagent_otlp_spans_total.
const (
	resAccepted = "accepted" // acknowledged to a client (in the durable queue)
	resRefused  = "refused"  // answered with an error (backpressure, invalid, too large)
	resExported = "exported" // accepted by the upstream
	resRejected = "rejected" // permanently rejected by the upstream (or its partial success), not retried
	resRetried  = "retried"  // an export attempt failed retryably and will be tried again
)

type metrics struct {
	spans       *prometheus.CounterVec
	queueBytes  prometheus.Gauge
	exportDur   prometheus.Histogram
	upstreamUp  prometheus.Gauge
	corrupt     prometheus.Counter
	redelivered prometheus.Counter
	requests    *prometheus.CounterVec
	accepted    prometheus.Counter
	refused     prometheus.Counter
	exported    prometheus.Counter
	rejected    prometheus.Counter
	retried     prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		spans: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "nodeagent_otlp_spans_total",
			Help: "Spans by outcome: accepted (queued durably and acknowledged), refused (answered with an error), exported, rejected (permanently, by the upstream), retried (export attempts that failed and will be retried).",
		}, []string{"result"}),
		queueBytes: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "nodeagent_otlp_queue_bytes",
			Help: "Bytes of unexported records in the durable queue.",
		}),
		exportDur: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "nodeagent_otlp_export_duration_seconds",
			Help:    "Duration of export attempts to the upstream.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2.5, 12),
		}),
		upstreamUp: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "nodeagent_otlp_upstream_up",
			Help: "1 when the last export attempt or probe reached the upstream, else 0.",
		}),
		corrupt: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "nodeagent_otlp_queue_corrupt_segments_total",
			Help: "Queue segments quarantined because a record failed its checksum.",
		}),
		redelivered: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "nodeagent_otlp_queue_redelivered_spans_total",
			Help: "Spans exported again after a restart because their export was in flight at the crash (possible duplicates).",
		}),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "nodeagent_otlp_requests_total",
			Help: "Export requests received, by transport and outcome.",
		}, []string{"transport", "outcome"}),
	}
	for _, r := range []string{resAccepted, resRefused, resExported, resRejected, resRetried} {
		m.spans.WithLabelValues(r)
	}
	for _, t := range []string{"grpc", "http"} {
		for _, o := range outcomes {
			m.requests.WithLabelValues(t, o)
		}
	}
	m.accepted = m.spans.WithLabelValues(resAccepted)
	m.refused = m.spans.WithLabelValues(resRefused)
	m.exported = m.spans.WithLabelValues(resExported)
	m.rejected = m.spans.WithLabelValues(resRejected)
	m.retried = m.spans.WithLabelValues(resRetried)
	for _, c := range []prometheus.Collector{m.spans, m.queueBytes, m.exportDur, m.upstreamUp, m.corrupt, m.redelivered, m.requests} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// Request outcomes for nodeagent_otlp_requests_total.
const (
	outOK           = "ok"
	outInvalid      = "invalid"
	outTooLarge     = "too_large"
	outBackpressure = "backpressure"
	outUnsupported  = "unsupported"
	outError        = "error"
)

var outcomes = []string{outOK, outInvalid, outTooLarge, outBackpressure, outUnsupported, outError}
