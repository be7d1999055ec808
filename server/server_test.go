package server

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	capi "github.com/hashicorp/consul/api"

	"github.com/docker-flow-proxy/docker-flow-proxy/api"
	"github.com/docker-flow-proxy/docker-flow-proxy/route/routetest"
)

const booksQuery = "serviceName=books-ms&servicePath=/api/v1/books"

func TestReconfigureBalancesOverEveryInstance(t *testing.T) {
	e := newEnv(t)
	for _, name := range []string{"books-1", "books-2", "books-3"} {
		e.backend("books-ms", name)
	}
	p := e.startProxy("docker-flow")

	r := p.reconfigure(t, booksQuery)
	if r.ServiceName != "books-ms" || !reflect.DeepEqual(r.ServicePath, []string{"/api/v1/books"}) || r.Instances != 3 {
		t.Fatalf("answer = %+v", r)
	}
	cfg := p.config(t)
	if !strings.Contains(cfg, "backend books-ms-be\n") || strings.Count(cfg, "    server ") != 3 {
		t.Fatalf("config lacks backend books-ms-be with three server lines:\n%s", cfg)
	}
	seen := backendsReached(t, p.http+"/api/v1/books", 30)
	if len(seen) != 3 {
		t.Fatalf("30 requests reached %v, want all three instances", seen)
	}
	if code, _ := get(t, p.http+"/unrouted", nil); code != http.StatusServiceUnavailable {
		t.Fatalf("a path no route matches answered %d, want 503", code)
	}
	if v, _ := e.kvGet("docker-flow/books-ms/path"); v != "/api/v1/books" {
		t.Fatalf("KV docker-flow/books-ms/path = %q", v)
	}
}

func TestNewReplicaServesTheRoutesFromKVWithoutAnyCall(t *testing.T) {
	e := newEnv(t)
	e.backend("books-ms", "books-1")
	e.backend("books-ms", "books-2")
	e.backend("go-demo-blue", "demo-blue")
	first := e.startProxy("docker-flow")
	first.reconfigure(t, booksQuery)
	first.reconfigure(t, "serviceName=go-demo&serviceColor=blue&servicePath=/demo&serviceDomain=demo.example.com")

	// A route written by the original product: one PUT per key, its readable layout.
	e.backend("legacy", "legacy-1")
	for k, v := range map[string]string{"path": "/legacy,/old", "skipcheck": "false", "color": "", "domain": "", "consultemplatefepath": ""} {
		if _, err := e.kv.Put(&capi.KVPair{Key: "docker-flow/legacy/" + k, Value: []byte(v)}, nil); err != nil {
			t.Fatal(err)
		}
	}

	second := e.startProxy("docker-flow")
	if got := backendsReached(t, second.http+"/api/v1/books", 10); len(got) != 2 {
		t.Fatalf("the new replica reached %v, want both instances", got)
	}
	code, body := get(t, second.http+"/demo", http.Header{"Host": {"demo.example.com:80"}})
	if code != http.StatusOK || !strings.HasPrefix(body, "demo-blue") {
		t.Fatalf("blue-green route on the new replica: %d %q", code, body)
	}
	if code, body := get(t, second.http+"/old/x", nil); code != http.StatusOK || !strings.HasPrefix(body, "legacy-1") {
		t.Fatalf("route from the original product's KV: %d %q", code, body)
	}
	if a, b := comparable(first.config(t)), comparable(second.config(t)); a != b {
		t.Fatalf("the replicas' configs differ:\n%s\n---\n%s", a, b)
	}
}

// comparable drops what differs between two servers on one machine (sockets, ports) and the route
// the first server never heard of.
func comparable(cfg string) string {
	var keep []string
	for _, block := range strings.Split(cfg, "\n\n") {
		if strings.HasPrefix(block, "backend legacy-be") {
			continue
		}
		for _, l := range strings.Split(block, "\n") {
			if !strings.Contains(l, "legacy") && !strings.Contains(l, "stats socket") && !strings.Contains(l, "    bind ") {
				keep = append(keep, l)
			}
		}
	}
	return strings.TrimSpace(strings.Join(keep, "\n"))
}

