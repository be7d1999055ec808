// Package harness measures docker-flow-proxy against the real Consul and HAProxy on 127.0.0.1 and
// prints one table: reconfigure latency, start-up time and memory of a new replica, requests per
// second through the proxy against the backend directly, and failed requests while the proxy
// reloads five times a second. The dfp-bench program runs it with the sizes of the targets; the
// smoke test runs it with tiny sizes.
package harness

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

// Config says what to measure and at which sizes.
type Config struct {
	// LatencySizes are the numbers of services routed when reconfigure latency is measured (item 1).
	LatencySizes []int
	// Samples is the number of reconfigure calls measured per size.
	Samples int
	// StartSizes are the numbers of services with which a new replica's start-up and memory are
	// measured (item 2): the docker-flow-proxy binary, built for the run, in a process of its own.
	StartSizes []int
	// StartRuns is the number of replicas started one after the other at each of StartSizes; the
	// start-up figures are their medians.
	StartRuns int
	// ReplicaLog, when set, receives the log of item 2's replicas at info level (their start's steps
	// and times); otherwise they log at warn level, shown when one fails.
	ReplicaLog io.Writer
	// Instances is the number of catalog instances of each service.
	Instances int
	// LoadAt is the number of services routed during the throughput (item 3) and reload-under-load
	// (item 4) measures; 0 means the smallest size.
	LoadAt int
	// RPSDuration is how long the proxied runs of item 3 last in all, and so do the direct ones;
	// they alternate in RPSRounds rounds (a proxied run then a direct one, each at least 1 s).
	// Connections is the number of keep-alive connections of the load generator.
	RPSDuration time.Duration
	RPSRounds   int
	Connections int
	// ChurnDuration is how long item 4 lasts; ChurnRate the reconfigure calls per second.
	ChurnDuration time.Duration
	ChurnRate     int
	// SkipCheck routes the services without HAProxy health checks (see the README: with checks,
	// HAProxy probes every instance every 2 s).
	SkipCheck bool
	// CheckInterval is the server's and the replicas' --check-interval when the services are
	// routed with health checks (0: HAProxy's default, 2 s).
	CheckInterval time.Duration
	// Domains routes every service by domain as well as by path: serviceDomain
	// <name>.bench.test, which the harness's requests carry as their Host header (they are
	// all sent to 127.0.0.1; the names are never resolved).
	Domains bool
	// PathType is the routes' pathType (empty: path_beg). Each route's path is the one that
	// answers its requests (/<name>/x): path_beg /<name>/, path and path_end /<name>/x, path_dir
	// /<name>, path_reg ^/<name>/.
	PathType route.PathType
	// DistinctPaths gives every request of item 3 a path of its own that the route matches (not
	// with PathType path), so that no lookup HAProxy keeps in its pattern cache answers it.
	DistinctPaths bool
	// HAProxyThreads is the server's HAProxy threads for items 1, 3 and 4 (--haproxy-threads; 0:
	// HAProxy's default, one per CPU).
	HAProxyThreads int
	// StartupWait bounds a replica's start-up (the server's StartupTimeout and the wait until it
	// serves every route).
	StartupWait time.Duration
	// Wrk is the wrk binary; empty means wrk on PATH. When wrk is missing, items 3 use a Go load
	// generator, unless RequireWrk.
	Wrk        string
	RequireWrk bool
	// Logger receives the server's log; Progress the harness's progress lines (nil: discarded).
	Logger   *slog.Logger
	Progress io.Writer
	// Phases adds, at the largest size, the time of each step of a change (Consul reads, render,
	// haproxy -c, reload).
	Phases bool
	// ConsulMaxConns, when > 0, starts Consul with limits.http_max_conns_per_client raised to it;
	// 0 keeps Consul's default (200 connections per client address).
	ConsulMaxConns int
	// CPUProfile, when set, is written with a CPU profile of the process (the server runs in it)
	// while item 1 runs at the largest size.
	CPUProfile string
}

// Defaults are the sizes and durations of the targets.
func Defaults() Config {
	return Config{
		LatencySizes:  []int{10, 100, 1000, 10000},
		Samples:       20,
		StartSizes:    []int{1000, 10000},
		StartRuns:     3,
		Instances:     3,
		LoadAt:        1000,
		RPSDuration:   18 * time.Second,
		RPSRounds:     9,
		Connections:   32,
		ChurnDuration: 30 * time.Second,
		ChurnRate:     5,
		SkipCheck:     true,
		StartupWait:   5 * time.Minute,
		Phases:        true,
	}
}

