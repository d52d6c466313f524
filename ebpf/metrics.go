package ebpf

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

// collector reads the steering counters and map sizes from the kernel on
// every scrape.
type collector struct {
	s *Steering

	redirects    *prometheus.Desc
	podUnsteered *prometheus.Desc
	skipped      *prometheus.Desc
	errors       *prometheus.Desc
	entries      *prometheus.Desc
	attached     *prometheus.Desc

	mu   sync.Mutex
	last [counterMax]uint64 // counter values last read, kept while detached
}

var entryMaps = []string{"intercepts", "orig_by_cookie", "orig_by_client"}

func newCollector(s *Steering) *collector {
	return &collector{
		s: s,
		redirects: prometheus.NewDesc("nodeagent_steering_redirects_total",
			"Connections steered to the proxy, by the address family the workload dialled.", []string{"family"}, nil),
		podUnsteered: prometheus.NewDesc("nodeagent_steering_pod_unsteered_total",
			"Connections from other network namespaces to mapped destinations left alone because steering.pod_redirect is unset.", nil, nil),
		skipped: prometheus.NewDesc("nodeagent_steering_upstream_skipped_total",
			"Connections to mapped destinations not steered because they carry the proxy's upstream mark.", nil, nil),
		errors: prometheus.NewDesc("nodeagent_steering_errors_total",
			"Connections to mapped destinations that could not be steered (map full, no proxy address of the family).", nil, nil),
		entries: prometheus.NewDesc("nodeagent_steering_map_entries",
			"Entries in the steering maps.", []string{"map"}, nil),
		attached: prometheus.NewDesc("nodeagent_steering_attached",
			"1 while the steering programs are attached, else 0.", nil, nil),
	}
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.redirects, c.podUnsteered, c.skipped, c.errors, c.entries, c.attached} {
		ch <- d
	}
}

// snapshot remembers the counters of l; called with the kernel objects still open.
func (c *collector) snapshot(l *loaded) [counterMax]uint64 {
	var v [counterMax]uint64
	for i := range v {
		var per []uint64
		if err := l.objs.Counters.Lookup(uint32(i), &per); err != nil {
			continue
		}
		for _, x := range per {
			v[i] += x
		}
	}
	c.mu.Lock()
	c.last = v
	c.mu.Unlock()
	return v
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	c.s.mu.RLock()
	l := c.s.cur
	var v [counterMax]uint64
	entries := map[string]int{}
	if l != nil {
		v = c.snapshot(l)
		entries = mapEntries(l)
	} else {
		c.mu.Lock()
		v = c.last
		c.mu.Unlock()
	}
	c.s.mu.RUnlock()

	ch <- prometheus.MustNewConstMetric(c.redirects, prometheus.CounterValue, float64(v[counterRedirectIPv4]), "ipv4")
	ch <- prometheus.MustNewConstMetric(c.redirects, prometheus.CounterValue, float64(v[counterRedirectIPv6]), "ipv6")
	ch <- prometheus.MustNewConstMetric(c.podUnsteered, prometheus.CounterValue, float64(v[counterPodUnsteered]))
	ch <- prometheus.MustNewConstMetric(c.skipped, prometheus.CounterValue, float64(v[counterSkippedMark]))
	ch <- prometheus.MustNewConstMetric(c.errors, prometheus.CounterValue, float64(v[counterErrors]))
	for _, m := range entryMaps {
		ch <- prometheus.MustNewConstMetric(c.entries, prometheus.GaugeValue, float64(entries[m]), m)
	}
	att := 0.0
	if l != nil {
		att = 1
	}
	ch <- prometheus.MustNewConstMetric(c.attached, prometheus.GaugeValue, att)
}
