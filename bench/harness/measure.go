package harness

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/consul"
	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

// vmRSS reads a process's resident memory, in MB, from /proc.
func vmRSS(pid int) (float64, error) {
	f, err := os.Open(filepath.Join("/proc", strconv.Itoa(pid), "status"))
	if err != nil {
		return 0, fmt.Errorf("rss of %d: %w", pid, err)
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if rest, ok := strings.CutPrefix(s.Text(), "VmRSS:"); ok {
			kb, err := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")))
			if err != nil {
				return 0, fmt.Errorf("rss of %d: %q: %w", pid, rest, err)
			}
			return float64(kb) / 1024, nil
		}
	}
	return 0, fmt.Errorf("rss of %d: no VmRSS line", pid)
}

// cpuTime is the CPU time (user and system) that process pid has used so far; 0 when it cannot be
// read.
func cpuTime(pid int) time.Duration {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return 0
	}
	// The fields after the command name, which is in parentheses and may hold spaces.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0
	}
	utime, err1 := strconv.ParseInt(f[11], 10, 64)
	stime, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0
	}
	// In clock ticks of 1/100 s (USER_HZ, 100 on Linux whatever the kernel's HZ).
	return time.Duration(utime+stime) * 10 * time.Millisecond
}

// Item 1: reconfigure latency.

// latencyRows registers a new service's instance, calls reconfigure and polls the new path
// through the proxy, on new connections, until the backend answers: the latency is from sending
// reconfigure to that first 200. The reconfigure call's own duration is reported too.
func (h *harness) latencyRows(ctx context.Context, w *world, n int, largest bool) {
	if largest && h.cfg.CPUProfile != "" {
		if stop, err := startProfile(h.cfg.CPUProfile); err != nil {
			h.say("cpu profile: %v", err)
		} else {
			defer stop()
		}
	}
	var lat, call []time.Duration
	var err error
	for s := 0; s < h.cfg.Samples && err == nil; s++ {
		var l, c time.Duration
		l, c, err = w.reconfigureSample(ctx, s)
		if err == nil {
			lat, call = append(lat, l), append(call, c)
		}
	}
	h.say("item 1 at %d services, the samples in order (ms): %s", n, msList(lat))
	// The same routes' paths changed, one after the other.
	var moved []time.Duration
	for s := 0; s < len(lat) && err == nil; s++ {
		name := fmt.Sprintf("new-%05d", s)
		var l time.Duration
		if l, _, err = w.reconfigureTo(ctx, name, movedPath(name)); err == nil {
			moved = append(moved, l)
		}
	}
	h.say("item 1 at %d services, path changes, the samples in order (ms): %s", n, msList(moved))
	target := ""
	var limit time.Duration
	switch n {
	case 1000:
		target, limit = "median < 100 ms", 100*time.Millisecond
	case 10000:
		target, limit = "median < 300 ms", 300*time.Millisecond
	}
	med := percentile(lat, 50)
	met := ""
	if target != "" && err == nil {
		met = verdict(med < limit)
	}
	h.add(Row{Item: 1, Measure: "reconfigure to first 200, median", Services: n, Value: fmtMS(med), Num: ms(med), Target: target, Met: met, Err: err})
	p90 := percentile(lat, 90)
	h.add(Row{Item: 1, Measure: "reconfigure to first 200, p90", Services: n, Value: fmtMS(p90), Num: ms(p90), Err: err})
	cm := percentile(call, 50)
	h.add(Row{Item: 1, Measure: "reconfigure call alone, median", Services: n, Value: fmtMS(cm), Num: ms(cm), Err: err})
	mm, m90 := percentile(moved, 50), percentile(moved, 90)
	h.add(Row{Item: 1, Measure: "a route's path changed, reconfigure to first 200 on the new path, median / p90", Services: n,
		Value: fmtMS(mm) + " / " + fmtMS(m90), Num: ms(mm), Err: err})
}

// msList is durations as whole milliseconds, separated by spaces.
func msList(ds []time.Duration) string {
	parts := make([]string, len(ds))
	for i, d := range ds {
		parts[i] = strconv.FormatInt(d.Milliseconds(), 10)
	}
	return strings.Join(parts, " ")
}

