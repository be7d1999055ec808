// Package bench measures docker-flow-proxy against the real Consul and HAProxy on 127.0.0.1.
// Nothing here runs in the test command except a smoke run; see README.md for the figures and
// the commands that produced them.
package bench

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/consul"
	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
	"github.com/docker-flow-proxy/docker-flow-proxy/route"
	"github.com/docker-flow-proxy/docker-flow-proxy/server"
)

// BenchmarkCatalogChangeToTraffic registers a new instance of a routed service in Consul, with no
// API call, and measures the delay until a request through the proxy is answered by it; then it
// deregisters it. It reports the median and 90th percentile over `changes` registrations, with
// 10 and 1,000 services routed.
//
//	go test ./bench -run '^$' -bench CatalogChangeToTraffic -benchtime 1x
func BenchmarkCatalogChangeToTraffic(b *testing.B) {
	changes := envInt("BENCH_CHANGES", 50)
	for _, services := range []int{10, envInt("BENCH_MANY_SERVICES", 1000)} {
		b.Run(fmt.Sprintf("services=%d", services), func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				median, p90 := catalogChangeDelays(b, services, changes)
				b.ReportMetric(float64(median.Milliseconds()), "median-ms")
				b.ReportMetric(float64(p90.Milliseconds()), "p90-ms")
			}
		})
	}
}

func catalogChangeDelays(b *testing.B, services, changes int) (median, p90 time.Duration) {
	c := testenv.StartConsul(b)
	client, err := consul.New([]string{c.Addr}, nil)
	if err != nil {
		b.Fatal(err)
	}
	// One backend serves every service's first instance; routes are written to KV before the
	// server starts, which loads them all.
	shared := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "old") }))
	defer shared.Close()
	sharedPort := portOf(shared.URL)
	store := consul.NewStore(client, "docker-flow")
	ctx := context.Background()
	for i := 0; i < services; i++ {
		name := fmt.Sprintf("svc-%05d", i)
		c.RegisterService(name, name+"-0", "127.0.0.1", sharedPort)
		if err := store.Put(ctx, route.Route{ServiceName: name, ServicePath: []string{"/" + name + "/"}, PathType: route.PathBeg}); err != nil {
			b.Fatal(err)
		}
	}
	httpPort := testenv.FreePort(b)
	dir, _ := os.MkdirTemp("", "dfpb")
	defer os.RemoveAll(dir)
	srv, err := server.Start(ctx, server.Config{
		ConsulAddresses: []string{c.Addr}, BindAddress: "127.0.0.1", HTTPPort: httpPort,
		APIPort: testenv.FreePort(b), ConfigDir: dir, HAProxyBin: testenv.HAProxyBin(b),
		Health: consul.HealthPassing, StartupTimeout: time.Minute,
		Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: benchLogLevel()})),
	})
	if err != nil {
		b.Fatal(err)
	}
	defer srv.Stop(context.Background())

	target := fmt.Sprintf("svc-%05d", services/2)
	url := fmt.Sprintf("http://127.0.0.1:%d/%s/x", httpPort, target)
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	var delays []time.Duration
	for n := 0; n < changes; n++ {
		var hit atomic.Bool
		fresh := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			hit.Store(true)
			fmt.Fprint(w, "new")
		}))
		id := fmt.Sprintf("%s-new-%d", target, n)
		registered := time.Now()
		c.RegisterService(target, id, "127.0.0.1", portOf(fresh.URL))
		deadline := registered.Add(30 * time.Second)
		for {
			resp, err := hc.Get(url)
			if err == nil {
				resp.Body.Close()
			}
			if hit.Load() {
				delays = append(delays, time.Since(registered))
				break
			}
			if time.Now().After(deadline) {
				b.Fatalf("change %d: the new instance got no request within 30 s", n)
			}
			time.Sleep(2 * time.Millisecond)
		}
		c.DeregisterService(id)
		fresh.Close()
		// Wait until the instance is gone from the config before the next change.
		wait := time.Now().Add(30 * time.Second)
		for strings.Contains(string(srv.HAProxy().Config()), strconv.Itoa(portOf(fresh.URL))) {
			if time.Now().After(wait) {
				b.Fatalf("change %d: the instance stayed in the config", n)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	sort.Slice(delays, func(i, j int) bool { return delays[i] < delays[j] })
	return delays[len(delays)/2], delays[len(delays)*9/10]
}

func portOf(url string) int {
	p, _ := strconv.Atoi(url[strings.LastIndex(url, ":")+1:])
	return p
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// benchLogLevel is error unless BENCH_LOG=info asks for the server's log.
func benchLogLevel() slog.Level {
	if os.Getenv("BENCH_LOG") == "info" {
		return slog.LevelInfo
	}
	return slog.LevelError
}
