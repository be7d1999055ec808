package proxy

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/consul"
	"github.com/docker-flow-proxy/docker-flow-proxy/haproxy"
	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

// When an interval set by hand makes HAProxy check more instances a second than
// ManyChecksPerSecond, the controller warns once, with what to do; routes with skipCheck do not
// count, and the automatic interval stays below that rate.
func TestManyHealthChecksWarnOnce(t *testing.T) {
	c := testenv.StartConsul(t)
	client, err := consul.New([]string{c.Addr}, nil)
	if err != nil {
		t.Fatal(err)
	}
	// Each service has 1,100 instances (refused ports of 127.0.0.1: checks fail at once).
	many := make([]route.Instance, 1100)
	for i := range many {
		many[i] = route.Instance{Address: "127.0.0.1", Port: 20000 + i}
	}
	catalog := catalogFunc(func(context.Context, string) ([]route.Instance, error) { return many, nil })
	warning := "HAProxy health-checks many instances"
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	start := func(interval time.Duration) (*Proxy, *testenv.LogBuffer) {
		logs := &testenv.LogBuffer{}
		s := haproxy.DefaultSettings()
		s.CheckInterval = interval
		p, _ := startControllerWith(ctx, t, catalog, consul.NewStore(client, "checks-"+interval.String()), s,
			slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelWarn})))
		return p, logs
	}
	reconfigure := func(p *Proxy, name string, skipCheck bool) {
		t.Helper()
		r := route.Route{ServiceName: name, ServicePath: []string{"/" + name}, PathType: route.PathBeg, SkipCheck: skipCheck}
		if _, err := p.Reconfigure(ctx, r); err != nil {
			t.Fatalf("reconfigure %s: %v", name, err)
		}
	}

	// The automatic interval: 2 s up to 4,000 checked instances (2,200 are 1,100 checks a second),
	// then 4 s (4,400 are 1,100 a second): never more than 2,000 a second, never a warning.
	p, logs := start(0)
	reconfigure(p, "a", false)
	reconfigure(p, "b", false)
	reconfigure(p, "c", true)
	if strings.Contains(logs.String(), warning) {
		t.Fatalf("warned at 1,100 checks a second:\n%s", logs)
	}
	reconfigure(p, "d", false)
	reconfigure(p, "e", false)
	if strings.Contains(logs.String(), warning) {
		t.Fatalf("warned with 4,400 checked instances at the automatic interval:\n%s", logs)
	}

	// Every 500 ms: 1,100 checked instances are 2,200 checks a second.
	p, logs = start(500 * time.Millisecond)
	reconfigure(p, "c", true)
	if strings.Contains(logs.String(), warning) {
		t.Fatalf("warned for instances that are not checked (skipCheck):\n%s", logs)
	}
	reconfigure(p, "a", false)
	got := logs.String()
	if strings.Count(got, warning) != 1 || !strings.Contains(got, "checks_per_second=2200") || !strings.Contains(got, "--check-interval") {
		t.Fatalf("at 2,200 checks a second, the log is\n%s\nwant one warning with the rate and what to do", got)
	}
	reconfigure(p, "b", false)
	if n := strings.Count(logs.String(), warning); n != 1 {
		t.Fatalf("warned %d times, want once", n)
	}
}
