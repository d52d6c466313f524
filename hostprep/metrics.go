package hostprep

import (
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
)

// changeKinds are the values of the changes counter's "what" label.
var changeKinds = []string{"hugepages_pool", "sysctl_file", "module_load", "modules_file", "noiommu", "bpffs_mount"}

// metrics of hostprep. A nil *metrics (the one-shot Check) records nothing.
type metrics struct {
	hugepages *prometheus.GaugeVec
	changes   *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		hugepages: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "nodeagent_hostprep_hugepages",
			Help: `2 MiB hugepages: requested (node="total" only), allocated and free, node="total" for the whole pool and "0", "1", ... per NUMA node.`,
		}, []string{"node", "state"}),
		changes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "nodeagent_hostprep_changes_total",
			Help: "Changes hostprep made to the host, by what it changed.",
		}, []string{"what"}),
	}
	for _, s := range []string{"requested", "allocated", "free"} {
		m.hugepages.WithLabelValues("total", s)
	}
	for _, w := range changeKinds {
		m.changes.WithLabelValues(w)
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.hugepages, m.changes} {
			if err := reg.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return m, nil
}

func (m *metrics) setRequested(n int) {
	if m == nil {
		return
	}
	m.hugepages.WithLabelValues("total", "requested").Set(float64(n))
}

func (m *metrics) setPool(s hugeState) {
	if m == nil {
		return
	}
	m.hugepages.WithLabelValues("total", "allocated").Set(float64(s.total))
	m.hugepages.WithLabelValues("total", "free").Set(float64(s.free))
	for _, n := range s.nodes {
		id := strconv.Itoa(n.node)
		m.hugepages.WithLabelValues(id, "allocated").Set(float64(n.total))
		m.hugepages.WithLabelValues(id, "free").Set(float64(n.free))
	}
}

func (m *metrics) change(what string) {
	if m == nil {
		return
	}
	m.changes.WithLabelValues(what).Inc()
}
