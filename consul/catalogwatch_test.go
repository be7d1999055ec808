package consul

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

// consulPut sends a PUT with a JSON body to the agent's HTTP API and fails the test on error.
func consulPut(t *testing.T, agent *testenv.Consul, path string, body any) {
	t.Helper()
	b, err := json.Marshal(body)
	if err != nil {
		t.Fatal(err)
	}
	agent.Put(path, string(b))
}

// assertSameAsInstances checks that a reported list is Client.Instances' list of the moment.
func assertSameAsInstances(t *testing.T, c *Client, service string, filter HealthFilter, reported []route.Instance) {
	t.Helper()
	got, err := c.Instances(testContext(t), service, filter)
	if err != nil || !reflect.DeepEqual(got, reported) {
		t.Errorf("Instances(%s, %s) = %v, %v; the watcher reported %v", service, filter, got, err, reported)
	}
}

// A second node, registered as an external node (as a Docker host of its own would be): its
// services are followed, the node's address stands in for a service without one, and the node's
// checks apply to every service on it.
func TestCatalogWatchSecondNode(t *testing.T) {
	t.Parallel()
	agent := testenv.StartConsul(t)
	c, _ := newClient(t, agent.Addr)
	agent.RegisterService("web", "web-local", "10.0.0.1", 80)
	waitInstances(t, c, "web", HealthAny, 1)

	passing := startWatcher(t, c, nil, HealthPassing, []string{"web"}, nil)
	anyRun := startWatcher(t, c, nil, HealthAny, []string{"web"}, nil)
	passing.waitFor(t, 5*time.Second, "with the local instance", instancesOf("web", inst("10.0.0.1", 80)))
	anyRun.waitFor(t, 5*time.Second, "with the local instance", instancesOf("web", inst("10.0.0.1", 80)))

	consulPut(t, agent, "/v1/catalog/register", map[string]any{
		"Node": "host-2", "Address": "10.1.0.2",
		"Service": map[string]any{"ID": "web-remote", "Service": "web", "Port": 8080},
		"Check":   map[string]any{"CheckID": "host-2-alive", "Name": "host alive", "Status": "passing"},
	})
	both := instancesOf("web", inst("10.0.0.1", 80), inst("10.1.0.2", 8080))
	u, took := passing.waitFor(t, 5*time.Second, "with the second node's instance", both)
	t.Logf("a second node's registration reported after %s", took)
	anyRun.waitFor(t, 5*time.Second, "with the second node's instance", both)
	assertSameAsInstances(t, c, "web", HealthPassing, u.Instances)

	// The node's check turns critical: every service on the node is out, for the passing filter.
	consulPut(t, agent, "/v1/catalog/register", map[string]any{
		"Node": "host-2", "Address": "10.1.0.2",
		"Check": map[string]any{"CheckID": "host-2-alive", "Name": "host alive", "Status": "critical"},
	})
	u, _ = passing.waitFor(t, 5*time.Second, "without the critical node's instance", instancesOf("web", inst("10.0.0.1", 80)))
	assertSameAsInstances(t, c, "web", HealthPassing, u.Instances)
	anyRun.expectNone(t, 700*time.Millisecond, "a check change, with the filter any")

	// The node leaves the catalog.
	consulPut(t, agent, "/v1/catalog/deregister", map[string]any{"Node": "host-2"})
	anyRun.waitFor(t, 5*time.Second, "without the deregistered node", instancesOf("web", inst("10.0.0.1", 80)))
	passing.expectNone(t, 700*time.Millisecond, "the critical node leaving (its instance was out already)")
}