func (w *world) reconfigureSample(ctx context.Context, s int) (latency, call time.Duration, err error) {
	name := fmt.Sprintf("new-%05d", s)
	// A new service's container starts on one of the Docker hosts that run the others: its
	// instance joins one of the world's nodes, in turn.
	if err := w.register(ctx, name, name+"-0", w.backends.addr(0), w.backends.port, s%w.nodes()); err != nil {
		return 0, 0, err
	}
	return w.reconfigureTo(ctx, name, servicePath(name))
}

// routeQuery is the reconfigure query that routes service name on paths (comma-separated), with
// its domain when the services are routed by domain, and skipCheck as the harness is set.
func (w *world) routeQuery(name, paths string) url.Values {
	ps := strings.Split(paths, ",")
	for i, p := range ps {
		ps[i] = w.h.routePath(p)
	}
	q := url.Values{"serviceName": {name}, "servicePath": {strings.Join(ps, ",")}}
	if t := w.h.pathType(); t != route.PathBeg {
		q.Set("pathType", string(t))
	}
	if w.h.cfg.Domains {
		q.Set("serviceDomain", serviceDomain(name))
	}
	if w.h.cfg.SkipCheck {
		q.Set("skipCheck", "true")
	}
	return q
}

// movedPath is the path that the samples of a route's path change give service name.
func movedPath(name string) string { return "/" + name + "-moved/" }

// reconfigureTo calls reconfigure for service name with path and polls path through the proxy, on
// new connections, until the backend answers: latency is from sending reconfigure to that first
// 200; call is the call's own duration.
func (w *world) reconfigureTo(ctx context.Context, name, path string) (latency, call time.Duration, err error) {
	q := w.routeQuery(name, path)
	pctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	served := make(chan time.Duration, 1)
	t0 := time.Now()
	go func() {
		c := newClient(5 * time.Second)
		for pctx.Err() == nil {
			if ok, _ := w.fromBackend(pctx, c, pathURL(w.httpPort, path), w.host(name)); ok {
				served <- time.Since(t0)
				return
			}
			select {
			case <-pctx.Done():
			case <-time.After(5 * time.Millisecond):
			}
		}
	}()
	if err := w.reconfigure(ctx, http.DefaultClient, q.Encode()); err != nil {
		return 0, 0, err
	}
	call = time.Since(t0)
	select {
	case latency = <-served:
		return latency, call, nil
	case <-pctx.Done():
		return 0, 0, fmt.Errorf("%s not served within %s of its reconfigure", name, callTimeout)
	}
}

func startProfile(path string) (func(), error) {
	f, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("cpu profile: %w", err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, fmt.Errorf("cpu profile: %w", err)
	}
	return func() { pprof.StopCPUProfile(); f.Close() }, nil
}

// Item 3: requests per second, proxied and direct, in the same run.

