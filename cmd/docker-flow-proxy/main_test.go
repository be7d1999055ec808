package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	capi "github.com/hashicorp/consul/api"

	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
)

// The server command configured through environment variables only, driven by the client commands.
func TestServerFromEnvAndClientCommands(t *testing.T) {
	c := testenv.StartConsul(t)
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "books") }))
	defer backend.Close()
	port, _ := strconv.Atoi(backend.URL[strings.LastIndex(backend.URL, ":")+1:])
	c.RegisterService("books-ms", "books-1", "127.0.0.1", port)

	apiAddr, httpAddr := startServerFromEnv(t, map[string]string{
		"CONSUL_ADDRESS":      "127.0.0.1:1," + c.Addr, // the first agent is down: the next one is used
		"PROXY_INSTANCE_NAME": "env-proxy",
	})
	httpPort, _ := strconv.Atoi(httpAddr[strings.LastIndex(httpAddr, ":")+1:])

	out, err := runClient("reconfigure", "--proxy-address", apiAddr, "--service-name", "books-ms", "--service-path", "/api/v1/books")
	if err != nil || !strings.Contains(out, `"Status":"OK"`) {
		t.Fatalf("reconfigure command: %v, printed %q", err, out)
	}
	if body := fetch(t, "http://127.0.0.1:"+strconv.Itoa(httpPort)+"/api/v1/books"); body != "books" {
		t.Fatalf("through the proxy: %q", body)
	}
	kv, _ := capi.NewClient(&capi.Config{Address: c.Addr})
	if p, _, err := kv.KV().Get("env-proxy/books-ms/path", nil); err != nil || p == nil || string(p.Value) != "/api/v1/books" {
		t.Fatalf("KV under PROXY_INSTANCE_NAME: %v %v", p, err)
	}

	out, err = runClient("reconfigure", "--proxy-address", apiAddr, "--service-name", "books-ms", "--service-path", "/a b")
	if err == nil || !strings.Contains(err.Error(), "servicePath") || !strings.Contains(out, "NOK") {
		t.Fatalf("a bad path: err %v, printed %q; want a failure naming servicePath", err, out)
	}

	if out, err := runClient("remove", "--proxy-address", apiAddr, "--service-name", "books-ms"); err != nil {
		t.Fatalf("remove command: %v, printed %q", err, out)
	}
	resp, err := freshClient.Get("http://127.0.0.1:" + strconv.Itoa(httpPort) + "/api/v1/books")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("after the remove command the path answers %d", resp.StatusCode)
	}
}