// A change reaches exactly the services it touches: a service's check its own service, the node's
// address or check every service on the node, a service's port that service; the others are not
// reported again.
func TestCatalogWatchReportsOnlyTheServicesAChangeTouches(t *testing.T) {
	t.Parallel()
	agent := testenv.StartConsul(t)
	c, _ := newClient(t, agent.Addr)
	register := func(address, service string, port int, checkID, status string) {
		body := map[string]any{"Node": "host-3", "Address": address}
		if service != "" {
			body["Service"] = map[string]any{"ID": service + "-1", "Service": service, "Port": port}
		}
		if checkID != "" {
			check := map[string]any{"CheckID": checkID, "Name": checkID, "Status": status}
			if service != "" {
				check["ServiceID"] = service + "-1"
			}
			body["Check"] = check
		}
		consulPut(t, agent, "/v1/catalog/register", body)
	}
	register("10.3.0.1", "api", 8080, "api-check", "passing")
	register("10.3.0.1", "web", 80, "web-check", "passing")
	register("10.3.0.1", "", 0, "host-3-alive", "passing")
	waitInstances(t, c, "web", HealthAny, 1)
	r := startWatcher(t, c, nil, HealthPassing, []string{"api", "web"}, nil)
	r.waitAll(t, 5*time.Second, map[string]func(Update) bool{
		"api": instancesOf("api", inst("10.3.0.1", 8080)),
		"web": instancesOf("web", inst("10.3.0.1", 80)),
	})

	register("10.3.0.1", "api", 8080, "api-check", "critical")
	r.waitFor(t, 5*time.Second, "without the critical api instance", instancesOf("api"))
	r.expectNone(t, 500*time.Millisecond, "api's check turning critical, for web")

	register("10.3.0.1", "web", 81, "web-check", "passing")
	r.waitFor(t, 5*time.Second, "with web's new port", instancesOf("web", inst("10.3.0.1", 81)))
	r.expectNone(t, 500*time.Millisecond, "web's port changing, for api")

	register("10.3.0.1", "api", 8080, "api-check", "passing")
	r.waitFor(t, 5*time.Second, "with api passing again", instancesOf("api", inst("10.3.0.1", 8080)))
	register("10.3.0.2", "", 0, "", "")
	r.waitAll(t, 5*time.Second, map[string]func(Update) bool{
		"api": instancesOf("api", inst("10.3.0.2", 8080)),
		"web": instancesOf("web", inst("10.3.0.2", 81)),
	})
	register("10.3.0.2", "", 0, "host-3-alive", "critical")
	r.waitAll(t, 5*time.Second, map[string]func(Update) bool{
		"api": instancesOf("api"),
		"web": instancesOf("web"),
	})
	r.expectNone(t, 500*time.Millisecond, "after the node's check")
}

// Each health filter keeps what Client.Instances keeps while a check goes critical -> warning ->
// passing -> critical, and a change of another service reports nothing.
func TestCatalogWatchHealthFilters(t *testing.T) {
	t.Parallel()
	agent := testenv.StartConsul(t)
	c, _ := newClient(t, agent.Addr)
	register(t, agent, map[string]any{
		"ID": "ttl-1", "Name": "ttl", "Address": "10.0.3.1", "Port": 80,
		"Check": map[string]any{"CheckID": "ttl-1-check", "TTL": "60s"},
	})
	agent.RegisterService("ttl", "plain-1", "10.0.3.2", 80) // no check: passing
	waitInstances(t, c, "ttl", HealthAny, 2)

	filters := []HealthFilter{HealthPassing, HealthWarning, HealthAny}
	runs := map[HealthFilter]*watchRun{}
	for _, f := range filters {
		runs[f] = startWatcher(t, c, nil, f, []string{"ttl"}, nil)
	}
	checked, plain := inst("10.0.3.1", 80), inst("10.0.3.2", 80)
	steps := []struct {
		action string
		want   map[HealthFilter][]route.Instance // nil: no update expected
	}{
		{"", map[HealthFilter][]route.Instance{HealthPassing: {plain}, HealthWarning: {plain}, HealthAny: {checked, plain}}},
		{"warn", map[HealthFilter][]route.Instance{HealthWarning: {checked, plain}}},
		{"pass", map[HealthFilter][]route.Instance{HealthPassing: {checked, plain}}},
		{"fail", map[HealthFilter][]route.Instance{HealthPassing: {plain}, HealthWarning: {plain}}},
	}
	for _, step := range steps {
		if step.action != "" {
			agentPut(t, agent, "/v1/agent/check/"+step.action+"/ttl-1-check")
		}
		for _, f := range filters {
			want, ok := step.want[f]
			if !ok {
				continue
			}
			u, took := runs[f].waitFor(t, 5*time.Second, fmt.Sprintf("after %q with %s", step.action, f), instancesOf("ttl", want...))
			if step.action != "" {
				t.Logf("check %s reported with the filter %s after %s", step.action, f, took)
			}
			assertSameAsInstances(t, c, "ttl", f, u.Instances)
		}
		for _, f := range filters {
			if _, ok := step.want[f]; !ok {
				runs[f].expectNone(t, 300*time.Millisecond, fmt.Sprintf("check %s with the filter %s", step.action, f))
			}
		}
	}

	// Another service changes, its check too: nothing to report about ttl.
	register(t, agent, map[string]any{
		"ID": "other-1", "Name": "other", "Address": "10.0.4.1", "Port": 80,
		"Check": map[string]any{"CheckID": "other-1-check", "TTL": "60s"},
	})
	agentPut(t, agent, "/v1/agent/check/pass/other-1-check")
	agent.DeregisterService("other-1")
	for _, f := range filters {
		runs[f].expectNone(t, 500*time.Millisecond, "changes of another service")
	}
}