// throughputRows measures once HAProxy has settled (the reload that follows routes added through
// the runtime API is done, its old worker gone), so that neither run shares the cores with it. The
// two are measured in RPSRounds rounds, each a proxied run then a direct one, so that a drift of
// the machine weighs on both alike; each figure is the median of its rounds, and the ratio the
// median of the rounds' ratios, so that a burst of other work on the shared cores (Consul's own
// housekeeping takes a core for a second or two now and then) moves one round, not the figure.
func (h *harness) throughputRows(ctx context.Context, w *world, n int) {
	svc := serviceName(n / 2)
	if err := w.settle(ctx); err != nil {
		h.add(Row{Item: 3, Measure: "requests/s proxied / direct", Services: n, Err: err})
		return
	}
	h.idleRow(ctx, w, n)
	rounds := max(h.cfg.RPSRounds, 1)
	each := max(h.cfg.RPSDuration/time.Duration(rounds), time.Second)
	var proxied, direct, ratios []float64
	var failedP, failedD int64
	var perr, derr error
	for i := range rounds {
		// Consul's CPU time during each run tells a round that shared the cores with its
		// housekeeping.
		c0 := cpuTime(w.consul.pid)
		p, err := h.load(ctx, h.distinct(w.proxyURL(svc)), w.host(svc), each)
		perr = errors.Join(perr, err)
		c1 := cpuTime(w.consul.pid)
		d, err := h.load(ctx, h.distinct(fmt.Sprintf("http://127.0.0.1:%d%sx", w.backends.port, servicePath(svc))), "", each)
		derr = errors.Join(derr, err)
		c2 := cpuTime(w.consul.pid)
		proxied, direct = append(proxied, p.rps), append(direct, d.rps)
		failedP, failedD = failedP+p.failed, failedD+d.failed
		r := 0.0
		if d.rps > 0 {
			r = p.rps / d.rps
		}
		ratios = append(ratios, r)
		h.say("item 3, round %d of %d (%d services): %.0f requests/s proxied, %.0f direct (%.2f); Consul's CPU meanwhile: %s, %s",
			i+1, rounds, n, p.rps, d.rps, r, fmtMS(c1-c0), fmtMS(c2-c1))
	}
	tool := "wrk"
	if h.wrk == "" {
		tool = "Go load generator"
	}
	how := fmt.Sprintf(", %s -c%d, median of %dx%s", tool, h.cfg.Connections, rounds, each)
	if h.cfg.DistinctPaths {
		how += ", each request on a path of its own"
	}
	pm, dm := median(proxied), median(direct)
	h.add(Row{Item: 3, Measure: "requests/s proxied" + how, Services: n, Value: fmt.Sprintf("%.0f", pm), Num: pm, Err: perr})
	h.add(Row{Item: 3, Measure: "requests/s direct" + how, Services: n, Value: fmt.Sprintf("%.0f", dm), Num: dm, Err: derr})
	var err error
	if perr != nil || derr != nil {
		err = errors.Join(perr, derr)
	} else if failedP > 0 || failedD > 0 {
		err = fmt.Errorf("failed requests: %d proxied, %d direct", failedP, failedD)
	}
	ratio := median(ratios)
	h.add(Row{Item: 3, Measure: "requests/s proxied / direct, median of the rounds' ratios", Services: n,
		Value: fmt.Sprintf("%.2f (rounds %s)", ratio, fmtRatios(ratios)), Num: ratio,
		Target: ">= 0.50", Met: verdict(err == nil && ratio >= 0.5), Err: err})
}

// distinct marks where, with DistinctPaths, each request of item 3 to url (a service's path
// followed by "x") puts a token of its own, so that the route still matches: before the service's
// path for path_end routes, at the end for the others.
func (h *harness) distinct(url string) string {
	if !h.cfg.DistinctPaths {
		return url
	}
	if h.pathType() == route.PathEnd {
		i := strings.Index(url, "://")
		j := strings.IndexByte(url[i+3:], '/') + i + 3
		return url[:j] + "/" + distinctMark + url[j:]
	}
	return url + distinctMark
}

// idleFor is how long idleRow reads HAProxy's CPU time.
const idleFor = 2 * time.Second

// idleRow is the CPU time HAProxy's worker takes while the harness sends no request: its health
// checks of the instances (with -check) and its timers.
func (h *harness) idleRow(ctx context.Context, w *world, n int) {
	measure := fmt.Sprintf("HAProxy's CPU while no request is sent (%s): health checks, timers", idleFor)
	info, err := w.srv.HAProxy().ShowProc(ctx)
	if err == nil && len(info.Workers) == 0 {
		err = errors.New("no HAProxy worker")
	}
	if err != nil {
		h.add(Row{Item: 3, Measure: measure, Services: n, Err: err})
		return
	}
	c0 := cpuTime(info.Workers[0])
	select {
	case <-ctx.Done():
		h.add(Row{Item: 3, Measure: measure, Services: n, Err: ctx.Err()})
		return
	case <-time.After(idleFor):
	}
	share := 100 * float64(cpuTime(info.Workers[0])-c0) / float64(idleFor)
	h.add(Row{Item: 3, Measure: measure, Services: n, Value: fmt.Sprintf("%.0f%% of a core", share), Num: share})
}

