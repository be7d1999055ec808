package harness

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/haproxy"
	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
)

// Item 2: a new replica, started as users start one: the docker-flow-proxy binary running
// `server` in a process of its own, on empty folders, against the world's Consul.

// sweepWorkers is the number of keep-alive connections that request every route of a replica,
// sweepDepth the requests each one pipelines at a time.
const (
	sweepWorkers = 32
	sweepDepth   = 8
)

// replica is a docker-flow-proxy server process.
type replica struct {
	cmd      *exec.Cmd
	out      testenv.LogBuffer
	done     chan struct{}
	dir      string
	httpPort int
	apiURL   string
}

// proxyBinary builds cmd/docker-flow-proxy once per run.
func (h *harness) proxyBinary() (string, error) {
	if h.bin != "" {
		return h.bin, nil
	}
	dir, err := os.MkdirTemp("", "dfp-bench-bin")
	if err != nil {
		return "", fmt.Errorf("binary folder: %w", err)
	}
	var bin string
	if err := h.tbCall(func() { bin = testenv.BuildProxy(h.tb, dir) }); err != nil {
		_ = os.RemoveAll(dir)
		return "", err
	}
	h.bin, h.binDir = bin, dir
	return bin, nil
}

// replicaRows starts a new replica StartRuns times, one after the other, and measures how long each
// takes to serve every route: until 50 routes spread over the table (the first and the last among
// them) are answered 200 by a backend through its HAProxy. HAProxy loads the whole table in one
// config; to show that it is whole, every route is then requested once (a sweep, whose own length
// on two cores is the second figure) and must be answered 200 by a backend, and the replica must
// have changed nothing in HAProxy since its start (no reload, no runtime-API change). The figures
// are the runs' medians, each run listed; the target is met when every run meets it. Then the
// memory of the last run's server process and of its HAProxy master and worker. Each replica
// stops before the next starts.
func (h *harness) replicaRows(ctx context.Context, w *world, n int) {
	const served, swept = "start-up: every route served", "start-up: the sweep that checks every route ended"
	target := ""
	if n == 10000 {
		target = "< 5 s"
	}
	fail := func(err error) {
		h.add(Row{Item: 2, Measure: served, Services: n, Target: target, Err: err})
	}
	bin, err := h.proxyBinary()
	if err != nil {
		fail(err)
		return
	}
	runs := max(1, h.cfg.StartRuns)
	var firsts, alls []time.Duration
	var memory []Row
	for run := 1; run <= runs; run++ {
		first, all, mem, err := h.replicaRun(ctx, w, n, bin, run == runs)
		if err != nil {
			if runs > 1 {
				err = fmt.Errorf("run %d of %d: %w", run, runs, err)
			}
			fail(err)
			return
		}
		h.say("item 2, run %d of %d at %d services: every route served after %s, the sweep ended after %s", run, runs, n, fmtMS(first), fmtMS(all))
		firsts, alls, memory = append(firsts, first), append(alls, all), mem
	}
	met := ""
	if target != "" {
		met = verdict(slices.Max(firsts) < 5*time.Second)
	}
	row := func(measure string, ds []time.Duration, target, met string) Row {
		m := medianDuration(ds)
		v := fmtMS(m)
		if len(ds) > 1 {
			v += " (runs " + fmtRuns(ds) + ")"
		}
		return Row{Item: 2, Measure: measure, Services: n, Value: v, Num: ms(m), Target: target, Met: met}
	}
	h.add(row(served, firsts, target, met))
	h.add(row(swept, alls, "", ""))
	for _, r := range memory {
		h.add(r)
	}
}