// An instance whose check is critical is never reported by the passing filter: not when it is
// registered (its service and its check come in one transaction, read by two queries), and not
// when it is deregistered (both go away together).
func TestCatalogWatchNeverReportsACriticalInstance(t *testing.T) {
	t.Parallel()
	agent := testenv.StartConsul(t)
	c, _ := newClient(t, agent.Addr)
	agent.RegisterService("svc", "svc-ok", "10.0.5.1", 80)
	waitInstances(t, c, "svc", HealthAny, 1)
	r := startWatcher(t, c, nil, HealthPassing, []string{"svc"}, nil)
	r.waitFor(t, 5*time.Second, "with the healthy instance", instancesOf("svc", inst("10.0.5.1", 80)))

	var seen []string
	var mu sync.Mutex
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case u := <-r.w.Updates():
				mu.Lock()
				seen = append(seen, describe(u))
				mu.Unlock()
			case <-stop:
				return
			}
		}
	}()
	const rounds = 20
	for i := range rounds {
		id := fmt.Sprintf("svc-bad-%d", i)
		register(t, agent, map[string]any{
			"ID": id, "Name": "svc", "Address": fmt.Sprintf("10.0.6.%d", i+1), "Port": 80,
			"Check": map[string]any{"CheckID": id + "-check", "TTL": "60s"}, // starts critical
		})
		time.Sleep(20 * time.Millisecond)
		agent.DeregisterService(id)
	}
	time.Sleep(500 * time.Millisecond)
	close(stop)
	<-done
	mu.Lock()
	defer mu.Unlock()
	if len(seen) != 0 {
		t.Errorf("%d rounds of a critical instance registered and deregistered: updates %v, want none", rounds, seen)
	}
}

// countingConns counts the TCP connections a client opens and those open at once.
type countingConns struct {
	dials, open, maxOpen atomic.Int64
}

func (cc *countingConns) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	conn, err := (&net.Dialer{Timeout: 5 * time.Second}).DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	cc.dials.Add(1)
	n := cc.open.Add(1)
	for {
		m := cc.maxOpen.Load()
		if n <= m || cc.maxOpen.CompareAndSwap(m, n) {
			break
		}
	}
	return &countedConn{Conn: conn, cc: cc}, nil
}

type countedConn struct {
	net.Conn
	cc   *countingConns
	once sync.Once
}

func (c *countedConn) Close() error {
	c.once.Do(func() { c.cc.open.Add(-1) })
	return c.Conn.Close()
}

// countingClient is a Client of one agent whose connections are counted.
func countingClient(t *testing.T, addr string) (*Client, *countingConns) {
	t.Helper()
	cc := &countingConns{}
	cfg := api.DefaultConfig()
	cfg.Address = addr
	cfg.Transport.DialContext = cc.dial
	hc, err := api.NewHttpClient(cfg.Transport, cfg.TLSConfig)
	if err != nil {
		t.Fatal(err)
	}
	hc.Transport = serverErrorTransport{base: hc.Transport}
	cfg.HttpClient = hc
	a, err := api.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return &Client{agents: []agent{{addr: addr, api: a}}, logger: slog.New(slog.DiscardHandler), timeout: DefaultRequestTimeout}, cc
}