// startServerFromEnv runs the server command with the given environment variables added to those
// every test needs, and returns its API and HTTP addresses once its API answers.
func startServerFromEnv(t *testing.T, env map[string]string) (apiAddr, httpAddr string) {
	t.Helper()
	ports := testenv.FreePorts(t, 3)
	httpPort, apiPort := ports[0], ports[1]
	base := map[string]string{
		"BIND_ADDRESS": "127.0.0.1",
		"HTTP_PORT":    strconv.Itoa(httpPort), "HTTPS_PORT": strconv.Itoa(ports[2]),
		"API_PORT": strconv.Itoa(apiPort), "CONFIG_DIR": t.TempDir(), "CERTS_DIR": t.TempDir(),
		"TEMPLATES_DIR": t.TempDir(), "HAPROXY_BIN": testenv.HAProxyBin(t), "LOG_LEVEL": "warn",
	}
	for k, v := range env {
		base[k] = v
	}
	for k, v := range base {
		t.Setenv(k, v)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- newApp().RunContext(ctx, []string{"docker-flow-proxy", "server"}) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("server command: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Error("server command did not stop within 30 s")
		}
	})
	apiAddr = "http://127.0.0.1:" + strconv.Itoa(apiPort)
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get(apiAddr + "/v1/test")
		if err == nil {
			resp.Body.Close()
			break
		}
		select {
		case err := <-done:
			t.Fatalf("the server command ended: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("the server's API did not answer within 30 s: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	return apiAddr, "http://127.0.0.1:" + strconv.Itoa(httpPort)
}

// DFP_SERVICE_* variables define routes at start: one with its instances listed (a service Consul
// does not know), one whose instances come from the catalog. They are served, not written to KV,
// and the API may not change them.
func TestServicesFromEnvAreServed(t *testing.T) {
	c := testenv.StartConsul(t)
	legacy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "legacy "+r.URL.Path) }))
	defer legacy.Close()
	books := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "books "+r.URL.Path) }))
	defer books.Close()
	booksPort, _ := strconv.Atoi(books.URL[strings.LastIndex(books.URL, ":")+1:])
	c.RegisterService("books-ms", "books-1", "127.0.0.1", booksPort)

	apiAddr, httpAddr := startServerFromEnv(t, map[string]string{
		"CONSUL_ADDRESS":                         c.Addr,
		"DFP_SERVICE_SERVICE_NAME":               "legacy",
		"DFP_SERVICE_SERVICE_PATH":               "/old",
		"DFP_SERVICE_REQ_PATH_SEARCH":            "^/old/",
		"DFP_SERVICE_REQ_PATH_REPLACE":           "/",
		"DFP_SERVICE_INSTANCES":                  strings.TrimPrefix(legacy.URL, "http://"),
		"DFP_SERVICE_1_SERVICE_NAME":             "books-ms",
		"DFP_SERVICE_1_SERVICE_PATH":             "/api/v1/books",
		"DFP_SERVICE_1_SERVICE_DOMAIN":           "books.example.com",
		"DFP_SERVICE_1_SERVICE_DOMAIN_MATCH_ALL": "true",
	})
	if body := fetch(t, httpAddr+"/old/page"); body != "legacy /page" {
		t.Errorf("the env service with listed instances: %q", body)
	}
	req, _ := http.NewRequest(http.MethodGet, httpAddr+"/api/v1/books", nil)
	req.Host = "www.books.example.com"
	resp, err := freshClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || string(b) != "books /api/v1/books" {
		t.Errorf("the env service with catalog instances: %d %q", resp.StatusCode, b)
	}
	kv, _ := capi.NewClient(&capi.Config{Address: c.Addr})
	if pairs, _, err := kv.KV().List("docker-flow/", nil); err != nil || len(pairs) != 0 {
		t.Errorf("env services were written to KV: %v %v", pairs, err)
	}
	for _, path := range []string{
		"/v1/docker-flow-proxy/reconfigure?serviceName=legacy&servicePath=/x",
		"/v1/docker-flow-proxy/remove?serviceName=books-ms",
	} {
		resp, err := freshClient.Get(apiAddr + path)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(b), "environment variables") {
			t.Errorf("%s: %d %s, want 400 saying the service is defined by environment variables", path, resp.StatusCode, b)
		}
	}
	if body := fetch(t, httpAddr+"/old/page"); body != "legacy /page" {
		t.Errorf("after the refused requests: %q", body)
	}
}

func TestClientReportsAnUnreachableProxy(t *testing.T) {
	addr := "http://127.0.0.1:" + strconv.Itoa(testenv.FreePort(t))
	if _, err := runClient("remove", "--proxy-address", addr, "--service-name", "x", "--timeout", "5s"); err == nil {
		t.Fatal("remove against no proxy succeeded")
	}
}

// freshClient opens a new connection per request, as curl does.
var freshClient = &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

func runClient(args ...string) (string, error) {
	var out bytes.Buffer
	app := newApp()
	app.Writer = &out
	app.ErrWriter = io.Discard
	err := app.Run(append([]string{"docker-flow-proxy"}, args...))
	return out.String(), err
}

func fetch(t *testing.T, url string) string {
	t.Helper()
	resp, err := freshClient.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}
