package server

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	capi "github.com/hashicorp/consul/api"

	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
)

func TestNewInstanceIsServedWithoutAnyCall(t *testing.T) {
	// A watch per Consul node (the default for up to 64 nodes), or one watch of every node (as
	// for more nodes than NodeWatchLimit).
	for _, limit := range []int{0, -1} {
		t.Run(fmt.Sprintf("NodeWatchLimit=%d", limit), func(t *testing.T) { testNewInstanceIsServed(t, limit) })
	}
}

func testNewInstanceIsServed(t *testing.T, nodeWatchLimit int) {
	e := newEnv(t)
	for _, n := range []string{"books-1", "books-2", "books-3"} {
		e.backend("books-ms", n)
	}
	p := e.startProxyWith("docker-flow", func(c *Config) { c.NodeWatchLimit = nodeWatchLimit })
	p.reconfigure(t, booksQuery)
	if got := backendsReached(t, p.http+"/api/v1/books", 9); len(got) != 3 {
		t.Fatalf("reached %v, want three instances", got)
	}
	before := reloads(t, p)
	e.backend("books-ms", "books-4")
	eventually(t, 5*time.Second, "the fourth instance receives traffic with no API call", func() bool {
		return backendsReached(t, p.http+"/api/v1/books", 8)["books-4"] > 0
	})
	if r := reloads(t, p); r != before {
		t.Fatalf("adding an instance reloaded HAProxy %d times; the runtime API should have done it", r-before)
	}
	e.consul.DeregisterService("books-4")
	eventually(t, 5*time.Second, "the deregistered instance receives no more traffic", func() bool {
		return backendsReached(t, p.http+"/api/v1/books", 8)["books-4"] == 0
	})
	if r := reloads(t, p); r != before {
		t.Fatalf("removing an instance reloaded HAProxy %d times", r-before)
	}
}

func TestReplicasConvergeWithinASecond(t *testing.T) {
	e := newEnv(t)
	e.backend("books-ms", "books-1")
	first := e.startProxy("docker-flow")
	second := e.startProxy("docker-flow")
	first.reconfigure(t, booksQuery)
	start := time.Now()
	eventually(t, time.Second, "the second replica routes the path", func() bool {
		code, _, err := tryGet(httpClient, second.http+"/api/v1/books", nil)
		return err == nil && code == http.StatusOK
	})
	t.Logf("the second replica served the route %s after the reconfigure answered", time.Since(start).Round(time.Millisecond))

	code, r := second.call(t, "/v1/docker-flow-proxy/remove?serviceName=books-ms")
	if code != http.StatusOK {
		t.Fatalf("remove on the second: %d %+v", code, r)
	}
	eventually(t, time.Second, "the first replica stops routing the path", func() bool {
		code, _, err := tryGet(httpClient, first.http+"/api/v1/books", nil)
		return err == nil && code == http.StatusServiceUnavailable
	})
	if strings.Contains(first.config(t), "books-ms") {
		t.Fatal("the first replica's config still holds books-ms")
	}
}

// waitServers waits until the served config holds n server lines (bounded).
func (p *running) waitServers(t *testing.T, n int) {
	t.Helper()
	eventually(t, 10*time.Second, fmt.Sprintf("%d servers in the config", n), func() bool {
		return strings.Count(p.config(t), "    server ") == n
	})
}

func TestScalingUnderLoadLosesNoRequest(t *testing.T) {
	e := newEnv(t)
	e.backend("books-ms", "books-1")
	p := e.startProxy("docker-flow")
	p.reconfigure(t, booksQuery)
	// Four more instances, running all along; scaling registers and deregisters them.
	for i := 2; i <= 5; i++ {
		e.backend("books-ms", fmt.Sprintf("books-%d", i))
		e.consul.DeregisterService(fmt.Sprintf("books-%d", i))
	}
	p.waitServers(t, 1)

	stopLoad := loadInBackground(p.http+"/api/v1/books", 120*time.Second, 2_000_000)
	for round := 0; round < 10; round++ {
		for i := 2; i <= 5; i++ {
			port := e.portOf(fmt.Sprintf("books-%d", i))
			e.consul.RegisterService("books-ms", fmt.Sprintf("books-%d", i), "127.0.0.1", port)
		}
		p.waitServers(t, 5)
		for i := 2; i <= 5; i++ {
			e.consul.DeregisterService(fmt.Sprintf("books-%d", i))
		}
		p.waitServers(t, 1)
	}
	sent, failed, firstErr := stopLoad()
	if failed != 0 {
		t.Fatalf("%d of %d requests failed while scaling 1 to 5 to 1 ten times; first: %v", failed, sent, firstErr)
	}
	t.Logf("%d requests, none failed, while scaling 1 to 5 to 1 ten times", sent)
}