// Following 1,000 services takes as many connections to Consul as following one (Consul refuses
// more than 200 per client by default), and a change of one of them is still reported at once.
func TestCatalogWatchThousandServicesConstantConnections(t *testing.T) {
	t.Parallel()
	agent := testenv.StartConsul(t)
	const n = 1000
	services := make([]string, n)
	for i := range services {
		services[i] = fmt.Sprintf("svc-%04d", i)
		if i%2 == 0 { // half of them have an instance
			agent.RegisterService(services[i], services[i]+"-1", "10.2.0.1", 1000+i)
		}
	}
	c, cc := countingClient(t, agent.Addr)
	r := startWatcher(t, c, nil, HealthPassing, services, nil)
	pending := map[string]bool{}
	for _, s := range services {
		pending[s] = true
	}
	deadline := time.Now().Add(30 * time.Second)
	for len(pending) > 0 {
		u, _ := r.waitFor(t, time.Until(deadline), fmt.Sprintf("the first states (%d more)", len(pending)), func(Update) bool { return true })
		if u.Err != nil {
			t.Fatalf("an outage while following %d services: %v", n, u.Err)
		}
		want := []route.Instance{}
		var i int
		fmt.Sscanf(u.Service, "svc-%04d", &i)
		if i%2 == 0 {
			want = []route.Instance{inst("10.2.0.1", 1000+i)}
		}
		if !reflect.DeepEqual(u.Instances, want) {
			t.Errorf("%s: %v, want %v", u.Service, u.Instances, want)
		}
		delete(pending, u.Service)
	}
	time.Sleep(200 * time.Millisecond)
	// One node: the node list, the node's services, the checks; and a fresh read or two.
	const bound = 6
	t.Logf("after the first states: %d connections opened, %d at most at once", cc.dials.Load(), cc.maxOpen.Load())
	if m := cc.maxOpen.Load(); m > bound {
		t.Errorf("%d connections open at once to follow %d services, want at most %d", m, n, bound)
	}

	start := time.Now()
	agent.RegisterService("svc-0501", "svc-0501-1", "10.2.0.2", 8080)
	r.waitFor(t, 5*time.Second, "with svc-0501's new instance", instancesOf("svc-0501", inst("10.2.0.2", 8080)))
	t.Logf("a registration among %d followed services reported after %s", n, time.Since(start))
	r.expectNone(t, 500*time.Millisecond, "one service changed, no other")
	if m := cc.maxOpen.Load(); m > bound {
		t.Errorf("%d connections open at once, want at most %d", m, bound)
	}
	if d := cc.dials.Load(); d > 2*bound {
		t.Errorf("%d connections opened in all, want at most %d", d, 2*bound)
	}
}

// InstancesOf reads many services at once, each as Instances does.
func TestInstancesOf(t *testing.T) {
	t.Parallel()
	agent := testenv.StartConsul(t)
	c, _ := newClient(t, agent.Addr)
	agent.RegisterService("a", "a-1", "10.0.0.1", 80)
	agent.RegisterService("a", "a-2", "10.0.0.2", 80)
	register(t, agent, map[string]any{
		"ID": "b-1", "Name": "b", "Address": "10.0.1.1", "Port": 80,
		"Check": map[string]any{"CheckID": "b-1-check", "TTL": "60s"}, // critical
	})
	register(t, agent, map[string]any{"ID": "bad-1", "Name": "bad", "Address": "not a host", "Port": 80})
	consulPut(t, agent, "/v1/catalog/register", map[string]any{
		"Node": "host-2", "Address": "10.1.0.2",
		"Service": map[string]any{"ID": "a-remote", "Service": "a", "Port": 8080},
	})
	waitInstances(t, c, "a", HealthAny, 3)
	ctx := testContext(t)
	names := []string{"a", "b", "bad", "unknown"}
	for _, f := range []HealthFilter{HealthPassing, HealthWarning, HealthAny} {
		got, err := c.InstancesOf(ctx, names, f)
		if err != nil {
			t.Fatalf("InstancesOf(%s): %v", f, err)
		}
		if len(got) != len(names) {
			t.Errorf("InstancesOf(%s) has %d services, want %d", f, len(got), len(names))
		}
		for _, s := range names {
			one, err := c.Instances(ctx, s, f)
			if err != nil {
				t.Fatal(err)
			}
			if l, ok := got[s]; !ok || l == nil || !reflect.DeepEqual(l, one) {
				t.Errorf("InstancesOf(%s)[%s] = %v (listed: %v), Instances = %v", f, s, l, ok, one)
			}
		}
	}
	if got, _ := c.InstancesOf(ctx, []string{"a"}, HealthPassing); !reflect.DeepEqual(got["a"], []route.Instance{inst("10.0.0.1", 80), inst("10.0.0.2", 80), inst("10.1.0.2", 8080)}) {
		t.Errorf("a = %v", got["a"])
	}
	if _, err := c.InstancesOf(ctx, []string{"a", "x/y"}, HealthPassing); err == nil || !strings.Contains(err.Error(), "x/y") {
		t.Errorf("an invalid name: %v, want an error naming it", err)
	}
	if _, err := c.InstancesOf(ctx, []string{"a"}, "healthy"); err == nil {
		t.Error("an invalid filter: no error")
	}
}

// registerNode registers an external node (a Docker host of its own) with a passing node check
// and, unless port is 0, an instance of web.
func registerNode(t *testing.T, agent *testenv.Consul, node, address string, port int) {
	t.Helper()
	body := map[string]any{
		"Node": node, "Address": address,
		"Check": map[string]any{"CheckID": node + "-alive", "Name": "host alive", "Status": "passing"},
	}
	if port != 0 {
		body["Service"] = map[string]any{"ID": "web-" + node, "Service": "web", "Port": port}
	}
	consulPut(t, agent, "/v1/catalog/register", body)
}

