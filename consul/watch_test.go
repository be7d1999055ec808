package consul

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"net/http/httptest"
	"reflect"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

// watchRun is a Watcher running in the background for one test.
type watchRun struct {
	w      *Watcher
	logs   *testenv.LogBuffer
	cancel context.CancelFunc
	done   chan struct{} // closed when Run has returned
	err    error         // Run's result, once done is closed
}

// startWatcher runs a watcher of services and store (may be nil) until the test ends. tune, when
// set, changes the watcher before Run.
func startWatcher(t *testing.T, c *Client, store *Store, filter HealthFilter, services []string, tune func(*Watcher)) *watchRun {
	t.Helper()
	logs := &testenv.LogBuffer{}
	w := NewWatcher(c, store, filter, slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
	w.Services(services)
	if tune != nil {
		tune(w)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &watchRun{w: w, logs: logs, cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(r.done)
		r.err = w.Run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-r.done:
		case <-time.After(5 * time.Second):
			t.Error("Run did not return within 5s of the cancellation")
		}
	})
	return r
}

// waitFor reads updates until one satisfies match, for at most d, and returns it with the time it
// took. Updates that do not match are logged and skipped.
func (r *watchRun) waitFor(t *testing.T, d time.Duration, what string, match func(Update) bool) (Update, time.Duration) {
	t.Helper()
	start := time.Now()
	timer := time.NewTimer(d)
	defer timer.Stop()
	for {
		select {
		case u, ok := <-r.w.Updates():
			if !ok {
				t.Fatalf("waiting for %s: the updates channel is closed", what)
			}
			if match(u) {
				return u, time.Since(start)
			}
			t.Logf("waiting for %s: skipping %s", what, describe(u))
		case <-timer.C:
			t.Fatalf("no update %s within %s; watcher logs:\n%s", what, d, r.logs)
		}
	}
}

// waitAll reads updates until each of matches has matched one, in any order, for at most d.
func (r *watchRun) waitAll(t *testing.T, d time.Duration, matches map[string]func(Update) bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for len(matches) > 0 {
		u, _ := r.waitFor(t, time.Until(deadline), fmt.Sprint(len(matches), " more"), func(Update) bool { return true })
		for what, match := range matches {
			if match(u) {
				delete(matches, what)
			}
		}
	}
}

// expectNone fails the test when any update arrives within d.
func (r *watchRun) expectNone(t *testing.T, d time.Duration, why string) {
	t.Helper()
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case u := <-r.w.Updates():
		t.Errorf("%s: unexpected update %s", why, describe(u))
	case <-timer.C:
	}
}

func describe(u Update) string {
	switch {
	case u.Err != nil:
		return fmt.Sprintf("{Err: %v, Since: %s}", u.Err, u.Since.Format(time.StampMilli))
	case u.RoutesChanged:
		return fmt.Sprintf("{Routes: %v at %d}", slices.Sorted(maps.Keys(u.Versions)), u.Index)
	case u.Recovered:
		return "{Recovered}"
	default:
		return fmt.Sprintf("{Service: %s, Instances: %v}", u.Service, u.Instances)
	}
}

func instancesOf(service string, want ...route.Instance) func(Update) bool {
	if want == nil {
		want = []route.Instance{}
	}
	return func(u Update) bool {
		return u.Err == nil && !u.RoutesChanged && u.Service == service && u.Instances != nil && reflect.DeepEqual(u.Instances, want)
	}
}

func routesNamed(want ...string) func(Update) bool {
	if want == nil {
		want = []string{}
	}
	return func(u Update) bool {
		return u.RoutesChanged && u.Err == nil && u.Versions != nil && reflect.DeepEqual(slices.Sorted(maps.Keys(u.Versions)), want)
	}
}

// agentPut sends a PUT without body to the agent API (check pass/fail).
func agentPut(t *testing.T, agent *testenv.Consul, path string) {
	t.Helper()
	agent.Put(path, "")
}

