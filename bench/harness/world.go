package harness

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	capi "github.com/hashicorp/consul/api"

	"github.com/docker-flow-proxy/docker-flow-proxy/consul"
	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
	"github.com/docker-flow-proxy/docker-flow-proxy/route"
	"github.com/docker-flow-proxy/docker-flow-proxy/server"
)

const (
	instanceName = "docker-flow"
	// The instances are registered on nodes of their own (not the agent's, whose anti-entropy
	// would remove services its local state does not know), servicesPerNode services on each:
	// a registration costs Consul more the more services its node holds, and the server watches
	// each node with one blocking query (one connection; Consul allows 200 per client by
	// default), so 10,000 services make 50 nodes, as 50 Docker hosts would.
	servicesPerNode = 200
	txnOps          = 64 // Consul's limit of operations per transaction
	kvWorkers       = 4
	regWorkers      = 16
	setupWait       = 10 * time.Minute
	callTimeout     = 2 * time.Minute
)

// world is a Consul agent holding n routes of instances each, the backends they point to, and a
// server of docker-flow-proxy started on empty folders.
type world struct {
	h         *harness
	n         int
	consul    *agent
	capi      *capi.Client
	client    *consul.Client
	backends  *backends
	srv       *server.Server
	httpPort  int
	apiURL    string
	dir       string
	setupKV   time.Duration
	setupCat  time.Duration
	instances int
}

// serviceName is the name of the i-th routed service.
func serviceName(i int) string { return fmt.Sprintf("svc-%05d", i) }

// servicePath is the path of a routed service: with a trailing slash, so that /svc-1/ never
// matches /svc-10/.
func servicePath(name string) string { return "/" + name + "/" }

// pathType is the routes' path type.
func (h *harness) pathType() route.PathType {
	if h.cfg.PathType == "" {
		return route.PathBeg
	}
	return h.cfg.PathType
}

// routePath is the path, of the routes' path type, that routes the requests under p (which ends
// with '/'; the harness requests p followed by "x").
func (h *harness) routePath(p string) string {
	switch h.pathType() {
	case route.Path, route.PathEnd:
		return p + "x"
	case route.PathDir:
		return strings.TrimSuffix(p, "/")
	case route.PathReg:
		return "^" + p
	}
	return p
}

// serviceDomain is a service's domain when the services are routed by domain (Config.Domains).
func serviceDomain(name string) string { return name + ".bench.test" }

// host is the Host header of requests to service: its domain when the services are routed by
// domain, else "" (the client's default).
func (w *world) host(service string) string {
	if w.h.cfg.Domains {
		return serviceDomain(service)
	}
	return ""
}

func (h *harness) newWorld(ctx context.Context, n int) (*world, error) {
	w := &world{h: h, n: n, instances: h.cfg.Instances}
	maxConns := h.cfg.ConsulMaxConns
	if maxConns == 0 && h.cfg.StartRuns > 1 && slices.Contains(h.cfg.StartSizes, n) {
		// A stopped replica's blocking queries (one per Consul node, plus a few) still count
		// against Consul's 200 connections per client address until each one ends (up to 30 s
		// later): back-to-back replicas would be refused (429) from the fourth on.
		maxConns = 200 * (h.cfg.StartRuns + 1)
	}
	var err error
	if w.consul, err = h.startConsul(ctx, maxConns); err != nil {
		return nil, err
	}
	w.capi, err = capi.NewClient(&capi.Config{Address: w.consul.addr})
	if err != nil {
		w.close()
		return nil, fmt.Errorf("consul api client: %w", err)
	}
	w.client, err = consul.New([]string{w.consul.addr}, h.log)
	if err != nil {
		w.close()
		return nil, fmt.Errorf("consul client: %w", err)
	}
	w.backends, err = startBackends(h.cfg.Instances)
	if err != nil {
		w.close()
		return nil, err
	}
	sctx, cancel := context.WithTimeout(ctx, setupWait)
	defer cancel()
	start := time.Now()
	if err := w.writeRoutes(sctx); err != nil {
		w.close()
		return nil, err
	}
	w.setupKV = time.Since(start)
	h.say("%d routes written to KV in %s", n, fmtMS(w.setupKV))
	start = time.Now()
	if err := w.registerInstances(sctx); err != nil {
		w.close()
		return nil, err
	}
	w.setupCat = time.Since(start)
	h.say("%d instances registered in the catalog in %s (%.0f/s)", n*w.instances, fmtMS(w.setupCat),
		float64(n*w.instances)/w.setupCat.Seconds())
	start = time.Now()
	if err := w.snapshotConsul(); err != nil {
		w.close()
		return nil, err
	}
	h.say("Consul's raft log compacted (a snapshot) in %s", fmtMS(time.Since(start)))
	return w, nil
}