// More nodes than the limit of node watches are followed by one watch: the connections to Consul
// stay as few as with one node, and every kind of change is still reported (an instance added on a
// node, a port changed, a node check turning critical, a node's address, a new node, a node gone).
// When the nodes are few again, each has its watch again.
func TestCatalogWatchManyNodesConstantConnections(t *testing.T) {
	t.Parallel()
	agent := testenv.StartConsul(t)
	const nodes, limit = 20, 8
	served := map[string]route.Instance{} // by node: the instances the watch must report
	list := func() []route.Instance {
		out := slices.Collect(maps.Values(served))
		slices.SortFunc(out, func(a, b route.Instance) int {
			return cmp.Or(strings.Compare(a.Address, b.Address), cmp.Compare(a.Port, b.Port))
		})
		return out
	}
	for i := 1; i <= nodes; i++ {
		node, addr := fmt.Sprintf("host-%02d", i), fmt.Sprintf("10.3.0.%d", i)
		registerNode(t, agent, node, addr, 80)
		served[node] = inst(addr, 80)
	}
	c, cc := countingClient(t, agent.Addr)
	r := startWatcher(t, c, nil, HealthPassing, []string{"web"}, func(w *Watcher) { w.SetNodeWatchLimit(limit) })
	r.waitFor(t, 10*time.Second, "with the instances of every node", instancesOf("web", list()...))
	time.Sleep(200 * time.Millisecond)
	// The node list, the checks, the pool's query; the pool's reads of the nodes, a fresh read.
	const bound = 3 + bulkReadWorkers + 2
	t.Logf("%d nodes: %d connections opened, %d at most at once", nodes+1, cc.dials.Load(), cc.maxOpen.Load())
	if m := cc.maxOpen.Load(); m > bound {
		t.Errorf("%d connections open at once to follow %d nodes, want at most %d", m, nodes+1, bound)
	}
	if !strings.Contains(r.logs.String(), "one watch follows them all") {
		t.Errorf("the switch to one watch of every node is not logged:\n%s", r.logs)
	}

	change := func(what string, do func()) {
		t.Helper()
		start := time.Now()
		do()
		u, _ := r.waitFor(t, 5*time.Second, what, instancesOf("web", list()...))
		t.Logf("%s: reported after %s", what, time.Since(start).Round(time.Millisecond))
		assertSameAsInstances(t, c, "web", HealthPassing, u.Instances)
	}
	change("a port changed on one node", func() {
		registerNode(t, agent, "host-07", "10.3.0.7", 8080)
		served["host-07"] = inst("10.3.0.7", 8080)
	})
	change("a new node", func() {
		registerNode(t, agent, "host-21", "10.3.0.21", 80)
		served["host-21"] = inst("10.3.0.21", 80)
	})
	change("a node check turned critical", func() {
		consulPut(t, agent, "/v1/catalog/register", map[string]any{
			"Node": "host-03", "Address": "10.3.0.3",
			"Check": map[string]any{"CheckID": "host-03-alive", "Name": "host alive", "Status": "critical"},
		})
		delete(served, "host-03")
	})
	change("a node's address changed, no service did", func() {
		consulPut(t, agent, "/v1/catalog/register", map[string]any{"Node": "host-09", "Address": "10.3.9.9"})
		served["host-09"] = inst("10.3.9.9", 80)
	})
	// A node without a service joins (the watch reads it at once), then gets one.
	registerNode(t, agent, "host-22", "10.3.0.22", 0)
	change("an instance on the node that had none", func() {
		registerNode(t, agent, "host-22", "10.3.0.22", 80)
		served["host-22"] = inst("10.3.0.22", 80)
	})
	if m := cc.maxOpen.Load(); m > bound {
		t.Errorf("%d connections open at once, want at most %d", m, bound)
	}

	// Few nodes again: a watch each.
	change("nodes gone", func() {
		for i := 1; i <= 18; i++ {
			node := fmt.Sprintf("host-%02d", i)
			consulPut(t, agent, "/v1/catalog/deregister", map[string]any{"Node": node})
			delete(served, node)
		}
	})
	for end := time.Now().Add(5 * time.Second); !strings.Contains(r.logs.String(), "a watch per node") && time.Now().Before(end); {
		time.Sleep(20 * time.Millisecond)
	}
	if !strings.Contains(r.logs.String(), "a watch per node") {
		t.Fatalf("with 5 nodes of a limit of %d, the nodes are not watched one by one again:\n%s", limit, r.logs)
	}
	change("a port changed, with a watch per node", func() {
		registerNode(t, agent, "host-20", "10.3.0.20", 8081)
		served["host-20"] = inst("10.3.0.20", 8081)
	})
}
