package consul

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

func newClient(t *testing.T, addresses ...string) (*Client, *testenv.LogBuffer) {
	t.Helper()
	logs := &testenv.LogBuffer{}
	c, err := New(addresses, slog.New(slog.NewTextHandler(logs, nil)))
	if err != nil {
		t.Fatalf("New(%q): %v", addresses, err)
	}
	return c, logs
}

func testContext(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func deadAddr(t *testing.T) string {
	return "127.0.0.1:" + strconv.Itoa(testenv.FreePort(t))
}

func TestNewRejectsBadAddresses(t *testing.T) {
	for _, addrs := range [][]string{nil, {""}, {" ", ""}, {"ftp://127.0.0.1:8500"}, {"http://"}} {
		if _, err := New(addrs, nil); err == nil || errors.Is(err, ErrUnavailable) {
			t.Errorf("New(%q) = %v, want an address error", addrs, err)
		}
	}
}

func TestNewWithOnlyDeadAgentsIsUnavailable(t *testing.T) {
	a, b := deadAddr(t), "http://"+deadAddr(t)
	_, err := New([]string{a, b}, nil)
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("New with dead agents: %v, want ErrUnavailable", err)
	}
	for _, addr := range []string{a, b} {
		if !strings.Contains(err.Error(), addr) {
			t.Errorf("error %q does not name agent %s", err, addr)
		}
	}
}

func TestFailover(t *testing.T) {
	t.Parallel()
	agent := testenv.StartConsul(t)
	ctx := testContext(t)

	dead := deadAddr(t)
	c, logs := newClient(t, dead, agent.Addr)
	if !strings.Contains(logs.String(), dead) {
		t.Errorf("the failed agent is not logged:\n%s", logs)
	}
	agent.RegisterService("go-demo", "go-demo-1", "10.0.0.1", 8080)
	waitInstances(t, c, "go-demo", HealthAny, 1)
	// The client stays on the agent that answered: the dead one is not tried again.
	before := logs.String()
	if _, err := c.Instances(ctx, "go-demo", HealthPassing); err != nil {
		t.Fatal(err)
	}
	if logs.String() != before {
		t.Errorf("a call after the failover logged again:\n%s", strings.TrimPrefix(logs.String(), before))
	}
	if leader, err := c.API().Status().Leader(); err != nil || leader == "" {
		t.Errorf("API() leader = %q, %v; want the live agent's leader", leader, err)
	}

	s := NewStore(c, "")
	books := route.Route{ServiceName: "books", ServicePath: []string{"/books"}, PathType: route.PathBeg}
	if err := s.Put(ctx, books); err != nil {
		t.Fatal(err)
	}

	agent.Stop()
	if _, err := c.Instances(ctx, "go-demo", HealthPassing); !errors.Is(err, ErrUnavailable) {
		t.Errorf("Instances with Consul stopped: %v, want ErrUnavailable", err)
	}
	if _, _, err := s.List(ctx); !errors.Is(err, ErrUnavailable) {
		t.Errorf("List with Consul stopped: %v, want ErrUnavailable", err)
	}
	if _, _, err := s.Get(ctx, "books"); !errors.Is(err, ErrUnavailable) {
		t.Errorf("Get with Consul stopped: %v, want ErrUnavailable", err)
	}
	if err := s.Put(ctx, books); !errors.Is(err, ErrUnavailable) {
		t.Errorf("Put with Consul stopped: %v, want ErrUnavailable", err)
	} else if !strings.Contains(err.Error(), dead) || !strings.Contains(err.Error(), agent.Addr) {
		t.Errorf("error %q does not name both agents", err)
	}
	if err := s.Delete(ctx, "books"); !errors.Is(err, ErrUnavailable) {
		t.Errorf("Delete with Consul stopped: %v, want ErrUnavailable", err)
	}
	if err := c.Ping(ctx); !errors.Is(err, ErrUnavailable) {
		t.Errorf("Ping with Consul stopped: %v, want ErrUnavailable", err)
	}

	// The same client works again once Consul is back (a dev agent comes back empty).
	agent.Start()
	if err := c.Ping(ctx); err != nil {
		t.Fatalf("Ping after Consul restarted: %v", err)
	}
	if err := s.Put(ctx, books); err != nil {
		t.Fatalf("Put after Consul restarted: %v", err)
	}
}

