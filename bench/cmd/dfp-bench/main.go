// Command dfp-bench measures docker-flow-proxy against the real Consul and HAProxy on 127.0.0.1
// and prints one table (Markdown): reconfigure latency, start-up and memory of a new replica,
// requests per second proxied and direct, failed requests while reconfiguring. Progress goes to
// stderr, the table to stdout.
//
//	go run ./bench/cmd/dfp-bench            # the sizes of the targets (several minutes)
//	go run ./bench/cmd/dfp-bench -smoke     # 10 services, 2 s of load
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/bench/harness"
	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

func main() {
	os.Exit(run())
}

func run() int {
	d := harness.Defaults()
	smoke := flag.Bool("smoke", false, "tiny sizes: 10 services, 2 s of load (other flags still apply)")
	sizes := flag.String("sizes", ints(d.LatencySizes), "item 1: services routed when reconfigure latency is measured")
	samples := flag.Int("samples", d.Samples, "item 1: reconfigure calls measured per size")
	startSizes := flag.String("start-sizes", ints(d.StartSizes), "item 2: services with which a new replica starts (its start-up and memory)")
	startRuns := flag.Int("start-runs", d.StartRuns, "item 2: replicas started one after the other at each size; the figures are medians")
	replicaLog := flag.String("replica-log", "", "write the log of item 2's replicas, at info level, to this file")
	instances := flag.Int("instances", d.Instances, "catalog instances of each service")
	loadAt := flag.Int("load-at", d.LoadAt, "items 3 and 4: services routed meanwhile")
	rpsDuration := flag.Duration("rps-duration", d.RPSDuration, "item 3: length of the proxied runs in all (and of the direct ones)")
	rpsRounds := flag.Int("rps-rounds", d.RPSRounds, "item 3: rounds of a proxied run then a direct one (each at least 1 s); the figures are medians")
	connections := flag.Int("connections", d.Connections, "item 3: keep-alive connections (item 4 uses a quarter)")
	churnDuration := flag.Duration("churn-duration", d.ChurnDuration, "item 4: length of the run")
	churnRate := flag.Int("churn-rate", d.ChurnRate, "item 4: reconfigure calls per second")
	threads := flag.Int("haproxy-threads", 0, "items 1, 3 and 4: the server's HAProxy threads (0: HAProxy's default, one per CPU)")
	check := flag.Bool("check", false, "route the services with HAProxy health checks (default: skipCheck)")
	checkInterval := flag.Duration("check-interval", 0, "with -check: HAProxy's health-check interval (--check-interval; 0: HAProxy's default, 2s)")
	domains := flag.Bool("domains", false, "route every service by domain too (serviceDomain <name>.bench.test, sent as the Host header)")
	distinctPaths := flag.Bool("distinct-paths", false, "item 3: every request on a path of its own that the route matches (not with -path-type path)")
	pathType := flag.String("path-type", "path_beg", "the routes' pathType: path_beg, path, path_end, path_dir or path_reg (the path that answers /<name>/x)")
	noPhases := flag.Bool("no-phases", false, "do not time the steps of a change at the largest size")
	cpuProfile := flag.String("cpuprofile", "", "write a CPU profile of item 1 at the largest size to this file")
	logLevel := flag.String("log-level", "error", "the server's log level: debug, info, warn, error")
	logFile := flag.String("log-file", "", "write the server's log to this file instead of stderr")
	consulMaxConns := flag.Int("consul-max-conns", 0, "start Consul with limits.http_max_conns_per_client raised to this (0: Consul's default, 200)")
	wrk := flag.String("wrk", "", "the wrk binary (default: wrk on PATH; without it a Go load generator, unless CI=true)")
	flag.Parse()

	cfg := d
	if *smoke {
		cfg = harness.Smoke()
	}
	set := map[string]bool{}
	flag.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var err error
	if set["sizes"] || !*smoke {
		if cfg.LatencySizes, err = parseInts(*sizes); err != nil {
			return usage("-sizes", err)
		}
	}
	if set["start-sizes"] || !*smoke {
		if cfg.StartSizes, err = parseInts(*startSizes); err != nil {
			return usage("-start-sizes", err)
		}
	}
	pick := func(name string, v int, dst *int) {
		if set[name] || !*smoke {
			*dst = v
		}
	}
	pickD := func(name string, v time.Duration, dst *time.Duration) {
		if set[name] || !*smoke {
			*dst = v
		}
	}
	pick("samples", *samples, &cfg.Samples)
	pick("start-runs", *startRuns, &cfg.StartRuns)
	pick("instances", *instances, &cfg.Instances)
	pick("load-at", *loadAt, &cfg.LoadAt)
	pick("connections", *connections, &cfg.Connections)
	pick("churn-rate", *churnRate, &cfg.ChurnRate)
	pick("rps-rounds", *rpsRounds, &cfg.RPSRounds)
	pickD("rps-duration", *rpsDuration, &cfg.RPSDuration)
	pickD("churn-duration", *churnDuration, &cfg.ChurnDuration)
	cfg.SkipCheck = !*check
	cfg.CheckInterval = *checkInterval
	cfg.Domains = *domains
	switch pt := route.PathType(*pathType); pt {
	case route.PathBeg, route.Path, route.PathEnd, route.PathDir, route.PathReg:
		cfg.PathType = pt
	default:
		fmt.Fprintf(os.Stderr, "dfp-bench: -path-type %q is not one of path_beg, path, path_end, path_dir, path_reg\n", *pathType)
		return 2
	}
	cfg.DistinctPaths = *distinctPaths
	if cfg.DistinctPaths && cfg.PathType == route.Path {
		fmt.Fprintln(os.Stderr, "dfp-bench: -distinct-paths needs a path type that matches more than one path")
		return 2
	}
	cfg.HAProxyThreads = *threads
	cfg.Phases = !*noPhases
	cfg.CPUProfile = *cpuProfile
	cfg.Wrk = *wrk
	cfg.ConsulMaxConns = *consulMaxConns
	cfg.RequireWrk = testenv.CI()

	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return usage("-log-level", err)
	}
	logOut := os.Stderr
	if *logFile != "" {
		f, err := os.Create(*logFile)
		if err != nil {
			return usage("-log-file", err)
		}
		defer f.Close()
		logOut = f
	}
	if *replicaLog != "" {
		f, err := os.Create(*replicaLog)
		if err != nil {
			return usage("-replica-log", err)
		}
		defer f.Close()
		cfg.ReplicaLog = f
	}
	cfg.Logger = slog.New(slog.NewTextHandler(logOut, &slog.HandlerOptions{Level: level}))
	cfg.Progress = os.Stderr

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	tb := &programTB{}
	defer tb.runCleanups()

	type outcome struct {
		res harness.Result
		err error
	}
	done := make(chan outcome, 1)
	finished := make(chan struct{})
	go func() {
		// A helper of internal/testenv that fails ends this goroutine (runtime.Goexit).
		defer close(finished)
		res, err := harness.Run(ctx, tb, cfg)
		done <- outcome{res, err}
	}()
	<-finished
	select {
	case o := <-done:
		fmt.Printf("\nmachine: %d cores (nproc), %s; go run ./bench/cmd/dfp-bench %s\n\n", nproc(), cpuModel(), strings.Join(os.Args[1:], " "))
		harness.WriteTable(os.Stdout, o.res)
		if o.err != nil {
			fmt.Fprintln(os.Stderr, "dfp-bench: some figures are missing:", o.err)
			return 1
		}
		return 0
	default:
		fmt.Fprintln(os.Stderr, "dfp-bench: stopped: a real program is missing or did not start")
		return 1
	}
}

func usage(flagName string, err error) int {
	fmt.Fprintf(os.Stderr, "dfp-bench: %s: %v\n", flagName, err)
	return 2
}

func ints(v []int) string {
	s := make([]string, len(v))
	for i, n := range v {
		s[i] = strconv.Itoa(n)
	}
	return strings.Join(s, ",")
}

func parseInts(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil || n <= 0 {
			return nil, fmt.Errorf("%q is not a positive number", f)
		}
		out = append(out, n)
	}
	return out, nil
}