func TestWatcherInstances(t *testing.T) {
	t.Parallel()
	agent := testenv.StartConsul(t)
	c, _ := newClient(t, agent.Addr)
	agent.RegisterService("go-demo", "go-demo-1", "10.0.0.1", 8080)
	waitInstances(t, c, "go-demo", HealthAny, 1)

	r := startWatcher(t, c, nil, HealthPassing, []string{"go-demo"}, nil)
	r.waitFor(t, 5*time.Second, "with the first instance", instancesOf("go-demo", inst("10.0.0.1", 8080)))

	start := time.Now()
	agent.RegisterService("go-demo", "go-demo-2", "10.0.0.2", 8080)
	u, _ := r.waitFor(t, 5*time.Second, "with 2 instances", instancesOf("go-demo", inst("10.0.0.1", 8080), inst("10.0.0.2", 8080)))
	took := time.Since(start)
	t.Logf("registration to update: %s", took)
	if took >= 2*time.Second {
		t.Errorf("the registration took %s to be reported, want < 2s (usually < 1s)", took)
	}
	// The watcher's list is Client.Instances' list.
	if got, err := c.Instances(testContext(t), "go-demo", HealthPassing); err != nil || !reflect.DeepEqual(got, u.Instances) {
		t.Errorf("Instances = %v, %v; the watcher reported %v", got, err, u.Instances)
	}

	start = time.Now()
	agent.DeregisterService("go-demo-2")
	r.waitFor(t, 5*time.Second, "with 1 instance after deregistering", instancesOf("go-demo", inst("10.0.0.1", 8080)))
	took = time.Since(start)
	t.Logf("deregistration to update: %s", took)
	if took >= 2*time.Second {
		t.Errorf("the deregistration took %s to be reported, want < 2s", took)
	}
}

func TestWatcherHealthCheck(t *testing.T) {
	t.Parallel()
	agent := testenv.StartConsul(t)
	c, _ := newClient(t, agent.Addr)
	// A TTL check starts critical.
	register(t, agent, map[string]any{
		"ID": "ttl-1", "Name": "ttl", "Address": "10.0.3.1", "Port": 80,
		"Check": map[string]any{"CheckID": "ttl-1-check", "TTL": "30s"},
	})
	waitInstances(t, c, "ttl", HealthAny, 1)

	r := startWatcher(t, c, nil, HealthPassing, []string{"ttl"}, nil)
	r.waitFor(t, 5*time.Second, "without the critical instance", instancesOf("ttl"))

	start := time.Now()
	agentPut(t, agent, "/v1/agent/check/pass/ttl-1-check")
	r.waitFor(t, 5*time.Second, "with the passing instance", instancesOf("ttl", inst("10.0.3.1", 80)))
	took := time.Since(start)
	t.Logf("check pass to update: %s", took)

	start = time.Now()
	agentPut(t, agent, "/v1/agent/check/fail/ttl-1-check")
	r.waitFor(t, 5*time.Second, "without the failing instance", instancesOf("ttl"))
	took = time.Since(start)
	t.Logf("check fail to update: %s", took)
	if took >= 2*time.Second {
		t.Errorf("the failing check took %s to be reported, want < 2s", took)
	}
}

