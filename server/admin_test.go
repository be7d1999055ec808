package server

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	capi "github.com/hashicorp/consul/api"

	"github.com/docker-flow-proxy/docker-flow-proxy/haproxy"
	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
)

func TestReloadRecreateRebuildsFromKVAndTheCatalog(t *testing.T) {
	e := newEnv(t)
	e.backend("books-ms", "books-1")
	p := e.startProxy("docker-flow")
	p.reconfigure(t, booksQuery)

	// Meanwhile, Consul changed behind the server's back: a route written by hand, a new instance.
	e.backend("other", "other-1")
	e.backend("books-ms", "books-2")
	if _, err := e.kv.Put(&capi.KVPair{Key: "docker-flow/other/path", Value: []byte("/other")}, nil); err != nil {
		t.Fatal(err)
	}
	code, r := p.call(t, "/v1/docker-flow-proxy/reload?recreate=true")
	if code != http.StatusOK || r.Status != "OK" {
		t.Fatalf("reload: %d %+v", code, r)
	}
	if code, body := get(t, p.http+"/other", nil); code != http.StatusOK || !strings.HasPrefix(body, "other-1") {
		t.Fatalf("the route written to KV is not served after reload: %d %q", code, body)
	}
	if got := backendsReached(t, p.http+"/api/v1/books", 10); len(got) != 2 {
		t.Fatalf("after reload books-ms reached %v, want both instances", got)
	}
	before := reloads(t, p)
	if code, r := p.call(t, "/v1/docker-flow-proxy/reload"); code != http.StatusOK || reloads(t, p) != before+1 {
		t.Fatalf("reload without recreate: %d %+v, %d reloads; want one", code, r, reloads(t, p)-before)
	}
	if code, r := p.call(t, "/v1/docker-flow-proxy/reload?recreate=maybe"); code != http.StatusBadRequest || !strings.Contains(r.Message, "recreate") {
		t.Fatalf("reload?recreate=maybe: %d %+v", code, r)
	}
}

func TestStatsPageAndPrometheusExporterNeedCredentials(t *testing.T) {
	e := newEnv(t)
	statsPort := testenv.FreePort(t)
	e.startProxyWith("docker-flow", func(c *Config) {
		c.StatsPort, c.StatsUser, c.StatsPass = statsPort, "admin", "stats-secret"
	})
	base := "http://127.0.0.1:" + strconv.Itoa(statsPort)
	get := func(path, user, pass string) (int, string) {
		req, _ := http.NewRequest(http.MethodGet, base+path, nil)
		if user != "" {
			req.SetBasicAuth(user, pass)
		}
		resp, err := httpClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var b strings.Builder
		buf := make([]byte, 64*1024)
		n, _ := resp.Body.Read(buf)
		b.Write(buf[:n])
		return resp.StatusCode, b.String()
	}
	if code, _ := get("/", "", ""); code != http.StatusUnauthorized {
		t.Fatalf("stats page without credentials: %d, want 401", code)
	}
	if code, _ := get("/metrics", "admin", "wrong"); code != http.StatusUnauthorized {
		t.Fatalf("exporter with a wrong password: %d, want 401", code)
	}
	if code, body := get("/", "admin", "stats-secret"); code != http.StatusOK || !strings.Contains(body, "Statistics Report") {
		t.Fatalf("stats page: %d %.200q", code, body)
	}
	if code, body := get("/metrics", "admin", "stats-secret"); code != http.StatusOK || !strings.Contains(body, "haproxy_") {
		t.Fatalf("exporter: %d %.200q", code, body)
	}
}

func TestStatsPortWithoutPasswordIsRefused(t *testing.T) {
	e := newEnv(t)
	err := e.startError(func(c *Config) { c.StatsPort, c.StatsUser = testenv.FreePort(t), "admin" })
	if err == nil || !strings.Contains(err.Error(), "password") {
		t.Fatalf("a stats port without a password: %v, want a refusal", err)
	}
}

// HAProxy runs the threads asked for (HAPROXY_THREADS), and serves with them; a number HAProxy
// cannot run is refused at start.
func TestHAProxyThreads(t *testing.T) {
	e := newEnv(t)
	e.backend("books-ms", "books-1")
	// Not HAProxy's default (a thread per CPU), so that the setting shows.
	threads := runtime.NumCPU()%haproxy.MaxThreads + 1
	p := e.startProxyWith("docker-flow", func(c *Config) { c.HAProxyThreads = threads })
	p.reconfigure(t, booksQuery)
	if code, body := get(t, p.http+"/api/v1/books", nil); code != http.StatusOK || !strings.HasPrefix(body, "books-1") {
		t.Fatalf("through HAProxy: %d %q", code, body)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	info, err := p.HAProxy().ShowProc(ctx)
	if err != nil || len(info.Workers) == 0 {
		t.Fatalf("show proc: %+v %v", info, err)
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", info.Workers[0]))
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("\nThreads:\t%d\n", threads); !strings.Contains(string(status), want) {
		t.Fatalf("HAProxy's worker does not run %d threads:\n%s", threads, status)
	}

	err = e.startError(func(c *Config) { c.HAProxyThreads = haproxy.MaxThreads + 1 })
	if err == nil || !strings.Contains(err.Error(), "haproxy threads") {
		t.Fatalf("%d threads: %v, want a refusal naming the threads", haproxy.MaxThreads+1, err)
	}
}

// HAProxy checks the instances at the interval asked for (CHECK_INTERVAL): the config says so; an
// interval HAProxy cannot use well is refused at start.
func TestCheckInterval(t *testing.T) {
	e := newEnv(t)
	e.backend("books-ms", "books-1")
	p := e.startProxyWith("docker-flow", func(c *Config) { c.CheckInterval = 30 * time.Second })
	p.reconfigure(t, booksQuery)
	if code, body := get(t, p.http+"/api/v1/books", nil); code != http.StatusOK || !strings.HasPrefix(body, "books-1") {
		t.Fatalf("through HAProxy: %d %q", code, body)
	}
	if cfg := string(p.HAProxy().Config()); !regexp.MustCompile(`(?m)^    server \S+ \S+ check inter 30s$`).MatchString(cfg) {
		t.Fatalf("no server is checked every 30 s:\n%s", cfg)
	}
	for _, d := range []time.Duration{-time.Second, 10 * time.Millisecond, 2 * time.Hour} {
		err := e.startError(func(c *Config) { c.CheckInterval = d })
		if err == nil || !strings.Contains(err.Error(), "check interval") {
			t.Fatalf("check interval %s: %v, want a refusal naming the check interval", d, err)
		}
	}
}

// startError starts a server with a config that edit spoils, and returns the error Start gives.
func (e *env) startError(edit func(*Config)) error {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cfg := Config{ConsulAddresses: []string{e.consul.Addr}, BindAddress: "127.0.0.1",
		HTTPPort: testenv.FreePort(e.t), APIPort: testenv.FreePort(e.t), ConfigDir: e.t.TempDir(),
		HAProxyBin: testenv.HAProxyBin(e.t),
		Logger:     slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))}
	edit(&cfg)
	s, err := Start(ctx, cfg)
	if err == nil {
		_ = s.Stop(ctx)
	}
	return err
}
