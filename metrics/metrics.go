// Package metrics counts what docker-flow-proxy does and serves the counts in Prometheus' text
// format: API requests by result, reloads and runtime-API updates of HAProxy, configs that
// `haproxy -c` rejected, Consul errors and reachability, the routes and instances served.
//
// Every Metrics has a registry of its own (no global state): two servers in one process never
// share counts. A nil *Metrics is valid and records nothing.
package metrics

import (
	"context"
	"errors"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/docker-flow-proxy/docker-flow-proxy/haproxy"
	"github.com/docker-flow-proxy/docker-flow-proxy/proxy"
	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

// Results of a reconfigure or remove request (label `result`).
const (
	ResultOK                = "ok"
	ResultBadRequest        = "bad_request"
	ResultConsulUnavailable = "consul_unavailable"
	ResultConfigError       = "config_error"
	ResultApplyError        = "apply_error"
	ResultTimeout           = "timeout"
	ResultError             = "error"
)

var requestResults = []string{ResultOK, ResultBadRequest, ResultConsulUnavailable, ResultConfigError,
	ResultApplyError, ResultTimeout, ResultError}

// Operations of the API counted by request (Request's op).
const (
	OpReconfigure = "reconfigure"
	OpRemove      = "remove"
)

// Results of a runtime-API update (label `result`): ok, refused before any change (the change
// needs a reload), or failed part way. In both failures a reload serves the change instead.
const (
	RuntimeOK      = "ok"
	RuntimeRefused = "refused"
	RuntimeError   = "error"
)

// Results of a reload (label `result`).
const (
	ReloadOK    = "ok"
	ReloadError = "error"
)

// Consul operations whose failures are counted (label `op`).
const (
	ConsulReadRoutes    = proxy.OpReadRoutes
	ConsulReadInstances = proxy.OpReadInstances
	ConsulWriteRoutes   = proxy.OpWriteRoutes
	ConsulWatch         = "watch"
)

// Kinds of watch updates (label `kind`).
const (
	WatchInstances = "instances"
	WatchRoutes    = "routes"
)

// Sources are values read at scrape time.
type Sources struct {
	// HAProxyRestarts returns how many times the supervisor restarted HAProxy after it exited.
	HAProxyRestarts func() int
	// HAProxyMaxConn returns how many connections HAProxy accepts at once (0: not known yet).
	HAProxyMaxConn func() int
}

// Metrics holds the collectors of one server and the registry that serves them.
type Metrics struct {
	reg *prometheus.Registry

	reconfigures       *prometheus.CounterVec
	removes            *prometheus.CounterVec
	reloads            *prometheus.CounterVec
	reloadDuration     prometheus.Histogram
	runtimeUpdates     *prometheus.CounterVec
	validationFailures prometheus.Counter
	lastApply          prometheus.Gauge
	consulErrors       *prometheus.CounterVec
	consulReachable    prometheus.Gauge
	routes             prometheus.Gauge
	instances          prometheus.Gauge
	watchUpdates       *prometheus.CounterVec
}

// New makes the collectors, registered on a new registry with the Go runtime's and the process'
// collectors.
func New(src Sources) *Metrics {
	reg := prometheus.NewRegistry()
	m := &Metrics{
		reg: reg,
		reconfigures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "dfp_reconfigure_requests_total",
			Help: "Reconfigure requests answered, by result: ok, bad_request, consul_unavailable, config_error, apply_error, timeout, error.",
		}, []string{"result"}),
		removes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "dfp_remove_requests_total",
			Help: "Remove requests answered, by result: ok, bad_request, consul_unavailable, config_error, apply_error, timeout, error.",
		}, []string{"result"}),
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "dfp_haproxy_reloads_total",
			Help: "Reloads of HAProxy with a new config, by result: ok, or error (the old config keeps serving).",
		}, []string{"result"}),
		reloadDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "dfp_haproxy_reload_duration_seconds",
			Help:    "Time from the start of a reload of HAProxy until the new worker serves (or the reload failed).",
			Buckets: []float64{0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30},
		}),
		runtimeUpdates: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "dfp_haproxy_runtime_updates_total",
			Help: "Changes of servers made through HAProxy's runtime API without a reload, by result: ok, refused (needs a reload), error (a reload was done instead).",
		}, []string{"result"}),
		validationFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dfp_haproxy_validation_failures_total",
			Help: "Rendered configs that `haproxy -c` rejected (nothing was changed).",
		}),
		lastApply: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "dfp_last_apply_timestamp_seconds",
			Help: "Unix time at which HAProxy last took a new config: its start, a reload or a runtime-API update.",
		}),
		consulErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "dfp_consul_errors_total",
			Help: "Failed Consul calls, by operation: read_routes, read_instances, write_routes, watch.",
		}, []string{"op"}),
		consulReachable: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "dfp_consul_reachable",
			Help: "1 when the last Consul call or watch answered, 0 when it failed.",
		}),
		routes: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "dfp_routes",
			Help: "Routes (services) HAProxy serves.",
		}),
		instances: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "dfp_instances",
			Help: "Instances (HAProxy servers) over every route served.",
		}),
		watchUpdates: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "dfp_watch_updates_total",
			Help: "Changes seen by the watches of Consul and applied, by kind: instances (of a routed service), routes (the route table in KV).",
		}, []string{"kind"}),
	}
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		m.reconfigures, m.removes, m.reloads, m.reloadDuration, m.runtimeUpdates, m.validationFailures,
		m.lastApply, m.consulErrors, m.consulReachable, m.routes, m.instances, m.watchUpdates)
	if src.HAProxyRestarts != nil {
		restarts := src.HAProxyRestarts
		reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "dfp_haproxy_restarts_total",
			Help: "Times the supervisor restarted HAProxy after it exited.",
		}, func() float64 { return float64(restarts()) }))
	}
	if src.HAProxyMaxConn != nil {
		maxConn := src.HAProxyMaxConn
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "dfp_haproxy_max_connections",
			Help: "Connections HAProxy accepts at once (its Maxconn, derived from the open files limit less one per health-checked server), as read after its last start or reload.",
		}, func() float64 { return float64(maxConn()) }))
	}
	// Every label value is shown from the start, at 0: a rate over a series that appears late
	// misses its first increase.
	for _, r := range requestResults {
		m.reconfigures.WithLabelValues(r)
		m.removes.WithLabelValues(r)
	}
	for _, r := range []string{ReloadOK, ReloadError} {
		m.reloads.WithLabelValues(r)
	}
	for _, r := range []string{RuntimeOK, RuntimeRefused, RuntimeError} {
		m.runtimeUpdates.WithLabelValues(r)
	}
	for _, op := range []string{ConsulReadRoutes, ConsulReadInstances, ConsulWriteRoutes, ConsulWatch} {
		m.consulErrors.WithLabelValues(op)
	}
	for _, k := range []string{WatchInstances, WatchRoutes} {
		m.watchUpdates.WithLabelValues(k)
	}
	return m
}