func TestRemoveTakesTheRouteOutOfHAProxyAndKV(t *testing.T) {
	e := newEnv(t)
	e.backend("books-ms", "books-1")
	e.backend("other", "other-1")
	p := e.startProxy("docker-flow")
	p.reconfigure(t, booksQuery)
	p.reconfigure(t, "serviceName=other&servicePath=/other")
	if code, _ := get(t, p.http+"/api/v1/books", nil); code != http.StatusOK {
		t.Fatalf("before remove: %d", code)
	}

	code, r := p.call(t, "/v1/docker-flow-proxy/remove?serviceName=books-ms")
	if code != http.StatusOK || r.Status != api.StatusOK {
		t.Fatalf("remove: %d %+v", code, r)
	}
	if code, _ := get(t, p.http+"/api/v1/books", nil); code != http.StatusServiceUnavailable {
		t.Fatalf("after remove the path answers %d, want 503", code)
	}
	if kv := e.kvTree("docker-flow/books-ms/"); len(kv) != 0 {
		t.Fatalf("KV keys left after remove: %v", kv)
	}
	if strings.Contains(p.config(t), "books-ms") {
		t.Fatal("config still mentions books-ms")
	}
	if code, body := get(t, p.http+"/other", nil); code != http.StatusOK || !strings.HasPrefix(body, "other-1") {
		t.Fatalf("the other route: %d %q", code, body)
	}
	// Removing what is not there is not an error, and says so.
	if code, r := p.call(t, "/v1/docker-flow-proxy/remove?serviceName=books-ms"); code != http.StatusOK || r.Message == "" {
		t.Fatalf("second remove: %d %+v", code, r)
	}
}

func TestBadRequestsAreRefusedAndChangeNothing(t *testing.T) {
	e := newEnv(t)
	e.backend("books-ms", "books-1")
	p := e.startProxy("docker-flow")
	p.reconfigure(t, booksQuery)
	cfgBefore, kvBefore := p.config(t), e.kvTree("docker-flow/")
	onDisk := func() string { return string(p.HAProxy().Config()) }
	diskBefore := onDisk()
	reloadsBefore := reloads(t, p)

	cases := routetest.BadQueries()
	for _, name := range []string{"", "books/ms", "books%0Ams", "$HOME", "a%20b", "..", "x%23y"} {
		cases = append(cases, routetest.BadQuery{Name: "remove " + name, Query: "remove:serviceName=" + name, Param: "serviceName"})
	}
	if len(cases) < 30 {
		t.Fatalf("only %d bad requests", len(cases))
	}
	for _, tc := range cases {
		path := "/v1/docker-flow-proxy/reconfigure?" + tc.Query
		if q, ok := strings.CutPrefix(tc.Query, "remove:"); ok {
			path = "/v1/docker-flow-proxy/remove?" + q
		}
		code, r := p.call(t, path)
		if code != http.StatusBadRequest || r.Status != api.StatusNOK || !strings.Contains(r.Message, tc.Param) {
			t.Errorf("%s: %d %+v; want 400 naming %s", tc.Name, code, r, tc.Param)
		}
	}
	if p.config(t) != cfgBefore || onDisk() != diskBefore {
		t.Error("a bad request changed the config")
	}
	if kv := e.kvTree("docker-flow/"); !reflect.DeepEqual(kv, kvBefore) {
		t.Errorf("a bad request changed KV: %v, was %v", kv, kvBefore)
	}
	if r := reloads(t, p); r != reloadsBefore {
		t.Errorf("bad requests caused %d reloads", r-reloadsBefore)
	}
	if code, _ := get(t, p.http+"/api/v1/books", nil); code != http.StatusOK {
		t.Errorf("the route stopped serving: %d", code)
	}
}

func reloads(t *testing.T, p *running) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	info, err := p.HAProxy().ShowProc(ctx)
	if err != nil {
		t.Fatalf("show proc: %v", err)
	}
	return info.Reloads
}