// fakeAgent answers every request with status and body.
func fakeAgent(t *testing.T, status int, body string) (addr string, hits func() int) {
	t.Helper()
	var mu sync.Mutex
	n := 0
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		n++
		mu.Unlock()
		w.WriteHeader(status)
		_, _ = w.Write([]byte(body))
	}))
	t.Cleanup(srv.Close)
	return srv.URL, func() int { mu.Lock(); defer mu.Unlock(); return n }
}

func TestServerErrorFailsOverAndClientErrorDoesNot(t *testing.T) {
	t.Parallel()
	agent := testenv.StartConsul(t)
	ctx := testContext(t)

	broken, brokenHits := fakeAgent(t, http.StatusInternalServerError, "No cluster leader")
	c, logs := newClient(t, broken, agent.Addr)
	if brokenHits() == 0 || !strings.Contains(logs.String(), "No cluster leader") {
		t.Errorf("the agent answering 500 was not tried and logged:\n%s", logs)
	}
	s := NewStore(c, "")
	r := route.Route{ServiceName: "books", ServicePath: []string{"/books"}, PathType: route.PathBeg}
	if err := s.Put(ctx, r); err != nil {
		t.Fatalf("Put after failing over from a 500: %v", err)
	}
	if got, ok, err := s.Get(ctx, "books"); err != nil || !ok || !got.Equal(r) {
		t.Fatalf("Get = %+v, %v, %v", got, ok, err)
	}

	denied, _ := fakeAgent(t, http.StatusForbidden, "Permission denied")
	_, err := New([]string{denied, agent.Addr}, nil)
	if err == nil || errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "403") {
		t.Fatalf("New with an agent answering 403 first: %v, want the 403 as is", err)
	}
}

func TestIsLoopback(t *testing.T) {
	for addr, want := range map[string]bool{
		"127.0.0.1:8500": true, "http://127.0.0.2:8500": true, "https://localhost:8501": true,
		"[::1]:8500": true, "http://[::1]:8500": true, "localhost:8500": true,
		"10.100.199.200:8500": false, "http://consul:8500": false, "https://[2001:db8::1]:8501": false,
	} {
		if got := isLoopback(addr); got != want {
			t.Errorf("isLoopback(%q) = %v, want %v", addr, got, want)
		}
	}
}

// An agent on this host is read without gzip: Consul compresses every answer a client accepts
// compressed, CPU spent on both sides for nothing over loopback. Consul cannot show which headers
// a client sent, so a pass-through proxy on 127.0.0.1 in front of the real agent records them.
func TestLoopbackAgentIsReadUncompressed(t *testing.T) {
	t.Parallel()
	agent := testenv.StartConsul(t)
	ctx := testContext(t)
	target, err := url.Parse("http://" + agent.Addr)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var encodings []string
	rp := httputil.NewSingleHostReverseProxy(target)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		encodings = append(encodings, r.URL.Path+": "+r.Header.Get("Accept-Encoding"))
		mu.Unlock()
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)

	c, _ := newClient(t, srv.URL)
	s := NewStore(c, "")
	r := route.Route{ServiceName: "books", ServicePath: []string{"/books"}, PathType: route.PathBeg}
	if err := s.Put(ctx, r); err != nil {
		t.Fatalf("Put: %v", err)
	}
	tbl, err := s.Table(ctx)
	if err != nil || len(tbl.Routes) != 1 || !tbl.Routes[0].Equal(r) {
		t.Fatalf("Table = %+v, %v; want the route put", tbl.Routes, err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(encodings) < 3 {
		t.Fatalf("the proxy saw %d requests, want the ping, the put and the read: %q", len(encodings), encodings)
	}
	for _, e := range encodings {
		if strings.Contains(e, "gzip") {
			t.Errorf("a request to an agent on 127.0.0.1 accepts gzip: %s", e)
		}
	}
}