// median is the median of vs (the mean of the middle two when their number is even); vs is not
// changed.
func median(vs []float64) float64 {
	if len(vs) == 0 {
		return 0
	}
	s := slices.Clone(vs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// fmtRatios lists ratios with two decimals: "0.55 0.53 0.57".
func fmtRatios(rs []float64) string {
	parts := make([]string, len(rs))
	for i, r := range rs {
		parts[i] = fmt.Sprintf("%.2f", r)
	}
	return strings.Join(parts, " ")
}

// Item 4: failed requests while reconfiguring.

// churnInFlight bounds the reconfigure calls of item 4 waiting at once: at 10,000 services a
// reload takes a second or more, and the calls that arrive meanwhile wait for the next one (which
// applies them together): under load a call may wait several seconds, and five a second keep
// tens of them waiting.
const churnInFlight = 64

// churnRows sends requests through the proxy to a routed service from Connections/4 keep-alive
// clients for ChurnDuration while reconfigure is called ChurnRate times a second, alternating a
// second path and a server timeout on another service: the timeout changes its backend's settings,
// which only a reload serves (a path alone goes through the runtime API).
func (h *harness) churnRows(ctx context.Context, w *world, n int) {
	target, targetHost := w.proxyURL(serviceName(n/2)), w.host(serviceName(n/2))
	other := serviceName((n/2 + 1) % n)
	before, perr := w.srv.HAProxy().ShowProc(ctx)

	cctx, cancel := context.WithTimeout(ctx, h.cfg.ChurnDuration)
	defer cancel()
	var total, failed atomic.Int64
	var errMu sync.Mutex
	var firstErrs []string
	var wg sync.WaitGroup
	clients := max(h.cfg.Connections/4, 1)
	for g := 0; g < clients; g++ {
		c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 1}}
		wg.Go(func() {
			defer c.CloseIdleConnections()
			for cctx.Err() == nil {
				ok, err := w.fromBackend(context.WithoutCancel(cctx), c, target, targetHost)
				total.Add(1)
				if !ok {
					failed.Add(1)
					errMu.Lock()
					if len(firstErrs) < 5 {
						firstErrs = append(firstErrs, fmt.Sprintf("%v", err))
					}
					errMu.Unlock()
				}
			}
		})
	}
	// HAProxy's memory while it reloads: a reload starts a worker that parses the whole config,
	// and the old one serves its connections until they end.
	peak := make(chan haproxyPeak, 1)
	go func() { peak <- w.sampleHAProxy(cctx) }()
	var calls, callErrs, skipped atomic.Int64
	inflight := make(chan struct{}, churnInFlight)
	tick := time.NewTicker(time.Second / time.Duration(h.cfg.ChurnRate))
	api := &http.Client{Timeout: callTimeout}
	for i := 0; cctx.Err() == nil; i++ {
		select {
		case <-cctx.Done():
			continue
		case <-tick.C:
		}
		paths := servicePath(other)
		if i%2 == 0 {
			paths += "," + servicePath(other+"-alt")
		}
		q := w.routeQuery(other, paths)
		if i%2 == 0 {
			q.Set("timeoutServer", "31")
		}
		select {
		case inflight <- struct{}{}:
		default:
			skipped.Add(1)
			continue
		}
		calls.Add(1)
		wg.Go(func() {
			defer func() { <-inflight }()
			if err := w.reconfigure(context.WithoutCancel(ctx), api, q.Encode()); err != nil {
				callErrs.Add(1)
				h.say("item 4: %v", err)
			}
		})
	}
	tick.Stop()
	wg.Wait()
	pk := <-peak
	after, aerr := w.srv.HAProxy().ShowProc(ctx)
	reloads := "?"
	if perr == nil && aerr == nil {
		reloads = strconv.Itoa(after.Reloads - before.Reloads)
	}
	how := fmt.Sprintf("%d reconfigure calls (%d failed, %d skipped: %d waiting), %s reloads, %d clients, %s",
		calls.Load(), callErrs.Load(), skipped.Load(), churnInFlight, reloads, clients, h.cfg.ChurnDuration)
	h.say("item 4: %s; first errors: %v", how, firstErrs)
	var err error
	if total.Load() == 0 {
		err = errors.New("no request was sent")
	}
	f := float64(failed.Load())
	h.add(Row{Item: 4, Measure: "failed requests while reconfiguring (" + how + ")", Services: n,
		Value: fmt.Sprintf("%d of %d", failed.Load(), total.Load()), Num: f, Target: "0", Met: verdict(err == nil && f == 0 && callErrs.Load() == 0), Err: err})
	h.add(Row{Item: 4, Measure: fmt.Sprintf("HAProxy's memory during it, every %s: the most RSS of its processes together / the most processes", peakEvery),
		Services: n, Value: fmt.Sprintf("%.0f MB / %d", pk.rss, pk.procs), Num: pk.rss, Err: pk.err})
}