func TestConsulOutageUnderLoadLosesNoRequest(t *testing.T) {
	if testing.Short() {
		t.Skip("a 20 s outage")
	}
	e := newPersistentEnv(t)
	e.backend("books-ms", "books-1")
	p := e.startProxy("docker-flow")
	p.reconfigure(t, booksQuery)

	stopLoad := loadInBackground(p.http+"/api/v1/books", 120*time.Second, 5_000_000)
	e.consul.Stop()
	time.Sleep(2 * time.Second)
	code, body := get(t, p.api+"/v1/docker-flow-proxy/health", nil)
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "since") {
		t.Errorf("health during the outage: %d %s; want 503 saying since when", code, body)
	}
	time.Sleep(18 * time.Second)
	e.consul.Start()
	registered := time.Now()
	e.backend("books-ms", "books-2") // a new instance, registered once Consul is back
	// How long Consul itself takes to list it is logged apart from the proxy's part.
	api, err := capi.NewClient(&capi.Config{Address: e.consul.Addr})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "Consul's catalog lists the new instance", func() bool {
		entries, _, err := api.Health().Service("books-ms", "", true, nil)
		return err == nil && len(entries) == 2
	})
	listed := time.Now()
	eventually(t, 5*time.Second-time.Since(registered), "the new instance is served within 5 s of its registration", func() bool {
		return backendsReached(t, p.http+"/api/v1/books", 6)["books-2"] > 0
	})
	t.Logf("Consul listed the new instance %s after its registration; the proxy served it %s later",
		listed.Sub(registered).Round(time.Millisecond), time.Since(listed).Round(time.Millisecond))
	sent, failed, firstErr := stopLoad()
	if failed != 0 {
		t.Fatalf("%d of %d requests failed during a 20 s Consul outage; first: %v", failed, sent, firstErr)
	}
}

// newLeaderFront stands between the proxy and a real Consul agent and plays what a Consul server
// does right after it wins an election on restart: it holds only its last snapshot, and replays its
// log only once it has committed an entry as leader, but it already answers reads of the default
// consistency mode, from that state. A real Consul shows this for a few milliseconds, by chance
// (the watch's or the convergence's first read must land in that window; under load it did, once
// in a few runs); the front makes the window seconds long, every run. Down, it answers every
// request 502 and ends those in flight. Not restored, it answers each read that neither blocks
// (no index) nor asks for consistency with what an empty Consul agent, real too, answers to it, at
// index 1; blocking and consistent reads and writes reach the real agent, as they would: a blocking
// query waits for an index above the one it holds, and a consistent read waits until the leader has
// replayed its log. Partial, it is not restored and answers every read of the node list 502.
type leaderFront struct {
	*httptest.Server
	mu     sync.Mutex
	mode   string // "up", "down", "unrestored", or "partial": unrestored, and the node list down
	cancel context.CancelFunc
	ctx    context.Context
}

func newLeaderFront(t *testing.T, real, empty *testenv.Consul) *leaderFront {
	t.Helper()
	to := func(c *testenv.Consul) *httputil.ReverseProxy {
		u, err := url.Parse("http://" + c.Addr)
		if err != nil {
			t.Fatal(err)
		}
		return httputil.NewSingleHostReverseProxy(u)
	}
	realProxy, emptyProxy := to(real), to(empty)
	f := &leaderFront{mode: "up"}
	f.ctx, f.cancel = context.WithCancel(context.Background())
	f.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		mode, ctx := f.mode, f.ctx
		f.mu.Unlock()
		q := r.URL.Query()
		switch {
		case mode == "down", mode == "partial" && r.URL.Path == "/v1/catalog/nodes":
			http.Error(w, "consul is down", http.StatusBadGateway)
		case (mode == "unrestored" || mode == "partial") && r.Method == http.MethodGet && !q.Has("index") && !q.Has("consistent") &&
			r.URL.Path != "/v1/status/leader":
			rec := httptest.NewRecorder()
			emptyProxy.ServeHTTP(rec, r)
			for k, v := range rec.Header() {
				w.Header()[k] = v
			}
			w.Header().Set("X-Consul-Index", "1")
			w.WriteHeader(rec.Code)
			_, _ = w.Write(rec.Body.Bytes())
		default:
			// A request in flight ends when the front goes down, as its connection would.
			realProxy.ServeHTTP(w, r.WithContext(mergeCancel(r.Context(), ctx)))
		}
	}))
	t.Cleanup(f.Close)
	t.Cleanup(func() { f.cancel() })
	return f
}