func TestWatcherRoutes(t *testing.T) {
	t.Parallel()
	agent := testenv.StartConsul(t)
	c, _ := newClient(t, agent.Addr)
	ctx := testContext(t)
	s := NewStore(c, "")
	books := route.Route{ServiceName: "books", ServicePath: []string{"/books"}, PathType: route.PathBeg}
	if err := s.Put(ctx, books); err != nil {
		t.Fatal(err)
	}

	r := startWatcher(t, c, s, HealthPassing, nil, nil)
	r.waitFor(t, 5*time.Second, "with the route table", routesNamed("books"))

	// Someone else (another replica) writes a route.
	other := NewStore(c, "docker-flow")
	goDemo := route.Route{ServiceName: "go-demo", ServicePath: []string{"/demo"}, PathType: route.PathBeg, ServiceColor: "blue"}
	start := time.Now()
	if err := other.Put(ctx, goDemo); err != nil {
		t.Fatal(err)
	}
	u, _ := r.waitFor(t, 5*time.Second, "with the new route", routesNamed("books", "go-demo"))
	took := time.Since(start)
	t.Logf("KV put to update: %s", took)
	if took >= time.Second {
		t.Errorf("the KV put took %s to be reported, want < 1s", took)
	}
	// The watcher's versions are Store.Table's, and the new route's is the one its write left, at
	// the index reported.
	table, err := s.Table(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !maps.Equal(table.Versions, u.Versions) {
		t.Errorf("Table's versions = %v; the watcher reported %v", table.Versions, u.Versions)
	}
	written, err := other.Write(ctx, "go-demo", &goDemo)
	if err != nil {
		t.Fatal(err)
	}
	u, _ = r.waitFor(t, 5*time.Second, "with the route written again", routesNamed("books", "go-demo"))
	if got := u.Versions["go-demo"]; got != written || u.Index < written.Index {
		t.Errorf("after a write that left %+v the watcher reported %+v at index %d", written, got, u.Index)
	}

	if err := other.Delete(ctx, "books"); err != nil {
		t.Fatal(err)
	}
	r.waitFor(t, 5*time.Second, "without the deleted route", routesNamed("go-demo"))
}

func TestWatcherIgnoresUnrelatedChanges(t *testing.T) {
	t.Parallel()
	agent := testenv.StartConsul(t)
	c, _ := newClient(t, agent.Addr)
	ctx := testContext(t)
	s := NewStore(c, "")
	if err := s.Put(ctx, route.Route{ServiceName: "books", ServicePath: []string{"/books"}, PathType: route.PathBeg}); err != nil {
		t.Fatal(err)
	}
	agent.RegisterService("books", "books-1", "10.0.0.1", 8080)
	waitInstances(t, c, "books", HealthAny, 1)

	// A short wait: blocking queries also time out and come back unchanged during the test.
	r := startWatcher(t, c, s, HealthPassing, []string{"books"}, func(w *Watcher) { w.timing.wait = 300 * time.Millisecond })
	r.waitAll(t, 5*time.Second, map[string]func(Update) bool{
		"instances": instancesOf("books", inst("10.0.0.1", 8080)),
		"routes":    routesNamed("books"),
	})

	agent.RegisterService("unrelated", "unrelated-1", "10.0.0.9", 9090)
	agent.RegisterService("books", "books-1", "10.0.0.1", 8080) // the same registration again
	putRawKV(t, c, "other/key", "x")
	putRawKV(t, c, "docker-flow-2/books/path", "/x") // shares the prefix's first characters
	putRawKV(t, c, "docker-flow/loose-key", "x")     // under the prefix but not in a route folder
	putRawKV(t, c, "docker-flow/books/deep/key", "x")
	r.expectNone(t, 1500*time.Millisecond, "unrelated changes")
	// The blocking queries did wake up (for the writes under the prefix and the wait's end) and
	// found nothing new.
	if !strings.Contains(r.logs.String(), "nothing changed") {
		t.Errorf("no blocking query came back unchanged; watcher logs:\n%s", r.logs)
	}
}

func TestWatcherServices(t *testing.T) {
	t.Parallel()
	agent := testenv.StartConsul(t)
	c, _ := newClient(t, agent.Addr)

	r := startWatcher(t, c, nil, HealthAny, []string{"alpha"}, nil)
	r.waitFor(t, 5*time.Second, "of alpha, empty", instancesOf("alpha"))

	r.w.Services([]string{"beta"})
	r.waitFor(t, 5*time.Second, "of beta, empty", instancesOf("beta"))
	r.w.mu.Lock()
	nodeWatches := len(r.w.cat.nodeWs)
	_, alpha := r.w.cat.emitted["alpha"]
	r.w.mu.Unlock()
	// Following another service costs no query: the catalog's watches stay as they were.
	if nodeWatches != 1 || alpha {
		t.Errorf("%d watches of node services (want the agent's node's only), alpha still known: %v", nodeWatches, alpha)
	}

	agent.RegisterService("alpha", "alpha-1", "10.0.0.1", 80)
	waitInstances(t, c, "alpha", HealthAny, 1)
	r.expectNone(t, 1500*time.Millisecond, "a change of a service no longer watched")

	agent.RegisterService("beta", "beta-1", "10.0.0.2", 80)
	r.waitFor(t, 5*time.Second, "of beta with its instance", instancesOf("beta", inst("10.0.0.2", 80)))

	r.w.Services([]string{"beta", "alpha", "alpha", "bad/name"})
	r.waitFor(t, 5*time.Second, "of alpha, watched again", instancesOf("alpha", inst("10.0.0.1", 80)))
	r.expectNone(t, 500*time.Millisecond, "after adding alpha again (beta did not change)")
	if !strings.Contains(r.logs.String(), "bad/name") {
		t.Errorf("the invalid service name is not logged:\n%s", r.logs)
	}
}

func TestWatcherConsulRestart(t *testing.T) {
	t.Parallel()
	agent := testenv.StartConsul(t)
	c, _ := newClient(t, agent.Addr)
	ctx := testContext(t)
	s := NewStore(c, "")
	if err := s.Put(ctx, route.Route{ServiceName: "books", ServicePath: []string{"/books"}, PathType: route.PathBeg}); err != nil {
		t.Fatal(err)
	}
	agent.RegisterService("go-demo", "go-demo-1", "10.0.0.1", 8080)
	waitInstances(t, c, "go-demo", HealthAny, 1)

	r := startWatcher(t, c, s, HealthPassing, []string{"go-demo"}, nil)
	r.waitAll(t, 5*time.Second, map[string]func(Update) bool{
		"instances": instancesOf("go-demo", inst("10.0.0.1", 8080)),
		"routes":    routesNamed("books"),
	})

	stopped := time.Now()
	agent.Stop()
	u, _ := r.waitFor(t, 5*time.Second, "with the outage", func(u Update) bool { return u.Err != nil })
	took := time.Since(stopped)
	t.Logf("Consul stopped to outage update: %s (%v)", took, u.Err)
	if !errors.Is(u.Err, ErrUnavailable) {
		t.Errorf("Err = %v, want ErrUnavailable", u.Err)
	}
	if u.Since.Before(stopped) || u.Since.After(time.Now()) {
		t.Errorf("Since = %s, want between the stop (%s) and now", u.Since.Format(time.StampMilli), stopped.Format(time.StampMilli))
	}
	if u.Service != "" || u.Instances != nil || u.RoutesChanged {
		t.Errorf("the outage update carries a state: %s", describe(u))
	}

	// A dev agent comes back empty, with its index starting over.
	agent.Start()
	t.Logf("Consul restarted after %s", time.Since(stopped))
	back := time.Now()
	agent.RegisterService("go-demo", "go-demo-2", "10.0.0.2", 8080)
	if err := s.Put(ctx, route.Route{ServiceName: "go-demo", ServicePath: []string{"/demo"}, PathType: route.PathBeg}); err != nil {
		t.Fatal(err)
	}
	// The state of the restarted agent arrives (its empty state first, possibly), and the outage
	// is over: the latest update of each is the new state, no Err follows, and the end of the
	// outage is reported (a consumer whose last update said Consul was down learns it is not).
	deadline := time.Now().Add(5 * time.Second)
	var gotInstances, gotRoutes, down, recovered bool
	for !gotInstances || !gotRoutes || down || !recovered {
		u, _ := r.waitFor(t, time.Until(deadline), "with the restarted agent's state and the end of the outage", func(Update) bool { return true })
		down = u.Err != nil
		recovered = (recovered || u.Recovered) && !down
		if u.Recovered && (u.RoutesChanged || u.Instances != nil) {
			t.Errorf("the end of the outage carries a state: %s", describe(u))
		}
		switch {
		case u.RoutesChanged:
			gotRoutes = routesNamed("go-demo")(u)
		case u.Service == "go-demo":
			gotInstances = instancesOf("go-demo", inst("10.0.0.2", 8080))(u)
		}
		t.Logf("after %s: %s", time.Since(back).Round(time.Millisecond), describe(u))
	}
	took = time.Since(back)
	t.Logf("restarted agent's state reported %s after the registration", took)
	if took >= 5*time.Second {
		t.Errorf("the restarted agent's state took %s to be reported, want < 5s", took)
	}
	// The end of the outage is logged right after the last state is queued.
	for end := time.Now().Add(time.Second); !strings.Contains(r.logs.String(), "reading Consul again") && time.Now().Before(end); {
		time.Sleep(10 * time.Millisecond)
	}
	if !strings.Contains(r.logs.String(), "reading Consul again") {
		t.Errorf("the end of the outage is not logged:\n%s", r.logs)
	}
}

func TestWatcherSlowConsumer(t *testing.T) {
	t.Parallel()
	agent := testenv.StartConsul(t)
	c, _ := newClient(t, agent.Addr)
	ctx := testContext(t)
	s := NewStore(c, "")

	r := startWatcher(t, c, s, HealthPassing, []string{"go-demo"}, nil)
	// Nobody reads while the route table changes many times and an instance comes.
	const n = 60
	for i := range n {
		if err := s.Put(ctx, route.Route{ServiceName: fmt.Sprintf("svc-%02d", i), ServicePath: []string{"/p"}, PathType: route.PathBeg}); err != nil {
			t.Fatal(err)
		}
	}
	agent.RegisterService("go-demo", "go-demo-1", "10.0.0.1", 8080)
	waitInstances(t, c, "go-demo", HealthAny, 1)
	time.Sleep(300 * time.Millisecond)
	t.Logf("%d updates wait on the channel (capacity %d)", len(r.w.Updates()), cap(r.w.Updates()))
	if len(r.w.Updates()) < cap(r.w.Updates()) {
		t.Logf("the channel did not fill up: Consul coalesced the writes")
	}

	// The latest state of each arrives, after the stale ones.
	want := make([]string, n)
	for i := range n {
		want[i] = fmt.Sprintf("svc-%02d", i)
	}
	deadline := time.Now().Add(5 * time.Second)
	var gotRoutes, gotInstances bool
	for !gotRoutes || !gotInstances {
		u, _ := r.waitFor(t, time.Until(deadline), "with the latest states", func(Update) bool { return true })
		if u.RoutesChanged {
			gotRoutes = routesNamed(want...)(u)
		}
		if u.Service == "go-demo" {
			gotInstances = instancesOf("go-demo", inst("10.0.0.1", 8080))(u)
		}
	}
	r.expectNone(t, 500*time.Millisecond, "after the latest states")
}

// TestWatcherStops is not parallel: no other test's watcher runs while it looks for leftovers.
func TestWatcherStops(t *testing.T) {
	agent := testenv.StartConsul(t)
	c, _ := newClient(t, agent.Addr)
	s := NewStore(c, "")
	services := make([]string, 10)
	for i := range services {
		services[i] = "svc-" + strconv.Itoa(i)
	}
	r := startWatcher(t, c, s, HealthPassing, services, nil)
	for range len(services) + 1 {
		r.waitFor(t, 5*time.Second, "the first states", func(Update) bool { return true })
	}
	time.Sleep(100 * time.Millisecond) // every watch now blocks in a query

	start := time.Now()
	r.cancel()
	select {
	case <-r.done:
		if r.err != nil {
			t.Errorf("Run = %v, want nil", r.err)
		}
	case <-time.After(time.Second):
		t.Fatal("Run did not return within 1s of the cancellation")
	}
	t.Logf("Run returned %s after the cancellation", time.Since(start))
	if _, ok := <-r.w.Updates(); ok {
		t.Error("an update arrived after Run returned")
	}
	// Run waited for its goroutines; check that none is left.
	buf := make([]byte, 1<<20)
	stacks := string(buf[:runtime.Stack(buf, true)])
	for _, g := range strings.Split(stacks, "\n\n") {
		if strings.Contains(g, "consul.(*Watcher)") || strings.Contains(g, "consul.follow") {
			t.Errorf("a watcher goroutine is left:\n%s", g)
		}
	}
	r.w.Services([]string{"late"}) // after Run: recorded, nothing starts
	r.w.mu.Lock()
	running := len(r.w.cat.nodeWs)
	if r.w.cat.nodesW != nil || r.w.cat.checksW != nil {
		running++
	}
	r.w.mu.Unlock()
	if running != 0 {
		t.Errorf("%d watches run after Run returned", running)
	}
	if err := r.w.Run(context.Background()); err == nil {
		t.Error("a second Run: no error")
	}
}

func TestWatcherInvalidFilter(t *testing.T) {
	agent := testenv.StartConsul(t)
	c, _ := newClient(t, agent.Addr)
	w := NewWatcher(c, nil, "healthy", nil)
	if err := w.Run(context.Background()); err == nil {
		t.Fatal("Run with an invalid filter: no error")
	}
	if _, ok := <-w.Updates(); ok {
		t.Error("the updates channel is open after Run failed")
	}
}

// fakeHealth is a fake agent: a leader, an empty node list that never changes, and a checks
// endpoint (/v1/health/state/any) that answers with script, given the number of the request
// (from 0) and its index. It stands for Consul answering indexes that a real one rarely does
// (backwards, zero, unchanged).
type fakeHealth struct {
	mu       sync.Mutex
	requests []fakeRequest
}

type fakeRequest struct {
	at    time.Time
	index uint64
	wait  string
}

func (f *fakeHealth) start(t *testing.T, script func(r *http.Request, n int, index uint64) (uint64, bool)) string {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v1/status/leader" {
			_, _ = w.Write([]byte(`"127.0.0.1:8300"`))
			return
		}
		if r.URL.Path == "/v1/catalog/nodes" {
			if wait, err := time.ParseDuration(r.URL.Query().Get("wait")); err == nil {
				select { // nothing changes: the wait ends
				case <-time.After(wait):
				case <-r.Context().Done():
					return
				}
			}
			w.Header().Set("X-Consul-Index", "3")
			_, _ = w.Write([]byte(`[]`))
			return
		}
		if r.URL.Path != "/v1/health/state/any" {
			http.NotFound(w, r)
			return
		}
		index, _ := strconv.ParseUint(r.URL.Query().Get("index"), 10, 64)
		f.mu.Lock()
		n := len(f.requests)
		f.requests = append(f.requests, fakeRequest{at: time.Now(), index: index, wait: r.URL.Query().Get("wait")})
		f.mu.Unlock()
		answer, ok := script(r, n, index)
		if !ok {
			<-r.Context().Done() // blocks until the watcher lets go
			return
		}
		w.Header().Set("X-Consul-Index", strconv.FormatUint(answer, 10))
		_, _ = w.Write([]byte(`[]`))
	}))
	t.Cleanup(srv.Close)
	return srv.URL
}