// peakEvery is how often sampleHAProxy reads HAProxy's processes.
const peakEvery = 100 * time.Millisecond

// haproxyPeak is the most memory HAProxy's processes (master, workers and old workers) held
// together, and the most of them, in the samples of a run.
type haproxyPeak struct {
	rss   float64 // MB
	procs int
	err   error
}

// sampleHAProxy reads HAProxy's processes from the master CLI every peakEvery until ctx ends, and
// returns the peak. A process that ends between the CLI's answer and the read of its memory
// counts for nothing.
func (w *world) sampleHAProxy(ctx context.Context) haproxyPeak {
	var pk haproxyPeak
	tick := time.NewTicker(peakEvery)
	defer tick.Stop()
	for {
		info, err := w.srv.HAProxy().ShowProc(ctx)
		if err == nil {
			total := 0.0
			pids := append(append([]int{info.MasterPID}, info.Workers...), info.OldWorkers...)
			for _, pid := range pids {
				if mb, err := vmRSS(pid); err == nil {
					total += mb
				}
			}
			pk.rss, pk.procs = max(pk.rss, total), max(pk.procs, len(pids))
		} else if ctx.Err() == nil && pk.err == nil {
			pk.err = err
		}
		select {
		case <-ctx.Done():
			if pk.procs > 0 {
				pk.err = nil // some samples failed, as a reload may make them; the others count
			}
			return pk
		case <-tick.C:
		}
	}
}

// Where the time goes, at the largest size.

func (h *harness) phaseRows(ctx context.Context, w *world, n int) {
	add := func(measure string, d time.Duration, err error) {
		h.addPhase(Row{Measure: measure, Services: n, Value: fmtMS(d), Num: ms(d), Err: err})
	}
	add(fmt.Sprintf("setup: %d routes written to KV (transactions of 64 operations)", n), w.setupKV, nil)
	add(fmt.Sprintf("setup: %d instances registered (/v1/catalog/register, %d workers)", n*w.instances, regWorkers), w.setupCat, nil)

	store := consul.NewStore(w.client, instanceName)
	t0 := time.Now()
	routes, _, err := store.List(ctx)
	add("consul: read the route table from KV", time.Since(t0), err)

	t0 = time.Now()
	names := make([]string, len(routes))
	for i, r := range routes {
		names[i] = r.ServiceName
	}
	_, err = w.client.InstancesOf(ctx, names, consul.HealthPassing)
	add(fmt.Sprintf("consul: read the instances of %d services in one bulk read (as a new replica does)", len(routes)), time.Since(t0), err)

	t0 = time.Now()
	cfg, err := w.get(ctx, "/v1/docker-flow-proxy/config")
	add(fmt.Sprintf("render: GET /config (renders the table, %d KB)", len(cfg)/1024), time.Since(t0), err)

	served := w.srv.HAProxy().Config()
	t0 = time.Now()
	err = w.srv.HAProxy().Validate(ctx, served)
	add("haproxy -c of the served config", time.Since(t0), err)

	t0 = time.Now()
	err = w.srv.HAProxy().Reload(ctx, served)
	add("haproxy: Reload of the same config (haproxy -c, then SIGUSR2 until the new worker serves)", time.Since(t0), err)
}

func (w *world) get(ctx context.Context, path string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, w.apiURL+path, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("GET %s: %w", path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err == nil && resp.StatusCode != http.StatusOK {
		err = fmt.Errorf("GET %s: %s", path, resp.Status)
	}
	return b, err
}