// Registry is the registry the collectors are registered on (to add collectors, or to gather in tests).
func (m *Metrics) Registry() *prometheus.Registry {
	if m == nil {
		return nil
	}
	return m.reg
}

// ServeHTTP serves the metrics in Prometheus' exposition format (GET /metrics).
func (m *Metrics) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	if m == nil {
		http.NotFound(w, req)
		return
	}
	promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg}).ServeHTTP(w, req)
}

// Result classifies the outcome of a reconfigure or remove as the API answers it: nil is ok, a
// parameter error or a change HAProxy refuses is bad_request (400), a Consul failure is
// consul_unavailable (503), a config HAProxy rejects is config_error and a failed reload
// apply_error (500).
func Result(err error) string {
	var pe *route.ParamError
	switch {
	case err == nil:
		return ResultOK
	case errors.As(err, &pe), errors.Is(err, proxy.ErrRejected):
		return ResultBadRequest
	case errors.Is(err, proxy.ErrConsul):
		return ResultConsulUnavailable
	case errors.Is(err, proxy.ErrConfig):
		return ResultConfigError
	case errors.Is(err, proxy.ErrApply):
		return ResultApplyError
	case errors.Is(err, context.DeadlineExceeded):
		return ResultTimeout
	default:
		return ResultError
	}
}

// Request records the answer to an API request: op is OpReconfigure or OpRemove, err nil on
// success. Other operations are not counted.
func (m *Metrics) Request(op string, err error) {
	if m == nil {
		return
	}
	switch op {
	case OpReconfigure:
		m.reconfigures.WithLabelValues(Result(err)).Inc()
	case OpRemove:
		m.removes.WithLabelValues(Result(err)).Inc()
	}
}

// Reload records a reload of HAProxy that took d; err nil when the new worker serves.
func (m *Metrics) Reload(d time.Duration, err error) {
	if m == nil {
		return
	}
	m.reloadDuration.Observe(d.Seconds())
	if err != nil {
		m.reloads.WithLabelValues(ReloadError).Inc()
		var ce *haproxy.ConfigError
		if errors.As(err, &ce) {
			m.validationFailures.Inc()
		}
		return
	}
	m.reloads.WithLabelValues(ReloadOK).Inc()
	m.Applied(time.Now())
}

// RuntimeUpdate records a change of servers through the runtime API; err nil when it is done.
func (m *Metrics) RuntimeUpdate(err error) {
	if m == nil {
		return
	}
	switch {
	case err == nil:
		m.runtimeUpdates.WithLabelValues(RuntimeOK).Inc()
		m.Applied(time.Now())
	case errors.Is(err, haproxy.ErrNeedsReload):
		m.runtimeUpdates.WithLabelValues(RuntimeRefused).Inc()
	default:
		// A config HAProxy rejects here is rejected again, and counted, by the reload that follows.
		m.runtimeUpdates.WithLabelValues(RuntimeError).Inc()
	}
}

// Validated records the outcome of `haproxy -c` on a config: a *haproxy.ConfigError is counted as
// a validation failure; other errors (the check could not run) are not.
func (m *Metrics) Validated(err error) {
	if m == nil {
		return
	}
	var ce *haproxy.ConfigError
	if errors.As(err, &ce) {
		m.validationFailures.Inc()
	}
}

// Applied records that HAProxy took a new config at t (its start, say).
func (m *Metrics) Applied(t time.Time) {
	if m == nil {
		return
	}
	m.lastApply.Set(float64(t.UnixNano()) / 1e9)
}

// Consul records the outcome of a Consul operation (one of the Consul* constants): a failure is
// counted and marks Consul unreachable, a success marks it reachable.
func (m *Metrics) Consul(op string, err error) {
	if m == nil {
		return
	}
	if err != nil {
		m.consulErrors.WithLabelValues(op).Inc()
		m.consulReachable.Set(0)
		return
	}
	m.consulReachable.Set(1)
}

// Table records the route table served: its routes and the instances over all of them.
func (m *Metrics) Table(routes, instances int) {
	if m == nil {
		return
	}
	m.routes.Set(float64(routes))
	m.instances.Set(float64(instances))
}

// WatchUpdate records a change seen by a watch of Consul and applied (kind WatchInstances or
// WatchRoutes).
func (m *Metrics) WatchUpdate(kind string) {
	if m == nil {
		return
	}
	m.watchUpdates.WithLabelValues(kind).Inc()
}