// replicaRun starts one replica and returns when every route was served (first) and when the sweep
// that checks every route ended (all), both from the replica's start. With memory, it also returns
// the memory rows, taken before the replica stops.
func (h *harness) replicaRun(ctx context.Context, w *world, n int, bin string, memory bool) (first, all time.Duration, mem []Row, err error) {
	sctx, cancel := context.WithTimeout(ctx, h.cfg.StartupWait)
	defer cancel()
	t0 := time.Now()
	r, err := w.startReplica(bin)
	if err != nil {
		return 0, 0, nil, err
	}
	defer func() {
		if err := r.stop(); err != nil {
			h.say("stopping the replica: %v", err)
		}
	}()
	if err := r.watch(sctx, func(ctx context.Context) error {
		return w.waitServed(ctx, r.httpPort, sampleServices(n, 50))
	}); err != nil {
		return 0, 0, nil, err
	}
	first = time.Since(t0)
	if err := r.watch(sctx, func(ctx context.Context) error {
		if err := w.serveAll(ctx, r.httpPort); err != nil {
			return err
		}
		all = time.Since(t0)
		return r.unchanged(ctx)
	}); err != nil {
		return 0, 0, nil, fmt.Errorf("the 50 sampled routes were served after %s, but: %w", fmtMS(first), err)
	}
	if memory {
		mem = h.replicaMemoryRows(sctx, r, n)
	}
	return first, all, mem, nil
}

// fmtRuns lists durations in seconds with two decimals ("2.21 2.43 2.10 s").
func fmtRuns(ds []time.Duration) string {
	parts := make([]string, len(ds))
	for i, d := range ds {
		parts[i] = fmt.Sprintf("%.2f", d.Seconds())
	}
	return strings.Join(parts, " ") + " s"
}

func medianDuration(ds []time.Duration) time.Duration {
	vs := make([]float64, len(ds))
	for i, d := range ds {
		vs[i] = float64(d)
	}
	return time.Duration(median(vs))
}

// unchanged checks, once the replica's API answers, that HAProxy serves the config it started
// with: no reload and no change through the runtime API since.
func (r *replica) unchanged(ctx context.Context) error {
	if err := r.healthy(ctx); err != nil {
		return err
	}
	for _, name := range []string{`dfp_haproxy_reloads_total{result="ok"}`, `dfp_haproxy_runtime_updates_total{result="ok"}`} {
		v, err := r.metric(ctx, name)
		if err != nil {
			return err
		}
		if v != 0 {
			return fmt.Errorf("HAProxy's config changed after the start: %s %v", name, v)
		}
	}
	return nil
}

// startReplica starts the binary's server on free ports of 127.0.0.1 and empty folders.
func (w *world) startReplica(bin string) (*replica, error) {
	hap, ports, err := w.h.serverParts()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "dfp-bench-replica")
	if err != nil {
		return nil, fmt.Errorf("replica folder: %w", err)
	}
	r := &replica{dir: dir, httpPort: ports[0], apiURL: "http://127.0.0.1:" + strconv.Itoa(ports[2]), done: make(chan struct{})}
	level := "warn"
	if w.h.cfg.ReplicaLog != nil {
		level = "info"
	}
	r.cmd = exec.Command(bin, "--log-level", level, "server",
		"--consul-address", w.consul.addr, "--proxy-instance-name", instanceName, "--bind-address", "127.0.0.1",
		"--http-port", strconv.Itoa(ports[0]), "--https-port", strconv.Itoa(ports[1]), "--api-port", strconv.Itoa(ports[2]),
		"--config-dir", filepath.Join(dir, "config"), "--templates-dir", filepath.Join(dir, "templates"),
		"--certs-dir", filepath.Join(dir, "certs"), "--service-health", "passing", "--haproxy-bin", hap,
		"--startup-timeout", w.h.cfg.StartupWait.String(), "--check-interval", w.h.cfg.CheckInterval.String())
	var out io.Writer = &r.out
	if w.h.cfg.ReplicaLog != nil {
		out = io.MultiWriter(&r.out, w.h.cfg.ReplicaLog)
	}
	r.cmd.Stdout, r.cmd.Stderr = out, out
	// HAProxy, started by the server, dies with it (its own Pdeathsig); so does the server with
	// the harness.
	r.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if w.h.cfg.ReplicaLog != nil {
		fmt.Fprintf(w.h.cfg.ReplicaLog, "time=%s harness: starting a replica\n", time.Now().UTC().Format("2006-01-02T15:04:05.000Z"))
	}
	if err := r.cmd.Start(); err != nil {
		_ = os.RemoveAll(dir)
		return nil, fmt.Errorf("start %s server: %w", bin, err)
	}
	go func() { _ = r.cmd.Wait(); close(r.done) }()
	return r, nil
}