// Smoke are tiny sizes: 10 services, 2 s of load. The whole run takes some 15 seconds.
func Smoke() Config {
	c := Defaults()
	c.LatencySizes = []int{10}
	c.Samples = 5
	c.StartSizes = []int{10}
	c.StartRuns = 1
	c.LoadAt = 10
	c.RPSDuration = 2 * time.Second
	c.RPSRounds = 2
	c.ChurnDuration = 2 * time.Second
	c.StartupWait = time.Minute
	return c
}

// Row is one figure of the table.
type Row struct {
	Item     int    // 1 to 4, as in the list
	Measure  string // what was measured
	Services int    // services routed
	Value    string // the figure; empty when it could not be measured
	Target   string // the target, if any
	Met      string // "yes", "no", or empty without a target
	Err      error  // why Value is empty
	// Num is the figure as a number, in the unit of Value (ms, s, MB, requests...).
	Num float64
}

// Result is the table, and the phases' figures at the largest size.
type Result struct {
	Rows   []Row
	Phases []Row
}

// Failed returns the rows without a figure.
func (r Result) Failed() []Row {
	var out []Row
	for _, row := range append(slices.Clone(r.Rows), r.Phases...) {
		if row.Value == "" {
			out = append(out, row)
		}
	}
	return out
}

// Find returns the first row of item whose measure starts with prefix.
func (r Result) Find(item int, prefix string) (Row, bool) {
	for _, row := range r.Rows {
		if row.Item == item && strings.HasPrefix(row.Measure, prefix) {
			return row, true
		}
	}
	return Row{}, false
}

// Run measures everything cfg asks for. tb starts Consul and finds HAProxy (internal/testenv); a
// missing program stops tb. A measure that fails leaves its row without a figure, with the
// reason, and the others go on; the error returned joins those reasons.
func Run(ctx context.Context, tb testing.TB, cfg Config) (Result, error) {
	cfg = withDefaults(cfg)
	h := &harness{tb: tb, cfg: cfg, log: cfg.Logger, progress: cfg.Progress}
	if err := h.checkWrk(); err != nil {
		return Result{}, err
	}
	sizes := worldSizes(cfg)
	largest := sizes[len(sizes)-1]
	defer func() {
		if h.binDir != "" {
			_ = os.RemoveAll(h.binDir)
		}
	}()
	if len(cfg.StartSizes) > 0 {
		// Built before any world: the build's own work (and the memory the linker takes and gives
		// back) does not fall on the first replica's start. A failed build fails item 2's rows.
		if _, err := h.proxyBinary(); err != nil {
			h.say("building the docker-flow-proxy binary: %v", err)
		}
	}
	for _, n := range sizes {
		if err := ctx.Err(); err != nil {
			return h.res, err
		}
		by := "path"
		if cfg.Domains {
			by = "domain and path"
		}
		if cfg.PathType != "" {
			by += " (" + string(cfg.PathType) + ")"
		}
		if cfg.DistinctPaths {
			by += ", every request of item 3 on a path of its own"
		}
		h.say("== %d services x %d instances, routed by %s", n, cfg.Instances, by)
		w, err := h.newWorld(ctx, n)
		if err != nil {
			h.failRows(n, fmt.Errorf("setting up %d services: %w", n, err))
			continue
		}
		h.measureWorld(ctx, w, n, n == largest)
		w.close()
	}
	var errs []error
	for _, row := range h.res.Failed() {
		errs = append(errs, fmt.Errorf("item %d, %s at %d services: %w", row.Item, row.Measure, row.Services, row.Err))
	}
	return h.res, errors.Join(errs...)
}

func (h *harness) measureWorld(ctx context.Context, w *world, n int, largest bool) {
	cfg := h.cfg
	if slices.Contains(cfg.StartSizes, n) {
		h.replicaRows(ctx, w, n)
	}
	if err := w.startServer(ctx); err != nil {
		h.failRows(n, fmt.Errorf("start the server: %w", err))
		return
	}
	if slices.Contains(cfg.LatencySizes, n) {
		h.latencyRows(ctx, w, n, largest)
	}
	if n == cfg.LoadAt {
		h.throughputRows(ctx, w, n)
		h.churnRows(ctx, w, n)
	}
	if largest && cfg.Phases {
		h.phaseRows(ctx, w, n)
	}
}

// worldSizes are the sizes at which a world is set up, ascending.
func worldSizes(cfg Config) []int {
	var sizes []int
	for _, n := range append(append(slices.Clone(cfg.LatencySizes), cfg.StartSizes...), cfg.LoadAt) {
		if n > 0 && !slices.Contains(sizes, n) {
			sizes = append(sizes, n)
		}
	}
	slices.Sort(sizes)
	return sizes
}