// loadInBackground runs load until the returned function is called, which returns load's result.
func loadInBackground(url string, maxDuration time.Duration, maxRequests int64) func() (sent, failed int64, firstErr error) {
	stop := make(chan struct{})
	type result struct {
		sent, failed int64
		err          error
	}
	done := make(chan result, 1)
	go func() {
		sent, failed, err := load(url, stop, maxDuration, maxRequests)
		done <- result{sent, failed, err}
	}()
	return func() (int64, int64, error) {
		close(stop)
		r := <-done
		return r.sent, r.failed, r.err
	}
}

// load sends requests from a few keep-alive clients until stop is closed, at most maxDuration
// and maxRequests, and returns how many were sent and how many failed.
func load(url string, stop <-chan struct{}, maxDuration time.Duration, maxRequests int64) (sent, failed int64, firstErr error) {
	var wg sync.WaitGroup
	var mu sync.Mutex
	deadline := time.Now().Add(maxDuration)
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 4}}
			for time.Now().Before(deadline) && atomic.LoadInt64(&sent) < maxRequests {
				select {
				case <-stop:
					return
				default:
				}
				atomic.AddInt64(&sent, 1)
				code, _, err := tryGet(c, url, nil)
				if err == nil && code != http.StatusOK {
					err = fmt.Errorf("status %d", code)
				}
				if err != nil {
					atomic.AddInt64(&failed, 1)
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	return sent, failed, firstErr
}

func TestNoRequestIsLostDuring50Reconfigures(t *testing.T) {
	e := newEnv(t)
	e.backend("books-ms", "books-1")
	e.backend("books-ms", "books-2")
	p := e.startProxy("docker-flow")
	p.reconfigure(t, booksQuery)
	before := reloads(t, p)

	stop := make(chan struct{})
	type result struct {
		sent, failed int64
		err          error
	}
	done := make(chan result)
	go func() {
		s, f, err := load(p.http+"/api/v1/books", stop, 120*time.Second, 500000)
		done <- result{s, f, err}
	}()
	for i := 0; i < 50; i++ {
		// Alternate between two path lists so that every call changes the config and reloads.
		q := booksQuery
		if i%2 == 0 {
			q += ",/api/v1/books-extra"
		}
		p.reconfigure(t, q)
	}
	close(stop)
	res := <-done
	if res.failed != 0 {
		t.Fatalf("%d of %d requests failed during 50 reconfigures; first: %v", res.failed, res.sent, res.err)
	}
	if res.sent < 100 {
		t.Fatalf("only %d requests were sent: the load did not overlap the reconfigures", res.sent)
	}
	if r := reloads(t, p) - before; r != 50 {
		t.Fatalf("%d reloads for 50 reconfigures that each changed the config", r)
	}
	t.Logf("%d requests, 0 failed, during 50 reloads", res.sent)
}

func TestFiftyConcurrentReconfiguresAllLand(t *testing.T) {
	e := newEnv(t)
	e.backend("shared", "shared-1")
	p := e.startProxy("docker-flow")
	var wg sync.WaitGroup
	errs := make(chan string, 50)
	for i := 0; i < 50; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			code, r := p.call(t, fmt.Sprintf("/v1/docker-flow-proxy/reconfigure?serviceName=svc-%02d&servicePath=/svc-%02d", i, i))
			if code != http.StatusOK {
				errs <- fmt.Sprintf("svc-%02d: %d %s", i, code, r.Message)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	cfg := p.config(t)
	kv := e.kvTree("docker-flow/")
	for i := 0; i < 50; i++ {
		name := fmt.Sprintf("svc-%02d", i)
		if !strings.Contains(cfg, "backend "+name+"-be\n") {
			t.Errorf("%s is not in the config", name)
		}
		if kv["docker-flow/"+name+"/path"] != "/"+name {
			t.Errorf("%s is not in KV", name)
		}
	}
}

func TestConsulDownRefusesChangesAndKeepsServing(t *testing.T) {
	e := newEnv(t)
	e.backend("books-ms", "books-1")
	p := e.startProxy("docker-flow")
	p.reconfigure(t, booksQuery)

	e.consul.Stop()
	code, r := p.call(t, "/v1/docker-flow-proxy/reconfigure?serviceName=other&servicePath=/other")
	if code != http.StatusServiceUnavailable || !strings.Contains(strings.ToLower(r.Message), "consul") {
		t.Fatalf("reconfigure with Consul down: %d %+v; want 503 naming Consul", code, r)
	}
	if code, r := p.call(t, "/v1/docker-flow-proxy/remove?serviceName=books-ms"); code != http.StatusServiceUnavailable {
		t.Fatalf("remove with Consul down: %d %+v; want 503", code, r)
	}
	for i := 0; i < 10; i++ {
		if code, body := get(t, p.http+"/api/v1/books", nil); code != http.StatusOK {
			t.Fatalf("existing route with Consul down: %d %q", code, body)
		}
	}
	code, body := get(t, p.api+"/v1/docker-flow-proxy/health", nil)
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "unreachable") {
		t.Fatalf("health with Consul down: %d %s", code, body)
	}
}

func TestHealthSaysHAProxyAndConsulAreUp(t *testing.T) {
	e := newEnv(t)
	p := e.startProxy("docker-flow")
	code, body := get(t, p.api+"/v1/docker-flow-proxy/health", nil)
	if code != http.StatusOK || !strings.Contains(body, `"HAProxy":"running"`) || !strings.Contains(body, `"Consul":"reachable"`) {
		t.Fatalf("health: %d %s", code, body)
	}
	if code, body := get(t, p.api+"/v1/test", nil); code != http.StatusOK || !strings.Contains(body, "OK") {
		t.Fatalf("/v1/test: %d %s", code, body)
	}
}

func TestKilledHAProxyWorkerIsBroughtBack(t *testing.T) {
	e := newEnv(t)
	e.backend("books-ms", "books-1")
	p := e.startProxy("docker-flow")
	p.reconfigure(t, booksQuery)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	info, err := p.HAProxy().ShowProc(ctx)
	if err != nil || len(info.Workers) == 0 {
		t.Fatalf("show proc: %+v %v", info, err)
	}
	if err := syscall.Kill(info.Workers[0], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "routes serve again after the worker was killed", func() bool {
		code, _, err := tryGet(httpClient, p.http+"/api/v1/books", nil)
		return err == nil && code == http.StatusOK && p.HAProxy().Restarts() >= 1
	})
	// And it still takes changes.
	e.backend("other", "other-1")
	p.reconfigure(t, "serviceName=other&servicePath=/other")
	if code, _ := get(t, p.http+"/other", nil); code != http.StatusOK {
		t.Fatalf("reconfigure after the restart: %d", code)
	}
}

func TestServiceWithoutInstancesIsAcceptedAndAnswers503(t *testing.T) {
	e := newEnv(t)
	p := e.startProxy("docker-flow")
	r := p.reconfigure(t, booksQuery)
	if !strings.Contains(r.Message, "503") || !strings.Contains(r.Message, "books-ms") {
		t.Fatalf("answer does not say the service has no instance yet: %+v", r)
	}
	if code, _ := get(t, p.http+"/api/v1/books", nil); code != http.StatusServiceUnavailable {
		t.Fatalf("path of a service without instances: %d, want 503", code)
	}
	e.backend("books-ms", "books-1")
	p.reconfigure(t, booksQuery)
	if code, _ := get(t, p.http+"/api/v1/books", nil); code != http.StatusOK {
		t.Fatalf("after an instance came: %d", code)
	}
}

func TestPathTypesAndDomainsRouteAsAsked(t *testing.T) {
	e := newEnv(t)
	for _, s := range []string{"exact", "dir", "end", "reg", "short", "long", "dom"} {
		e.backend(s, s)
	}
	p := e.startProxy("docker-flow")
	for _, q := range []string{
		"serviceName=exact&servicePath=/exact&pathType=path",
		"serviceName=dir&servicePath=/dir&pathType=path_dir",
		"serviceName=end&servicePath=.json&pathType=path_end",
		"serviceName=reg&servicePath=" + url.QueryEscape("^/v[0-9]+/items$") + "&pathType=path_reg",
		"serviceName=short&servicePath=/api",
		"serviceName=long&servicePath=/api/v1/books",
		"serviceName=dom&servicePath=/api&serviceDomain=books.example.com",
	} {
		p.reconfigure(t, q)
	}
	tests := []struct {
		path, host, want string
	}{
		{"/exact", "", "exact"}, {"/exact/x", "", ""},
		{"/dir/x", "", "dir"}, {"/directory", "", ""},
		{"/a/b.json", "", "end"},
		{"/v12/items", "", "reg"}, {"/v12/items/x", "", ""},
		{"/api/v1/books/1", "", "long"}, {"/api/other", "", "short"},
		{"/api/v1/books", "books.example.com", "dom"}, {"/api", "BOOKS.example.com:8000", "dom"},
		{"/api", "books.example.com.evil.org", "short"},
	}
	for _, tc := range tests {
		h := http.Header{}
		if tc.host != "" {
			h.Set("Host", tc.host)
		}
		req, _ := http.NewRequest(http.MethodGet, p.http+tc.path, nil)
		if tc.host != "" {
			req.Host = tc.host
		}
		resp, err := httpClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		got := resp.Header.Get("X-Backend")
		resp.Body.Close()
		if got != tc.want {
			t.Errorf("GET %s (Host %q) reached %q, want %q", tc.path, tc.host, got, tc.want)
		}
	}
}

func TestInstanceNamesKeepRouteTablesApart(t *testing.T) {
	e := newEnv(t)
	e.backend("books-ms", "books-1")
	a := e.startProxy("docker-flow")
	b := e.startProxy("other-proxy")
	a.reconfigure(t, booksQuery)
	if kv := e.kvTree("other-proxy/"); len(kv) != 0 {
		t.Fatalf("a route of docker-flow was written under other-proxy: %v", kv)
	}
	c := e.startProxy("other-proxy")
	if code, _ := get(t, c.http+"/api/v1/books", nil); code != http.StatusServiceUnavailable {
		t.Fatalf("a proxy named other-proxy serves docker-flow's route: %d", code)
	}
	_ = b
}

func TestAnswerEchoesTheParametersButNoPassword(t *testing.T) {
	e := newEnv(t)
	p := e.startProxy("docker-flow")
	q := booksQuery + "&users=alice:s3cret-pass&timeoutServer=5&addHeader=X-Env:prod"
	code, body := get(t, p.api+"/v1/docker-flow-proxy/reconfigure?"+q, nil)
	if code != http.StatusOK || strings.Contains(body, "s3cret-pass") {
		t.Fatalf("answer %d %s: want 200 and no password", code, body)
	}
	r := p.reconfigure(t, q)
	if !reflect.DeepEqual(r.Users, []string{"alice"}) || r.TimeoutServer != 5 || !reflect.DeepEqual(r.AddHeader, []string{"X-Env:prod"}) {
		t.Fatalf("answer %+v does not echo the parameters", r)
	}
}

// A regex Go accepts but HAProxy's PCRE2 refuses: the request is answered 400 with HAProxy's reason,
// and nothing changes.
func TestRegexThatHAProxyRefusesIsABadRequest(t *testing.T) {
	e := newEnv(t)
	e.backend("books-ms", "books-1")
	p := e.startProxy("docker-flow")
	p.reconfigure(t, booksQuery)
	cfgBefore, kvBefore := p.config(t), e.kvTree("docker-flow/")
	code, r := p.call(t, "/v1/docker-flow-proxy/reconfigure?serviceName=r&servicePath=%5E%2A&pathType=path_reg")
	if code != http.StatusBadRequest || !strings.Contains(r.Message, "regex") {
		t.Fatalf("a regex HAProxy refuses: %d %+v; want 400 with HAProxy's reason", code, r)
	}
	if p.config(t) != cfgBefore || !reflect.DeepEqual(e.kvTree("docker-flow/"), kvBefore) {
		t.Fatal("the refused request changed the config or KV")
	}
}
