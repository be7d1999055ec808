package bench

import (
	"context"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/bench/harness"
	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

// TestHarnessSmoke runs the benchmark harness at tiny sizes (10 services, 2 s of load), with the
// services routed by path, then by domain and path (dfp-bench -domains), then by path with HAProxy's
// health checks (dfp-bench -check -check-interval 1s), then by path_end with every request of item
// 3 on a path of its own (dfp-bench -path-type path_end -distinct-paths): every row of the table has
// a figure, and no request fails while the proxy reloads.
func TestHarnessSmoke(t *testing.T) {
	testenv.HAProxyBin(t)
	testenv.ConsulBin(t)
	t.Run("by path", func(t *testing.T) { smoke(t, func(*harness.Config) {}) })
	t.Run("by domain", func(t *testing.T) { smoke(t, func(c *harness.Config) { c.Domains = true }) })
	t.Run("with health checks", func(t *testing.T) {
		smoke(t, func(c *harness.Config) { c.SkipCheck, c.CheckInterval = false, time.Second })
	})
	t.Run("path_end, distinct paths", func(t *testing.T) {
		smoke(t, func(c *harness.Config) { c.PathType, c.DistinctPaths = route.PathEnd, true })
	})
}

func smoke(t *testing.T, edit func(*harness.Config)) {
	cfg := harness.Smoke()
	edit(&cfg)
	cfg.RequireWrk = testenv.CI()
	level := slog.LevelError
	if testing.Verbose() {
		level = slog.LevelInfo
	}
	cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	cfg.Progress = testWriter{t}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	res, err := harness.Run(ctx, t, cfg)
	var table strings.Builder
	harness.WriteTable(&table, res)
	t.Logf("\n%s", table.String())
	if err != nil {
		t.Fatalf("harness: %v", err)
	}
	for _, item := range []int{1, 2, 3, 4} {
		if _, ok := res.Find(item, ""); !ok {
			t.Errorf("item %d has no row", item)
		}
	}
	for _, row := range append(res.Rows, res.Phases...) {
		if row.Value == "" || row.Err != nil {
			t.Errorf("item %d, %s: figure %q, error %v", row.Item, row.Measure, row.Value, row.Err)
		}
	}
	churn, ok := res.Find(4, "failed requests")
	if !ok {
		t.Fatal("item 4: no row of failed requests")
	}
	if churn.Num != 0 {
		t.Errorf("item 4: %s failed requests while reconfiguring, want 0", churn.Value)
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