// mergeCancel is parent, ended also when other ends.
func mergeCancel(parent, other context.Context) context.Context {
	ctx, cancel := context.WithCancel(parent)
	context.AfterFunc(other, cancel)
	return ctx
}

func (f *leaderFront) set(mode string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.mode = mode
	if mode == "down" {
		f.cancel()
		f.ctx, f.cancel = context.WithCancel(context.Background())
	}
}

// A Consul server that has just come back (an outage, a restart) answers, for a moment, reads of
// its default consistency mode from a state it has not restored yet: no node, no service, no key.
// The proxy reads from scratch after an outage, and reads what it converges to: if it took that
// state, it would drop every instance (503) and every route (404) until the next read. Reads from
// scratch ask for a consistent answer, which Consul gives only once it is restored.
func TestConsulNotYetRestoredDropsNoRouteNorInstance(t *testing.T) {
	if testing.Short() {
		t.Skip("an outage of seconds")
	}
	e := newEnv(t)
	empty := testenv.StartConsul(t)
	front := newLeaderFront(t, e.consul, empty)
	e.backend("books-ms", "books-1")
	logs := &testenv.LogBuffer{}
	p := e.startProxyWith("docker-flow", func(c *Config) {
		c.ConsulAddresses = []string{strings.TrimPrefix(front.URL, "http://")}
		c.Logger = slog.New(slog.NewTextHandler(io.MultiWriter(os.Stderr, logs), &slog.HandlerOptions{Level: slog.LevelInfo}))
	})
	p.reconfigure(t, booksQuery)

	stopLoad := loadInBackground(p.http+"/api/v1/books", 60*time.Second, 2_000_000)
	front.set("down")
	eventually(t, 10*time.Second, "the health endpoint reports the outage", func() bool {
		code, _ := get(t, p.api+"/v1/docker-flow-proxy/health", nil)
		return code == http.StatusServiceUnavailable
	})
	// The watches of KV, the checks and the node's services read again; the one of the node list
	// still fails: the outage goes on.
	front.set("partial")
	// Consul answers a ping again, but the proxy does not follow all of it yet: the health
	// endpoint says so, naming the read that still fails.
	var health string
	defer func() {
		if t.Failed() {
			t.Logf("health endpoint's last answer: %s", health)
		}
	}()
	eventually(t, 10*time.Second, "the health endpoint reports a failing watch of a reachable Consul", func() bool {
		code, body := get(t, p.api+"/v1/docker-flow-proxy/health", nil)
		health = fmt.Sprintf("%d %s", code, body)
		return code == http.StatusServiceUnavailable && strings.Contains(body, `"Consul":"reachable, but a watch of it fails since`) &&
			strings.Contains(body, "/v1/catalog/nodes")
	})
	t.Logf("health while a watch fails: %s", health)
	time.Sleep(1500 * time.Millisecond)
	front.set("unrestored")
	eventually(t, 15*time.Second, "the health endpoint reports Consul back", func() bool {
		code, _ := get(t, p.api+"/v1/docker-flow-proxy/health", nil)
		return code == http.StatusOK
	})
	eventually(t, 15*time.Second, "every watch reads Consul again and the proxy converges", func() bool {
		return strings.Contains(logs.String(), "converging to its state")
	})
	time.Sleep(time.Second) // the convergence's reads, from the state not restored, are done
	front.set("up")
	time.Sleep(time.Second)
	sent, failed, firstErr := stopLoad()
	if sent == 0 {
		t.Fatal("no request was sent")
	}
	if failed != 0 {
		t.Fatalf("%d of %d requests failed while Consul came back without its state restored; first: %v", failed, sent, firstErr)
	}
	if got := backendsReached(t, p.http+"/api/v1/books", 3); got["books-1"] != 3 {
		t.Fatalf("after the outage, reached %v; want books-1 every time", got)
	}
	// The proxy converged to Consul's state once, when every watch read it again, not as soon as
	// the first one did and again at the end.
	if n := strings.Count(logs.String(), "converging to its state"); n != 1 {
		t.Errorf("the proxy converged %d times after one outage, want once", n)
	}
	t.Logf("%d requests, none failed", sent)
}