// snapshotConsul makes Consul take a snapshot of its state now. Consul compacts its raft log
// into a snapshot once some 16,000 entries were written since the last one, at a moment of its
// own within the next 30 s or so: after the setup's writes, that took a core for about a second
// in the middle of a measure (the proxied run of one of item 3's rounds read 0.29 of direct, with
// 1.46 s of Consul's CPU in its 2 s). A snapshot asked for through the API compacts the log as
// well. Consul servers run on machines of their own in production, not on the proxy's cores.
func (w *world) snapshotConsul() error {
	rc, _, err := w.capi.Snapshot().Save(nil)
	if err != nil {
		return fmt.Errorf("consul snapshot: %w", err)
	}
	defer rc.Close()
	if _, err := io.Copy(io.Discard, rc); err != nil {
		return fmt.Errorf("consul snapshot: %w", err)
	}
	return nil
}

// tbCall runs f, which may call tb.Fatal (testenv does), and returns the failure as an error when
// tb is not a *testing.T's (see the dfp-bench program).
func (h *harness) tbCall(f func()) error {
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	<-done
	if h.tb.Failed() || h.tb.Skipped() {
		return errors.New("a real program is missing or could not be started (see the messages above)")
	}
	return nil
}

func (h *harness) route(name string) route.Route {
	r := route.Route{ServiceName: name, ServicePath: []string{h.routePath(servicePath(name))}, PathType: h.pathType(),
		SkipCheck: h.cfg.SkipCheck}
	if h.cfg.Domains {
		r.ServiceDomain = []string{serviceDomain(name)}
	}
	return r
}

// writeRoutes writes the n routes straight into KV, in transactions of at most 64 operations, as
// the server's store lays them out.
func (w *world) writeRoutes(ctx context.Context) error {
	var batches []capi.TxnOps
	var ops capi.TxnOps
	for i := 0; i < w.n; i++ {
		r := w.h.route(serviceName(i))
		if err := r.Validate(); err != nil {
			return fmt.Errorf("route %s: %w", r.ServiceName, err)
		}
		kv := r.KV()
		if len(ops)+len(kv) > txnOps {
			batches = append(batches, ops)
			ops = nil
		}
		for k, v := range kv {
			key := instanceName + "/" + r.ServiceName + "/" + k
			ops = append(ops, &capi.TxnOp{KV: &capi.KVTxnOp{Verb: capi.KVSet, Key: key, Value: []byte(v)}})
		}
	}
	if len(ops) > 0 {
		batches = append(batches, ops)
	}
	return parallel(ctx, kvWorkers, len(batches), func(ctx context.Context, i int) error {
		ok, resp, _, err := w.capi.Txn().Txn(batches[i], (&capi.QueryOptions{}).WithContext(ctx))
		if err != nil {
			return fmt.Errorf("kv transaction %d: %w", i, err)
		}
		if !ok {
			return fmt.Errorf("kv transaction %d rolled back: %v", i, resp.Errors)
		}
		return nil
	})
}

// registerInstances registers instances of each routed service through /v1/catalog/register, one
// call per instance, with a bounded pool of workers. Instance k of every service is the backend
// listening on 127.0.0.(k+1).
func (w *world) registerInstances(ctx context.Context) error {
	total := w.n * w.instances
	return parallel(ctx, regWorkers, total, func(ctx context.Context, j int) error {
		name := serviceName(j / w.instances)
		k := j % w.instances
		return w.register(ctx, name, fmt.Sprintf("%s-%d", name, k), w.backends.addr(k), w.backends.port, j/w.instances/servicesPerNode)
	})
}

