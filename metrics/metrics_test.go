package metrics_test

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net/http"
	"net/http/httptest"
	"sort"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/docker-flow-proxy/docker-flow-proxy/haproxy"
	"github.com/docker-flow-proxy/docker-flow-proxy/metrics"
	"github.com/docker-flow-proxy/docker-flow-proxy/proxy"
	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

// scrape serves m over HTTP, as GET /metrics does, and returns every sample by its name and labels
// (`name{a="x",b="y"}`; histograms as name_count and name_sum), and the help text of each family.
func scrape(t *testing.T, m *metrics.Metrics) (map[string]float64, map[string]string) {
	t.Helper()
	srv := httptest.NewServer(m)
	defer srv.Close()
	resp, err := srv.Client().Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain") {
		t.Fatalf("scrape: %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("scrape: not the text format: %v", err)
	}
	samples, help := map[string]float64{}, map[string]string{}
	for name, f := range fams {
		help[name] = f.GetHelp()
		for _, mt := range f.GetMetric() {
			key := name + labels(mt.GetLabel())
			switch f.GetType() {
			case dto.MetricType_COUNTER:
				samples[key] = mt.GetCounter().GetValue()
			case dto.MetricType_GAUGE:
				samples[key] = mt.GetGauge().GetValue()
			case dto.MetricType_HISTOGRAM:
				samples[name+"_count"+labels(mt.GetLabel())] = float64(mt.GetHistogram().GetSampleCount())
				samples[name+"_sum"+labels(mt.GetLabel())] = mt.GetHistogram().GetSampleSum()
			case dto.MetricType_UNTYPED:
				samples[key] = mt.GetUntyped().GetValue()
			}
		}
	}
	return samples, help
}

func labels(ls []*dto.LabelPair) string {
	if len(ls) == 0 {
		return ""
	}
	parts := make([]string, 0, len(ls))
	for _, l := range ls {
		parts = append(parts, fmt.Sprintf("%s=%q", l.GetName(), l.GetValue()))
	}
	sort.Strings(parts)
	return "{" + strings.Join(parts, ",") + "}"
}

func TestEveryMetricIsServedFromTheStart(t *testing.T) {
	m := metrics.New(metrics.Sources{HAProxyRestarts: func() int { return 2 }, HAProxyMaxConn: func() int { return 4096 }})
	samples, help := scrape(t, m)
	want := map[string]float64{
		`dfp_reconfigure_requests_total{result="ok"}`:                 0,
		`dfp_reconfigure_requests_total{result="bad_request"}`:        0,
		`dfp_reconfigure_requests_total{result="consul_unavailable"}`: 0,
		`dfp_reconfigure_requests_total{result="config_error"}`:       0,
		`dfp_reconfigure_requests_total{result="apply_error"}`:        0,
		`dfp_remove_requests_total{result="ok"}`:                      0,
		`dfp_remove_requests_total{result="bad_request"}`:             0,
		`dfp_haproxy_reloads_total{result="ok"}`:                      0,
		`dfp_haproxy_reloads_total{result="error"}`:                   0,
		`dfp_haproxy_reload_duration_seconds_count`:                   0,
		`dfp_haproxy_runtime_updates_total{result="ok"}`:              0,
		`dfp_haproxy_runtime_updates_total{result="refused"}`:         0,
		`dfp_haproxy_runtime_updates_total{result="error"}`:           0,
		`dfp_haproxy_validation_failures_total`:                       0,
		`dfp_haproxy_restarts_total`:                                  2,
		`dfp_haproxy_max_connections`:                                 4096,
		`dfp_last_apply_timestamp_seconds`:                            0,
		`dfp_consul_errors_total{op="read_routes"}`:                   0,
		`dfp_consul_errors_total{op="read_instances"}`:                0,
		`dfp_consul_errors_total{op="write_routes"}`:                  0,
		`dfp_consul_errors_total{op="watch"}`:                         0,
		`dfp_consul_reachable`:                                        0,
		`dfp_routes`:                                                  0,
		`dfp_instances`:                                               0,
		`dfp_watch_updates_total{kind="instances"}`:                   0,
		`dfp_watch_updates_total{kind="routes"}`:                      0,
	}
	for k, v := range want {
		got, ok := samples[k]
		if !ok {
			t.Errorf("%s is not served", k)
			continue
		}
		if got != v {
			t.Errorf("%s = %v, want %v", k, got, v)
		}
	}
	for name, h := range help {
		if strings.HasPrefix(name, "dfp_") && h == "" {
			t.Errorf("%s has no help text", name)
		}
	}
	// The Go runtime's and the process' collectors.
	for _, k := range []string{"go_goroutines", "process_resident_memory_bytes"} {
		if _, ok := samples[k]; !ok {
			t.Errorf("%s is not served", k)
		}
	}
}

func TestResultFollowsTheAPIsStatusCodes(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want string
	}{
		{nil, metrics.ResultOK},
		{&route.ParamError{Param: "servicePath", Reason: "is required"}, metrics.ResultBadRequest},
		{fmt.Errorf("%w: %w: %w", proxy.ErrConfig, proxy.ErrRejected, errors.New("regex")), metrics.ResultBadRequest},
		{fmt.Errorf("read instances of a: %w: %w", proxy.ErrConsul, errors.New("connection refused")), metrics.ResultConsulUnavailable},
		{fmt.Errorf("%w: %w", proxy.ErrConfig, &haproxy.ConfigError{Output: "x"}), metrics.ResultConfigError},
		{fmt.Errorf("%w: %w", proxy.ErrApply, errors.New("reload failed")), metrics.ResultApplyError},
		{fmt.Errorf("haproxy apply: %w", context.DeadlineExceeded), metrics.ResultTimeout},
		{errors.New("something else"), metrics.ResultError},
	} {
		if got := metrics.Result(tc.err); got != tc.want {
			t.Errorf("Result(%v) = %s, want %s", tc.err, got, tc.want)
		}
	}
}

