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
				median, p90, _ := catalogChangeDelays(b, services, 0, changes)
				b.ReportMetric(float64(median.Milliseconds()), "median-ms")
				b.ReportMetric(float64(p90.Milliseconds()), "p90-ms")
			}
		})
	}
}

// BenchmarkCatalogChangeToTrafficNodes is BenchmarkCatalogChangeToTraffic with the services spread
// over nodes of their own (as over Docker hosts): 50 nodes, each followed by a blocking query of
// its own, and 200 nodes, more than the limit of node watches (64), followed by one query that
// reads every node again at each change. It also reports the connections to Consul open at the
// end (the server's, and a few of the benchmark's own).
//
//	go test ./bench -run '^$' -bench CatalogChangeToTrafficNodes -benchtime 1x
func BenchmarkCatalogChangeToTrafficNodes(b *testing.B) {
	changes := envInt("BENCH_CHANGES", 50)
	services := envInt("BENCH_MANY_SERVICES", 1000)
	for _, nodes := range []int{50, 200} {
		b.Run(fmt.Sprintf("services=%d/nodes=%d", services, nodes), func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				median, p90, conns := catalogChangeDelays(b, services, nodes, changes)
				b.ReportMetric(float64(median.Milliseconds()), "median-ms")
				b.ReportMetric(float64(p90.Milliseconds()), "p90-ms")
				b.ReportMetric(float64(conns), "consul-conns")
			}
		})
	}
}

// catalogChangeDelays routes services and measures the delay of changes (see
// BenchmarkCatalogChangeToTraffic). With nodes > 0 the instances are registered on that many
// nodes of their own, round robin, and the changes on the node of the changed service. It returns
// the median and 90th percentile delays and the connections to Consul open at the end.
func catalogChangeDelays(b *testing.B, services, nodes, changes int) (median, p90 time.Duration, conns int) {
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
	nodeOf := func(i int) string { return fmt.Sprintf("bench-host-%03d", i%max(1, nodes)) }
	register := func(i int, name, id string, port int) {
		if nodes == 0 {
			c.RegisterService(name, id, "127.0.0.1", port)
			return
		}
		c.Put("/v1/catalog/register", fmt.Sprintf(`{"Node":%q,"Address":"127.0.0.1","SkipNodeUpdate":true,"Service":{"ID":%q,"Service":%q,"Port":%d}}`,
			nodeOf(i), id, name, port))
	}
	deregister := func(i int, id string) {
		if nodes == 0 {
			c.DeregisterService(id)
			return
		}
		c.Put("/v1/catalog/deregister", fmt.Sprintf(`{"Node":%q,"ServiceID":%q}`, nodeOf(i), id))
	}
	for i := 0; i < services; i++ {
		name := fmt.Sprintf("svc-%05d", i)
		register(i, name, name+"-0", sharedPort)
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
	targetNode := services / 2
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
		register(targetNode, target, id, portOf(fresh.URL))
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
		deregister(targetNode, id)
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
	return delays[len(delays)/2], delays[len(delays)*9/10], establishedTo(b, portOf("http://"+c.Addr))
}

// establishedTo counts the established TCP connections to port on 127.0.0.1, from the network
// namespace's table (/proc/self/net/tcp): those to the benchmark's own Consul agent come from this
// process only (the server runs in it).
func establishedTo(b *testing.B, port int) int {
	data, err := os.ReadFile("/proc/self/net/tcp")
	if err != nil {
		b.Logf("counting connections: %v", err)
		return -1
	}
	want := fmt.Sprintf("0100007F:%04X", port)
	n := 0
	for _, line := range strings.Split(string(data), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) > 3 && f[2] == want && f[3] == "01" {
			n++
		}
	}
	return n
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
