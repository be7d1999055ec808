package server

import (
	"context"
	"fmt"
	"net/http"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/haproxy"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// samples is one scrape of GET /metrics: every sample by name and labels, `name{a="x"}`;
// histograms as name_count and name_sum.
type samples map[string]float64

// scrape reads GET /metrics from the API port and parses Prometheus' text format.
func (p *running) scrape(t *testing.T) samples {
	t.Helper()
	resp, err := httpClient.Get(p.api + "/metrics")
	if err != nil {
		t.Fatalf("GET /metrics: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain") {
		t.Fatalf("GET /metrics: %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("GET /metrics: not Prometheus' text format: %v", err)
	}
	out := samples{}
	for name, f := range fams {
		for _, m := range f.GetMetric() {
			var ls []string
			for _, l := range m.GetLabel() {
				ls = append(ls, fmt.Sprintf("%s=%q", l.GetName(), l.GetValue()))
			}
			sort.Strings(ls)
			lbl := ""
			if len(ls) > 0 {
				lbl = "{" + strings.Join(ls, ",") + "}"
			}
			switch f.GetType() {
			case dto.MetricType_COUNTER:
				out[name+lbl] = m.GetCounter().GetValue()
			case dto.MetricType_GAUGE:
				out[name+lbl] = m.GetGauge().GetValue()
			case dto.MetricType_HISTOGRAM:
				out[name+"_count"+lbl] = float64(m.GetHistogram().GetSampleCount())
				out[name+"_sum"+lbl] = m.GetHistogram().GetSampleSum()
			}
		}
	}
	return out
}

// get returns a sample that must be served.
func (s samples) get(t *testing.T, key string) float64 {
	t.Helper()
	v, ok := s[key]
	if !ok {
		t.Fatalf("/metrics does not serve %s", key)
	}
	return v
}

// moved asserts that each key moved by the given amount between two scrapes.
func moved(t *testing.T, step string, before, after samples, want map[string]float64) {
	t.Helper()
	for k, d := range want {
		if got := after.get(t, k) - before.get(t, k); got != d {
			t.Errorf("%s: %s moved by %v, want %v", step, k, got, d)
		}
	}
}

const (
	mReconfOK      = `dfp_reconfigure_requests_total{result="ok"}`
	mReconfBad     = `dfp_reconfigure_requests_total{result="bad_request"}`
	mReconfConsul  = `dfp_reconfigure_requests_total{result="consul_unavailable"}`
	mRemoveOK      = `dfp_remove_requests_total{result="ok"}`
	mRemoveBad     = `dfp_remove_requests_total{result="bad_request"}`
	mReloadsOK     = `dfp_haproxy_reloads_total{result="ok"}`
	mReloadCount   = `dfp_haproxy_reload_duration_seconds_count`
	mRuntimeOK     = `dfp_haproxy_runtime_updates_total{result="ok"}`
	mInvalid       = `dfp_haproxy_validation_failures_total`
	mLastApply     = `dfp_last_apply_timestamp_seconds`
	mRoutes        = `dfp_routes`
	mInstances     = `dfp_instances`
	mReachable     = `dfp_consul_reachable`
	mWatchErrors   = `dfp_consul_errors_total{op="watch"}`
	mReadInstErr   = `dfp_consul_errors_total{op="read_instances"}`
	mWatchInstance = `dfp_watch_updates_total{kind="instances"}`
	mRestarts      = `dfp_haproxy_restarts_total`
	mMaxConn       = `dfp_haproxy_max_connections`
)

func TestMetricsCountRequestsReloadsAndRuntimeUpdates(t *testing.T) {
	e := newEnv(t)
	for _, n := range []string{"books-1", "books-2", "books-3"} {
		e.backend("books-ms", n)
	}
	started := time.Now()
	p := e.startProxy("docker-flow")
	s0 := p.scrape(t)
	if s0.get(t, mRoutes) != 0 || s0.get(t, mReachable) != 1 {
		t.Fatalf("at start: routes %v, consul reachable %v; want 0 and 1", s0[mRoutes], s0[mReachable])
	}
	if last := s0.get(t, mLastApply); last < float64(started.Unix()) {
		t.Fatalf("last apply %v is before the server started (%d)", last, started.Unix())
	}
	if s0.get(t, mMaxConn) <= 0 {
		t.Fatalf("HAProxy's connection limit is %v after its start, want its Maxconn", s0[mMaxConn])
	}
	if _, ok := s0["go_goroutines"]; !ok {
		t.Fatal("/metrics does not serve the Go runtime's metrics")
	}

	// A good reconfigure: one request ok, one reload, one route of three instances.
	p.reconfigure(t, booksQuery)
	s1 := p.scrape(t)
	moved(t, "a good reconfigure", s0, s1, map[string]float64{mReconfOK: 1, mReconfBad: 0, mReloadsOK: 1, mReloadCount: 1})
	if s1.get(t, mRoutes) != 1 || s1.get(t, mInstances) != 3 {
		t.Fatalf("after a reconfigure: routes %v, instances %v; want 1 and 3", s1[mRoutes], s1[mInstances])
	}
	if s1.get(t, mLastApply) < s0.get(t, mLastApply) {
		t.Fatal("the last apply went back in time")
	}

	// A bad request: counted as such, and nothing reloads.
	if code, r := p.call(t, "/v1/docker-flow-proxy/reconfigure?serviceName=books-ms"); code != http.StatusBadRequest {
		t.Fatalf("reconfigure without servicePath: %d %+v", code, r)
	}
	// A regex that HAProxy's PCRE refuses: a bad request too, seen by `haproxy -c`.
	if code, r := p.call(t, "/v1/docker-flow-proxy/reconfigure?serviceName=r&servicePath=%5E%2A&pathType=path_reg"); code != http.StatusBadRequest {
		t.Fatalf("a regex HAProxy refuses: %d %+v", code, r)
	}
	s2 := p.scrape(t)
	moved(t, "two bad requests", s1, s2, map[string]float64{mReconfBad: 2, mReconfOK: 0, mReloadsOK: 0, mReloadCount: 0})
	if s2.get(t, mInvalid) < s1.get(t, mInvalid)+1 {
		t.Fatalf("validation failures %v -> %v; want a rise after the regex HAProxy refuses", s1[mInvalid], s2[mInvalid])
	}
	if s2.get(t, mRoutes) != 1 {
		t.Fatalf("routes %v after bad requests, want 1", s2[mRoutes])
	}

	// A fourth instance registered in Consul: the runtime API adds it, no reload.
	e.backend("books-ms", "books-4")
	var s3 samples
	eventually(t, 10*time.Second, "/metrics counts four instances", func() bool {
		s3 = p.scrape(t)
		return s3.get(t, mInstances) == 4
	})
	moved(t, "a fourth instance", s2, s3, map[string]float64{mReloadsOK: 0})
	if s3.get(t, mRuntimeOK) <= s2.get(t, mRuntimeOK) || s3.get(t, mWatchInstance) <= s2.get(t, mWatchInstance) {
		t.Fatalf("runtime updates %v -> %v, instance updates %v -> %v; want both to rise",
			s2[mRuntimeOK], s3[mRuntimeOK], s2[mWatchInstance], s3[mWatchInstance])
	}
	if got := backendsReached(t, p.http+"/api/v1/books", 8)["books-4"]; got == 0 {
		t.Fatal("the fourth instance counted in /metrics receives no traffic")
	}

	// A remove: routes and instances go down, with one reload; a bad remove is counted apart.
	if code, r := p.call(t, "/v1/docker-flow-proxy/remove?serviceName=books-ms"); code != http.StatusOK {
		t.Fatalf("remove: %d %+v", code, r)
	}
	if code, r := p.call(t, "/v1/docker-flow-proxy/remove?serviceName=bad%20name"); code != http.StatusBadRequest {
		t.Fatalf("remove of a bad name: %d %+v", code, r)
	}
	s4 := p.scrape(t)
	moved(t, "a remove and a bad remove", s3, s4, map[string]float64{mRemoveOK: 1, mRemoveBad: 1, mReloadsOK: 1})
	if s4.get(t, mRoutes) != 0 || s4.get(t, mInstances) != 0 {
		t.Fatalf("after the remove: routes %v, instances %v; want 0 and 0", s4[mRoutes], s4[mInstances])
	}

	// Only GET reads the metrics.
	req, err := http.NewRequest(http.MethodPost, p.api+"/metrics", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := httpClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Fatalf("POST /metrics: %d, want 405", resp.StatusCode)
	}
}

func TestMetricsFollowConsulGoingAndComingBack(t *testing.T) {
	e := newPersistentEnv(t)
	e.backend("books-ms", "books-1")
	p := e.startProxy("docker-flow")
	p.reconfigure(t, booksQuery)
	s0 := p.scrape(t)
	if s0.get(t, mReachable) != 1 {
		t.Fatalf("consul reachable = %v with Consul up, want 1", s0[mReachable])
	}

	e.consul.Stop()
	var s1 samples
	eventually(t, 10*time.Second, "/metrics says Consul is unreachable", func() bool {
		s1 = p.scrape(t)
		return s1.get(t, mReachable) == 0 && s1.get(t, mWatchErrors) > s0.get(t, mWatchErrors)
	})
	// A reconfigure during the outage fails with 503, and is counted so.
	if code, r := p.call(t, "/v1/docker-flow-proxy/reconfigure?serviceName=other&servicePath=/other"); code != http.StatusServiceUnavailable {
		t.Fatalf("reconfigure with Consul down: %d %+v; want 503", code, r)
	}
	s2 := p.scrape(t)
	moved(t, "a reconfigure with Consul down", s1, s2, map[string]float64{mReconfConsul: 1, mReconfOK: 0, mReadInstErr: 1, mReloadsOK: 0})
	if s2.get(t, mRoutes) != 1 {
		t.Fatalf("routes %v during the outage, want the 1 still served", s2[mRoutes])
	}

	e.consul.Start()
	eventually(t, 30*time.Second, "/metrics says Consul is reachable again", func() bool {
		return p.scrape(t).get(t, mReachable) == 1
	})
}

func TestMetricsCountHAProxyRestarts(t *testing.T) {
	e := newEnv(t)
	e.backend("books-ms", "books-1")
	p := e.startProxy("docker-flow")
	p.reconfigure(t, booksQuery)
	before := p.scrape(t).get(t, mRestarts)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	info, err := p.HAProxy().ShowProc(ctx)
	if err != nil || len(info.Workers) == 0 {
		t.Fatalf("show proc: %+v %v", info, err)
	}
	if err := syscall.Kill(info.Workers[0], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "/metrics counts the restart of HAProxy", func() bool {
		return p.scrape(t).get(t, mRestarts) > before
	})
}

// Routes by domain, enough of them to be routed through a map: a remove and a path change go
// through HAProxy's runtime API, and are served at once.
func TestRemoveAndPathChangeOfMappedRoutesGoThroughTheRuntimeAPI(t *testing.T) {
	e := newEnv(t)
	p := e.startProxy("docker-flow")
	for i := 0; i < haproxy.MinMapRoutes+1; i++ {
		name := fmt.Sprintf("svc-%d", i)
		e.backend(name, name+"-1")
		p.reconfigure(t, "serviceName="+name+"&servicePath=/"+name+"&serviceDomain="+name+".example.com")
	}
	if !strings.Contains(p.config(t), "var(txn.dfp_host_path),map_beg(") {
		t.Fatalf("the routes by domain are not in a map:\n%s", p.config(t))
	}
	hostGet := func(host, path string) (int, string) {
		return get(t, p.http+path, http.Header{"Host": {host}})
	}
	if code, body := hostGet("svc-1.example.com", "/svc-1/x"); code != http.StatusOK || !strings.HasPrefix(body, "svc-1-1") {
		t.Fatalf("svc-1 before the changes: %d %q", code, body)
	}
	s0 := p.scrape(t)
	if code, r := p.call(t, "/v1/docker-flow-proxy/remove?serviceName=svc-1"); code != http.StatusOK {
		t.Fatalf("remove: %d %+v", code, r)
	}
	if code, _ := hostGet("svc-1.example.com", "/svc-1/x"); code != http.StatusServiceUnavailable {
		t.Fatalf("svc-1 after its remove answers %d, want 503", code)
	}
	p.reconfigure(t, "serviceName=svc-2&servicePath=/svc-2-moved&serviceDomain=svc-2.example.com")
	if code, body := hostGet("svc-2.example.com", "/svc-2-moved/x"); code != http.StatusOK || !strings.HasPrefix(body, "svc-2-1") {
		t.Fatalf("svc-2 on its new path: %d %q", code, body)
	}
	if code, _ := hostGet("svc-2.example.com", "/svc-2/x"); code != http.StatusServiceUnavailable {
		t.Fatalf("svc-2 on its old path answers %d, want 503", code)
	}
	s1 := p.scrape(t)
	if got := s1.get(t, mRuntimeOK) - s0.get(t, mRuntimeOK); got != 2 {
		t.Fatalf("runtime-API updates rose by %v for a remove and a path change, want 2", got)
	}
	if code, body := hostGet("svc-3.example.com", "/svc-3/x"); code != http.StatusOK || !strings.HasPrefix(body, "svc-3-1") {
		t.Fatalf("svc-3 after the changes: %d %q", code, body)
	}
}