func withDefaults(cfg Config) Config {
	d := Defaults()
	if cfg.Samples <= 0 {
		cfg.Samples = d.Samples
	}
	if cfg.Instances <= 0 {
		cfg.Instances = d.Instances
	}
	if cfg.LoadAt <= 0 {
		all := append(slices.Clone(cfg.LatencySizes), cfg.StartSizes...)
		if len(all) == 0 {
			all = []int{10}
		}
		cfg.LoadAt = slices.Min(all)
	}
	if cfg.RPSDuration <= 0 {
		cfg.RPSDuration = d.RPSDuration
	}
	if cfg.RPSRounds <= 0 {
		cfg.RPSRounds = d.RPSRounds
	}
	if cfg.Connections <= 0 {
		cfg.Connections = d.Connections
	}
	if cfg.ChurnDuration <= 0 {
		cfg.ChurnDuration = d.ChurnDuration
	}
	if cfg.ChurnRate <= 0 {
		cfg.ChurnRate = d.ChurnRate
	}
	if cfg.StartupWait <= 0 {
		cfg.StartupWait = d.StartupWait
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if cfg.Progress == nil {
		cfg.Progress = io.Discard
	}
	return cfg
}

type harness struct {
	tb       testing.TB
	cfg      Config
	log      *slog.Logger
	progress io.Writer
	res      Result
	wrk      string // wrk binary, or "" for the Go load generator
	bin      string // the docker-flow-proxy binary (item 2), built in binDir
	binDir   string
}

func (h *harness) say(format string, args ...any) {
	fmt.Fprintf(h.progress, "[bench %s] %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}

func (h *harness) add(r Row) {
	if r.Err != nil {
		r.Value = ""
		h.say("item %d, %s (%d services): FAILED: %v", r.Item, r.Measure, r.Services, r.Err)
	} else {
		h.say("item %d, %s (%d services): %s", r.Item, r.Measure, r.Services, r.Value)
	}
	h.res.Rows = append(h.res.Rows, r)
}

func (h *harness) addPhase(r Row) {
	if r.Err != nil {
		r.Value = ""
		h.say("phase %s (%d services): FAILED: %v", r.Measure, r.Services, r.Err)
	} else {
		h.say("phase %s (%d services): %s", r.Measure, r.Services, r.Value)
	}
	h.res.Phases = append(h.res.Phases, r)
}

// failRows records, for a world that could not be measured, a failed row for each measure due at n.
func (h *harness) failRows(n int, err error) {
	if slices.Contains(h.cfg.LatencySizes, n) {
		h.add(Row{Item: 1, Measure: "reconfigure to first 200, median", Services: n, Err: err})
	}
	if n == h.cfg.LoadAt {
		h.add(Row{Item: 3, Measure: "requests/s proxied / direct", Services: n, Err: err})
		h.add(Row{Item: 4, Measure: "failed requests while reconfiguring", Services: n, Err: err})
	}
}

// verdict says whether v meets a target "below limit" or "at least limit".
func verdict(ok bool) string {
	if ok {
		return "yes"
	}
	return "no"
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func fmtMS(d time.Duration) string {
	switch {
	case d >= 10*time.Second:
		return fmt.Sprintf("%.1f s", d.Seconds())
	case d >= time.Second:
		return fmt.Sprintf("%.2f s", d.Seconds())
	default:
		return fmt.Sprintf("%.0f ms", ms(d))
	}
}

// percentile is the nearest-rank percentile p (0..100) of ds, sorted in place.
func percentile(ds []time.Duration, p int) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	slices.Sort(ds)
	i := (len(ds)*p + 99) / 100
	if i < 1 {
		i = 1
	}
	return ds[i-1]
}

// WriteTable prints the result as Markdown tables: the figures, then the phases.
func WriteTable(out io.Writer, r Result) {
	fmt.Fprintln(out, "| # | measure | services | figure | target | met |")
	fmt.Fprintln(out, "|---|---|---:|---:|---|---|")
	for _, row := range r.Rows {
		fmt.Fprintf(out, "| %d | %s | %d | %s | %s | %s |\n", row.Item, row.Measure, row.Services, figure(row), row.Target, row.Met)
	}
	if len(r.Phases) == 0 {
		return
	}
	fmt.Fprintln(out)
	fmt.Fprintln(out, "| where the time goes | services | time |")
	fmt.Fprintln(out, "|---|---:|---:|")
	for _, row := range r.Phases {
		fmt.Fprintf(out, "| %s | %d | %s |\n", row.Measure, row.Services, figure(row))
	}
}

func figure(row Row) string {
	if row.Value == "" {
		msg := "no figure"
		if row.Err != nil {
			msg = "failed: " + row.Err.Error()
		}
		return strings.NewReplacer("|", "/", "\n", " ").Replace(msg)
	}
	return row.Value
}
