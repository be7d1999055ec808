package server

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	capi "github.com/hashicorp/consul/api"

	"github.com/docker-flow-proxy/docker-flow-proxy/api"
	"github.com/docker-flow-proxy/docker-flow-proxy/consul"
	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
)

// env is one test's world: a real Consul agent, and servers of docker-flow-proxy in front of it.
type env struct {
	t      *testing.T
	consul *testenv.Consul
	kv     *capi.KV
	ports  map[string]int // backend name -> port
}

func newEnv(t *testing.T) *env {
	t.Helper()
	testenv.HAProxyBin(t)
	c := testenv.StartConsul(t)
	client, err := capi.NewClient(&capi.Config{Address: c.Addr})
	if err != nil {
		t.Fatal(err)
	}
	return &env{t: t, consul: c, kv: client.KV(), ports: map[string]int{}}
}

// newPersistentEnv is newEnv with a Consul server that keeps its data across Stop and Start.
func newPersistentEnv(t *testing.T) *env {
	t.Helper()
	testenv.HAProxyBin(t)
	c := testenv.StartConsulServer(t)
	client, err := capi.NewClient(&capi.Config{Address: c.Addr})
	if err != nil {
		t.Fatal(err)
	}
	return &env{t: t, consul: c, kv: client.KV(), ports: map[string]int{}}
}

// portOf is the port of a backend started by e.backend.
func (e *env) portOf(name string) int {
	e.t.Helper()
	p, ok := e.ports[name]
	if !ok {
		e.t.Fatalf("no backend %s", name)
	}
	return p
}

// running is a server and the addresses to reach it.
type running struct {
	*Server
	api  string // http://127.0.0.1:port
	http string // http://127.0.0.1:port
	dir  string
}

// startProxy starts a server on empty folders and free ports, stopped when the test ends.
func (e *env) startProxy(instanceName string) *running {
	e.t.Helper()
	return e.startProxyWith(instanceName, nil)
}

// startProxyWith starts a server like startProxy, with its config changed by edit first.
func (e *env) startProxyWith(instanceName string, edit func(*Config)) *running {
	e.t.Helper()
	dir, err := os.MkdirTemp("", "dfp")
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { os.RemoveAll(dir) })
	ports := testenv.FreePorts(e.t, 3)
	httpPort := ports[0]
	level := slog.LevelWarn
	if testing.Verbose() {
		level = slog.LevelInfo
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cfg := Config{
		ConsulAddresses: []string{e.consul.Addr},
		InstanceName:    instanceName,
		BindAddress:     "127.0.0.1",
		HTTPPort:        httpPort,
		HTTPSPort:       ports[1],
		APIPort:         ports[2],
		ConfigDir:       dir,
		Health:          consul.HealthPassing,
		HAProxyBin:      testenv.HAProxyBin(e.t),
		StartupTimeout:  10 * time.Second,
		Logger:          slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})),
	}
	if edit != nil {
		edit(&cfg)
	}
	s, err := Start(ctx, cfg)
	if err != nil {
		e.t.Fatalf("start server: %v", err)
	}
	e.t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := s.Stop(ctx); err != nil {
			e.t.Errorf("stop server: %v", err)
		}
	})
	return &running{Server: s, api: "http://" + s.APIAddr(), http: "http://127.0.0.1:" + strconv.Itoa(httpPort), dir: dir}
}

// backend starts an HTTP server on 127.0.0.1 that answers with its name, and registers it in
// Consul as an instance of service.
func (e *env) backend(service, name string) *httptest.Server {
	e.t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Backend", name)
		fmt.Fprintf(w, "%s %s", name, r.URL.Path)
	}))
	e.t.Cleanup(srv.Close)
	port, _ := strconv.Atoi(srv.URL[strings.LastIndex(srv.URL, ":")+1:])
	e.ports[name] = port
	e.consul.RegisterService(service, name, "127.0.0.1", port)
	return srv
}

// call sends a GET to the API and decodes the original's JSON answer.
func (p *running) call(t *testing.T, path string) (int, api.Response) {
	t.Helper()
	code, body := get(t, p.api+path, nil)
	var r api.Response
	if err := json.Unmarshal([]byte(body), &r); err != nil {
		t.Fatalf("GET %s: %d, answer is not JSON: %q", path, code, body)
	}
	return code, r
}

func (p *running) reconfigure(t *testing.T, query string) api.Response {
	t.Helper()
	code, r := p.call(t, "/v1/docker-flow-proxy/reconfigure?"+query)
	if code != http.StatusOK || r.Status != api.StatusOK {
		t.Fatalf("reconfigure %s: %d %+v", query, code, r)
	}
	return r
}

func (p *running) config(t *testing.T) string {
	t.Helper()
	code, body := get(t, p.api+"/v1/docker-flow-proxy/config", nil)
	if code != http.StatusOK {
		t.Fatalf("config: %d", code)
	}
	return body
}

// httpClient opens a new connection per request, as curl does: after a reload, a kept-alive
// connection to the old worker may carry one more request under the old config.
var httpClient = &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

// get returns the status and body of a GET; a transport error fails the test.
func get(t *testing.T, url string, header http.Header) (int, string) {
	t.Helper()
	code, body, err := tryGet(httpClient, url, header)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	return code, body
}

func tryGet(c *http.Client, url string, header http.Header) (int, string, error) {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return 0, "", err
	}
	for k, v := range header {
		req.Header[k] = v
	}
	if h := header.Get("Host"); h != "" {
		req.Host = h
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// backendsReached sends n requests and counts the answers per backend name.
func backendsReached(t *testing.T, url string, n int) map[string]int {
	t.Helper()
	seen := map[string]int{}
	for i := 0; i < n; i++ {
		code, body := get(t, url, nil)
		if code != http.StatusOK {
			t.Fatalf("GET %s: %d %q", url, code, body)
		}
		seen[strings.Fields(body)[0]]++
	}
	return seen
}

// eventually retries cond every 100 ms until it holds or the timeout passes.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s", what, timeout)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// kvTree returns every key and value under a prefix.
func (e *env) kvTree(prefix string) map[string]string {
	e.t.Helper()
	pairs, _, err := e.kv.List(prefix, nil)
	if err != nil {
		e.t.Fatalf("kv list %s: %v", prefix, err)
	}
	out := map[string]string{}
	for _, p := range pairs {
		out[p.Key] = string(p.Value)
	}
	return out
}

func (e *env) kvGet(key string) (string, bool) {
	e.t.Helper()
	p, _, err := e.kv.Get(key, nil)
	if err != nil {
		e.t.Fatalf("kv get %s: %v", key, err)
	}
	if p == nil {
		return "", false
	}
	return string(p.Value), true
}