func TestRecordedEventsMoveTheCounts(t *testing.T) {
	m := metrics.New(metrics.Sources{})
	start := time.Now()

	m.Request(metrics.OpReconfigure, nil)
	m.Request(metrics.OpReconfigure, nil)
	m.Request(metrics.OpReconfigure, fmt.Errorf("%w: x", proxy.ErrConsul))
	m.Request(metrics.OpRemove, &route.ParamError{Param: "serviceName", Reason: "is required"})
	m.Request("reload", nil) // not counted

	m.Reload(200*time.Millisecond, nil)
	m.Reload(50*time.Millisecond, fmt.Errorf("haproxy apply: %w", &haproxy.ConfigError{Output: "bad"}))
	m.Reload(50*time.Millisecond, errors.New("reload failed"))

	m.RuntimeUpdate(nil)
	m.RuntimeUpdate(fmt.Errorf("update: %w: no stats socket", haproxy.ErrNeedsReload))
	m.RuntimeUpdate(errors.New("socket closed"))

	m.Validated(nil)
	m.Validated(&haproxy.ConfigError{Output: "bad"})
	m.Validated(errors.New("could not run haproxy -c")) // not a rejection

	m.Consul(metrics.ConsulReadInstances, errors.New("connection refused"))
	m.Consul(metrics.ConsulWatch, errors.New("connection refused"))
	afterErrors, _ := scrape(t, m)
	m.Consul(metrics.ConsulWatch, nil)

	m.Table(3, 7)
	m.WatchUpdate(metrics.WatchInstances)
	m.WatchUpdate(metrics.WatchInstances)
	m.WatchUpdate(metrics.WatchRoutes)

	s, _ := scrape(t, m)
	want := map[string]float64{
		`dfp_reconfigure_requests_total{result="ok"}`:                 2,
		`dfp_reconfigure_requests_total{result="consul_unavailable"}`: 1,
		`dfp_reconfigure_requests_total{result="bad_request"}`:        0,
		`dfp_remove_requests_total{result="bad_request"}`:             1,
		`dfp_remove_requests_total{result="ok"}`:                      0,
		`dfp_haproxy_reloads_total{result="ok"}`:                      1,
		`dfp_haproxy_reloads_total{result="error"}`:                   2,
		`dfp_haproxy_reload_duration_seconds_count`:                   3,
		`dfp_haproxy_runtime_updates_total{result="ok"}`:              1,
		`dfp_haproxy_runtime_updates_total{result="refused"}`:         1,
		`dfp_haproxy_runtime_updates_total{result="error"}`:           1,
		`dfp_haproxy_validation_failures_total`:                       2, // one by a reload, one by Validated
		`dfp_consul_errors_total{op="read_instances"}`:                1,
		`dfp_consul_errors_total{op="watch"}`:                         1,
		`dfp_consul_errors_total{op="read_routes"}`:                   0,
		`dfp_consul_reachable`:                                        1,
		`dfp_routes`:                                                  3,
		`dfp_instances`:                                               7,
		`dfp_watch_updates_total{kind="instances"}`:                   2,
		`dfp_watch_updates_total{kind="routes"}`:                      1,
	}
	for k, v := range want {
		if s[k] != v {
			t.Errorf("%s = %v, want %v", k, s[k], v)
		}
	}
	if got := s[`dfp_haproxy_reload_duration_seconds_sum`]; math.Abs(got-0.3) > 1e-9 {
		t.Errorf("reload duration sum = %v, want 0.3", got)
	}
	if afterErrors[`dfp_consul_reachable`] != 0 {
		t.Errorf("consul reachable after a failed call = %v, want 0", afterErrors[`dfp_consul_reachable`])
	}
	last := s[`dfp_last_apply_timestamp_seconds`]
	if last < float64(start.Unix()) || last > float64(time.Now().Unix()+1) {
		t.Errorf("last apply = %v, want between %d and now", last, start.Unix())
	}
}

func TestServersShareNoCounts(t *testing.T) {
	a, b := metrics.New(metrics.Sources{}), metrics.New(metrics.Sources{})
	a.Request(metrics.OpReconfigure, nil)
	a.Table(1, 1)
	sb, _ := scrape(t, b)
	if sb[`dfp_reconfigure_requests_total{result="ok"}`] != 0 || sb[`dfp_routes`] != 0 {
		t.Fatalf("a second Metrics sees the counts of the first: %v %v",
			sb[`dfp_reconfigure_requests_total{result="ok"}`], sb[`dfp_routes`])
	}
	sa, _ := scrape(t, a)
	if sa[`dfp_reconfigure_requests_total{result="ok"}`] != 1 {
		t.Fatal("the first Metrics lost its count")
	}
}

func TestNilMetricsRecordsNothing(t *testing.T) {
	var m *metrics.Metrics
	m.Request(metrics.OpReconfigure, nil)
	m.Reload(time.Second, nil)
	m.RuntimeUpdate(nil)
	m.Validated(errors.New("x"))
	m.Applied(time.Now())
	m.Consul(metrics.ConsulWatch, errors.New("x"))
	m.Table(1, 2)
	m.WatchUpdate(metrics.WatchRoutes)
	if m.Registry() != nil {
		t.Fatal("a nil Metrics has a registry")
	}
	rec := httptest.NewRecorder()
	m.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	if rec.Code != http.StatusNotFound {
		t.Fatalf("a nil Metrics answers %d, want 404", rec.Code)
	}
}