// watch runs f until it returns, or fails at once when the replica exits meanwhile.
func (r *replica) watch(ctx context.Context, f func(ctx context.Context) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	res := make(chan error, 1)
	go func() { res <- f(ctx) }()
	select {
	case err := <-res:
		if err != nil {
			return fmt.Errorf("%w; the replica's log:\n%s", err, tail(r.out.String(), 20))
		}
		return nil
	case <-r.done:
		cancel()
		<-res
		return fmt.Errorf("the replica exited: %v; its log:\n%s", r.cmd.ProcessState, tail(r.out.String(), 20))
	}
}

// healthy polls the replica's GET /v1/docker-flow-proxy/health until it answers 200.
func (r *replica) healthy(ctx context.Context) error {
	c := newClient(5 * time.Second)
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, r.apiURL+"/v1/docker-flow-proxy/health", nil)
		if err != nil {
			return err
		}
		resp, err := c.Do(req)
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			err = fmt.Errorf("GET /v1/docker-flow-proxy/health: %s", resp.Status)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("the API is not healthy: %v", err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// stop sends SIGTERM and waits up to a minute for the server to stop HAProxy and exit, then kills it.
func (r *replica) stop() error {
	defer os.RemoveAll(r.dir)
	_ = r.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-r.done:
	case <-time.After(time.Minute):
		_ = r.cmd.Process.Kill()
		<-r.done
		return errors.New("the replica did not stop within a minute of SIGTERM: killed")
	}
	if st := r.cmd.ProcessState; st != nil && !st.Success() {
		return fmt.Errorf("the replica exited with %v; its log:\n%s", st, tail(r.out.String(), 20))
	}
	return nil
}

// replicaMemoryRows returns the resident memory of the server process and its Go heap in use (from its
// /metrics), and the resident memory of HAProxy's master and worker (pids from the master CLI's
// `show proc`).
func (h *harness) replicaMemoryRows(ctx context.Context, r *replica, n int) []Row {
	var rows []Row
	mbRow := func(measure string, v float64, err error) {
		rows = append(rows, Row{Item: 2, Measure: measure, Services: n, Value: fmt.Sprintf("%.0f MB", v), Num: v, Err: err})
	}
	rss, err := vmRSS(r.cmd.Process.Pid)
	mbRow("memory: server RSS", rss, err)
	heap, err := r.metric(ctx, "go_memstats_heap_inuse_bytes")
	mbRow("memory: server Go heap in use", heap/(1<<20), err)
	info, err := haproxy.ShowProcAt(ctx, haproxy.MasterSocket(filepath.Join(r.dir, "config")))
	if err == nil && len(info.Workers) == 0 {
		err = errors.New("show proc lists no worker")
	}
	var master, worker float64
	if err == nil {
		master, err = vmRSS(info.MasterPID)
	}
	if err == nil {
		worker, err = vmRSS(info.Workers[0])
	}
	mbRow("memory: HAProxy master RSS", master, err)
	mbRow("memory: HAProxy worker RSS", worker, err)
	return rows
}

// metric reads one figure of the replica's GET /metrics: the line of name (with its labels, if any).
func (r *replica) metric(ctx context.Context, name string) (float64, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, r.apiURL+"/metrics", nil)
	if err != nil {
		return 0, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, fmt.Errorf("GET /metrics: %w", err)
	}
	defer resp.Body.Close()
	s := bufio.NewScanner(resp.Body)
	for s.Scan() {
		if rest, ok := strings.CutPrefix(s.Text(), name+" "); ok {
			v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64)
			if err != nil {
				return 0, fmt.Errorf("GET /metrics: %s %q: %w", name, rest, err)
			}
			return v, nil
		}
	}
	return 0, fmt.Errorf("GET /metrics: no %s (%s)", name, resp.Status)
}

// tail returns the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}