func (f *fakeHealth) seen() []fakeRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.requests)
}

func TestWatcherIndex(t *testing.T) {
	t.Parallel()

	t.Run("backwards, zero and unchanged indexes", func(t *testing.T) {
		t.Parallel()
		var f fakeHealth
		// index asked -> index answered: 0 -> 100, 100 -> 5 (backwards: start over from 0), 0 -> 0
		// (a Consul bug: go on from 1), 1 -> 1 (unchanged), then block.
		answers := []uint64{100, 5, 0, 1}
		addr := f.start(t, func(_ *http.Request, n int, _ uint64) (uint64, bool) {
			if n < len(answers) {
				return answers[n], true
			}
			return 0, false
		})
		c, _ := newClient(t, addr)
		r := startWatcher(t, c, nil, HealthPassing, []string{"svc"}, nil)
		r.waitFor(t, 5*time.Second, "the first, empty state", instancesOf("svc"))
		deadline := time.Now().Add(5 * time.Second)
		for len(f.seen()) < 5 && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		r.expectNone(t, 300*time.Millisecond, "the same empty list, at every index")
		reqs := f.seen()
		var got []uint64
		for _, q := range reqs {
			got = append(got, q.index)
		}
		if want := []uint64{0, 100, 0, 1, 1}; !reflect.DeepEqual(got, want) {
			t.Fatalf("indexes asked = %v, want %v", got, want)
		}
		for i, q := range reqs {
			if (q.index > 0) != (q.wait != "") {
				t.Errorf("request %d: index %d with wait %q", i, q.index, q.wait)
			}
			// After an index that went backwards, was 0 or did not change: the minimum delay.
			if i >= 2 {
				if gap := q.at.Sub(reqs[i-1].at); gap < watchMinDelay*9/10 {
					t.Errorf("request %d came %s after the previous one, want >= %s", i, gap, watchMinDelay)
				}
			}
		}
	})

	t.Run("an index that never moves is no hot loop", func(t *testing.T) {
		t.Parallel()
		var f fakeHealth
		addr := f.start(t, func(*http.Request, int, uint64) (uint64, bool) { return 7, true })
		c, _ := newClient(t, addr)
		startWatcher(t, c, nil, HealthPassing, []string{"svc"}, nil)
		time.Sleep(time.Second)
		if n := len(f.seen()); n > int(time.Second/watchMinDelay)+2 {
			t.Errorf("%d queries in 1s, want at most one per %s", n, watchMinDelay)
		}
	})

	t.Run("a blocking query outlives the client's request timeout", func(t *testing.T) {
		t.Parallel()
		var f fakeHealth
		addr := f.start(t, func(r *http.Request, _ int, index uint64) (uint64, bool) {
			if index > 0 { // as Consul does when the wait ends without a change
				select {
				case <-time.After(400 * time.Millisecond):
				case <-r.Context().Done():
				}
			}
			return 10, true
		})
		c, _ := newClient(t, addr)
		c.timeout = 100 * time.Millisecond
		r := startWatcher(t, c, nil, HealthPassing, []string{"svc"}, func(w *Watcher) { w.timing.wait = 300 * time.Millisecond })
		r.waitFor(t, 5*time.Second, "the first, empty state", instancesOf("svc"))
		r.expectNone(t, 1500*time.Millisecond, "blocking queries longer than the request timeout")
		blocking := 0
		for _, q := range f.seen() {
			if q.index > 0 {
				blocking++
			}
		}
		if blocking < 2 {
			t.Errorf("%d blocking queries, want several", blocking)
		}
	})
}

func TestWatcherQueue(t *testing.T) {
	w := NewWatcher(&Client{}, nil, "", slog.New(slog.DiscardHandler))
	a, b, e := updateKey{kind: kindService, service: "a"}, updateKey{kind: kindService, service: "b"}, updateKey{kind: kindOutage}
	w.enqueueLocked(a, Update{Service: "a", Instances: []route.Instance{inst("10.0.0.1", 80)}})
	w.enqueueLocked(e, Update{Err: ErrUnavailable})
	w.enqueueLocked(b, Update{Service: "b", Instances: []route.Instance{}})
	w.enqueueLocked(a, Update{Service: "a", Instances: []route.Instance{}}) // replaces a's state and moves it last
	var got []string
	for {
		u, ok := w.next()
		if !ok {
			break
		}
		got = append(got, describe(u))
	}
	want := []string{describe(Update{Err: ErrUnavailable}), "{Service: b, Instances: []}", "{Service: a, Instances: []}"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("queue = %v, want %v", got, want)
	}
}