// nodes is the number of catalog nodes that the world's services were registered on.
func (w *world) nodes() int {
	return (w.n + servicesPerNode - 1) / servicesPerNode
}

func (w *world) register(ctx context.Context, service, id, addr string, port, node int) error {
	reg := &capi.CatalogRegistration{
		Node: fmt.Sprintf("bench-node-%d", node), Address: "127.0.0.1", SkipNodeUpdate: true,
		Service: &capi.AgentService{ID: id, Service: service, Address: addr, Port: port},
	}
	_, err := w.capi.Catalog().Register(reg, (&capi.WriteOptions{}).WithContext(ctx))
	if err != nil {
		return fmt.Errorf("catalog register %s: %w", id, err)
	}
	return nil
}

// startServer starts a server in this process on empty folders, for items 1, 3 and 4, and waits
// until every sampled route is answered by its backend through HAProxy.
func (w *world) startServer(ctx context.Context) error {
	var err error
	w.dir, err = os.MkdirTemp("", "dfp-bench")
	if err != nil {
		return fmt.Errorf("config folder: %w", err)
	}
	hap, ports, err := w.h.serverParts()
	if err != nil {
		return err
	}
	w.httpPort = ports[0]
	sctx, cancel := context.WithTimeout(ctx, w.h.cfg.StartupWait)
	defer cancel()
	t0 := time.Now()
	w.srv, err = server.Start(sctx, server.Config{
		ConsulAddresses: []string{w.consul.addr}, InstanceName: instanceName,
		BindAddress: "127.0.0.1", HTTPPort: ports[0], HTTPSPort: ports[1], APIPort: ports[2],
		ConfigDir: w.dir, Health: consul.HealthPassing, HAProxyBin: hap,
		StartupTimeout: w.h.cfg.StartupWait, HAProxyThreads: w.h.cfg.HAProxyThreads,
		CheckInterval: w.h.cfg.CheckInterval, Logger: w.h.log,
	})
	if err != nil {
		return fmt.Errorf("server start: %w", err)
	}
	w.h.say("the server of items 1, 3 and 4 started in %s", fmtMS(time.Since(t0)))
	w.apiURL = "http://" + w.srv.APIAddr()
	return w.waitServed(sctx, w.httpPort, sampleServices(w.n, 50))
}

// serverParts finds HAProxy and three free ports (HTTP, HTTPS, API) for a server.
func (h *harness) serverParts() (hap string, ports []int, err error) {
	err = h.tbCall(func() {
		hap = testenv.HAProxyBin(h.tb)
		ports = testenv.FreePorts(h.tb, 3)
	})
	return hap, ports, err
}

// sampleServices are up to k services spread over the n routed, the first and last included.
func sampleServices(n, k int) []string {
	if k > n {
		k = n
	}
	var out []string
	for j := 0; j < k; j++ {
		i := j * (n - 1) / max(k-1, 1)
		out = append(out, serviceName(i))
	}
	return out
}

// waitServed polls each service's path through the proxy on port, on new connections, until every
// one has been answered 200 by the backend.
func (w *world) waitServed(ctx context.Context, port int, services []string) error {
	left := map[string]bool{}
	for _, s := range services {
		left[s] = true
	}
	c := newClient(5 * time.Second)
	t0 := time.Now()
	var last string // why the last route not served yet was not
	for rounds := 1; len(left) > 0; rounds++ {
		for s := range left {
			ok, err := w.fromBackend(ctx, c, proxyURL(port, s), w.host(s))
			if ok {
				delete(left, s)
				continue
			}
			last = fmt.Sprintf("%s: %v", s, err)
		}
		if len(left) == 0 {
			w.h.say("%d sampled routes served after %d rounds of polling (%s); the last one missing: %s",
				len(services), rounds, fmtMS(time.Since(t0)), last)
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%d of %d sampled routes not served (%s): %w", len(left), len(services), last, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
	return nil
}

// serveAll requests every route's path through the proxy on port until each one has been
// answered 200 by the backend. sweepWorkers connections each take a share of the routes and
// pipeline their requests, sweepDepth at a time (HTTP/1.1: HAProxy answers them in order), so that
// the client costs the two cores little beside HAProxy and the backends; a route not answered 200
// is asked again, on a new connection, every 20 ms until ctx ends.
func (w *world) serveAll(ctx context.Context, port int) error {
	t0 := time.Now()
	per := (w.n + sweepWorkers - 1) / sweepWorkers
	err := parallel(ctx, sweepWorkers, sweepWorkers, func(ctx context.Context, k int) error {
		var left []string
		for i := k * per; i < min((k+1)*per, w.n); i++ {
			left = append(left, serviceName(i))
		}
		for {
			var err error
			left, err = pipelined(ctx, port, left, w.host)
			if len(left) == 0 {
				return nil
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("%d routes not served, %s the first (%v)", len(left), left[0], err)
			case <-time.After(20 * time.Millisecond):
			}
		}
	})
	if err == nil {
		w.h.say("all %d routes requested and served in %s", w.n, fmtMS(time.Since(t0)))
	}
	return err
}

// pipelined requests each service's path on one keep-alive connection to the proxy on port,
// sweepDepth requests at a time, with the Host header host(service) ("bench" when empty), and
// returns the services not answered 200 by a backend (those after a broken connection included)
// and why the first of them was not.
func pipelined(ctx context.Context, port int, services []string, host func(string) string) (left []string, why error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		return services, err
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	br, bw := bufio.NewReader(conn), bufio.NewWriter(conn)
	for len(services) > 0 {
		batch := services[:min(sweepDepth, len(services))]
		for _, s := range batch {
			h := host(s)
			if h == "" {
				h = "bench"
			}
			fmt.Fprintf(bw, "GET %sx HTTP/1.1\r\nHost: %s\r\n\r\n", servicePath(s), h)
		}
		if err := bw.Flush(); err != nil {
			return append(left, services...), err
		}
		for j, s := range batch {
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				return append(left, services[j:]...), err
			}
			_, err = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if err != nil {
				return append(left, services[j:]...), err
			}
			if resp.StatusCode != http.StatusOK || resp.Header.Get("X-Bench-Backend") == "" {
				if why == nil {
					why = fmt.Errorf("GET %s: %s", servicePath(s), resp.Status)
				}
				left = append(left, s)
			}
			if resp.Close {
				return append(left, services[j+1:]...), why
			}
		}
		services = services[len(batch):]
	}
	return left, why
}

// proxyURL is a URL of service's path through the proxy listening on port.
func proxyURL(port int, service string) string { return pathURL(port, servicePath(service)) }

// pathURL is a URL under path (which ends with '/') through the proxy listening on port.
func pathURL(port int, path string) string {
	return "http://127.0.0.1:" + strconv.Itoa(port) + path + "x"
}

// proxyURL is a URL of service's path through the world's server.
func (w *world) proxyURL(service string) string { return proxyURL(w.httpPort, service) }

// fromBackend reports whether a GET of url is answered 200 by a backend of this world.
func (w *world) fromBackend(ctx context.Context, c *http.Client, url, host string) (bool, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return false, err
	}
	if host != "" {
		req.Host = host
	}
	resp, err := c.Do(req)
	if err != nil {
		return false, err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	if resp.StatusCode != http.StatusOK || resp.Header.Get("X-Bench-Backend") == "" {
		return false, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return true, nil
}

// reconfigure calls the API and returns an error unless it answers 200 with Status OK.
func (w *world) reconfigure(ctx context.Context, c *http.Client, query string) error {
	ctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, w.apiURL+"/v1/docker-flow-proxy/reconfigure?"+query, nil)
	if err != nil {
		return err
	}
	resp, err := c.Do(req)
	if err != nil {
		return fmt.Errorf("reconfigure %s: %w", query, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
	var r struct{ Status, Message string }
	if err := json.Unmarshal(body, &r); err != nil || resp.StatusCode != http.StatusOK || r.Status != "OK" {
		return fmt.Errorf("reconfigure %s: %s %s", query, resp.Status, bytes.TrimSpace(body))
	}
	return nil
}

func (w *world) close() {
	if w.srv != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		if err := w.srv.Stop(ctx); err != nil {
			w.h.say("stopping the server: %v", err)
		}
		cancel()
	}
	if w.backends != nil {
		w.backends.close()
	}
	if w.consul != nil {
		w.consul.stop()
	}
	if w.dir != "" {
		_ = os.RemoveAll(w.dir)
	}
}

// newClient opens a new connection per request, as a client after a reconfigure would.
func newClient(timeout time.Duration) *http.Client {
	return &http.Client{Timeout: timeout, Transport: &http.Transport{DisableKeepAlives: true}}
}

// backends is one HTTP handler listening on 127.0.0.1, 127.0.0.2, ... on the same port: each
// address stands for one instance of every service.
type backends struct {
	port     int
	servers  []*http.Server
	requests atomic.Int64
	wg       sync.WaitGroup
}

func (b *backends) addr(k int) string { return fmt.Sprintf("127.0.0.%d", k+1) }

func startBackends(instances int) (*backends, error) {
	var lastErr error
	for attempt := 0; attempt < 10; attempt++ {
		b := &backends{}
		ls, err := b.listen(instances)
		if err != nil {
			lastErr = err
			continue
		}
		for _, l := range ls {
			s := &http.Server{Handler: b, ReadHeaderTimeout: 10 * time.Second}
			b.servers = append(b.servers, s)
			b.wg.Add(1)
			go func() { defer b.wg.Done(); _ = s.Serve(l) }()
		}
		return b, nil
	}
	return nil, fmt.Errorf("backends on 127.0.0.1-%d: %w", instances, lastErr)
}

// listen binds the first address on a free port, then the others on the same port.
func (b *backends) listen(instances int) ([]net.Listener, error) {
	first, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	b.port = first.Addr().(*net.TCPAddr).Port
	ls := []net.Listener{first}
	for k := 1; k < instances; k++ {
		l, err := net.Listen("tcp", net.JoinHostPort(b.addr(k), strconv.Itoa(b.port)))
		if err != nil {
			for _, l := range ls {
				l.Close()
			}
			return nil, err
		}
		ls = append(ls, l)
	}
	return ls, nil
}

func (b *backends) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b.requests.Add(1)
	w.Header().Set("X-Bench-Backend", "1")
	_, _ = io.WriteString(w, "ok\n")
}

func (b *backends) close() {
	for _, s := range b.servers {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_ = s.Shutdown(ctx)
		cancel()
	}
	b.wg.Wait()
}

// parallel runs f(0..n-1) on at most workers goroutines and returns the first error; the others
// stop taking work after it.
func parallel(ctx context.Context, workers, n int, f func(ctx context.Context, i int) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var next atomic.Int64
	var once sync.Once
	var first error
	var wg sync.WaitGroup
	for g := 0; g < workers; g++ {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= n || ctx.Err() != nil {
					return
				}
				if err := f(ctx, i); err != nil {
					once.Do(func() { first = err; cancel() })
					return
				}
			}
		})
	}
	wg.Wait()
	if first == nil && ctx.Err() != nil && n > 0 && int(next.Load()) < n {
		return ctx.Err()
	}
	return first
}

// settleTimeout bounds the wait for HAProxy to settle after a series of reconfigures.
const settleTimeout = 60 * time.Second

// settle waits until HAProxy runs its config as written (no route waits on a spare backend for its
// reload) and has no old worker left.
func (w *world) settle(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, settleTimeout)
	defer cancel()
	hap := w.srv.HAProxy()
	for {
		if hap.Settled() {
			info, err := hap.ShowProc(ctx)
			if err == nil && len(info.OldWorkers) == 0 && hap.Settled() {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("haproxy did not settle within %s (routes on spare backends, or old workers)", settleTimeout)
		case <-time.After(100 * time.Millisecond):
		}
	}
}
