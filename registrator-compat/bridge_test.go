package registrator

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/client"
	"github.com/docker/go-connections/nat"
	capi "github.com/hashicorp/consul/api"

	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
)

// world is one test's real Docker engine and Consul agent, and a registrar between them.
type world struct {
	t      *testing.T
	consul *testenv.Consul
	agent  *capi.Agent
	docker *client.Client
	image  string
	n      int
}

func newWorld(t *testing.T) *world {
	t.Helper()
	d := testenv.Docker(t)
	img := testenv.WebServerImage(t)
	c := testenv.StartConsul(t)
	api, err := capi.NewClient(&capi.Config{Address: c.Addr})
	if err != nil {
		t.Fatal(err)
	}
	return &world{t: t, consul: c, agent: api.Agent(), docker: d, image: img}
}

// startRegistrar runs a registrar until the test ends (or stop is called).
func (w *world) startRegistrar(cfg Config) (stop func()) {
	w.t.Helper()
	engine, err := NewEngine()
	if err != nil {
		w.t.Fatal(err)
	}
	reg, err := NewConsul("consul://" + w.consul.Addr)
	if err != nil {
		w.t.Fatal(err)
	}
	if cfg.Hostname == "" {
		cfg.Hostname = "reg-host"
	}
	if cfg.RetryInterval == 0 {
		cfg.RetryInterval = 200 * time.Millisecond
	}
	level := slog.LevelWarn
	if testing.Verbose() {
		level = slog.LevelInfo
	}
	cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = NewBridge(engine, reg, cfg).Run(ctx) }()
	stopped := false
	stop = func() {
		if !stopped {
			stopped = true
			cancel()
			<-done
			engine.Close()
		}
	}
	w.t.Cleanup(stop)
	return stop
}

type runOpts struct {
	env    []string
	labels map[string]string
	ports  []string // exposed ports published on 127.0.0.1, e.g. "8080/tcp"; default 8080/tcp
}

// run starts a container of the test image and returns its name and ID.
func (w *world) run(o runOpts) (name, id string) {
	w.t.Helper()
	w.n++
	name = strings.ToLower(fmt.Sprintf("%s-%d-%d", testenv.ComposeProject(w.t), w.n, time.Now().UnixNano()%100000))
	labels := testenv.LabelFor(w.t)
	for k, v := range o.labels {
		labels[k] = v
	}
	if o.ports == nil {
		o.ports = []string{"8080/tcp"}
	}
	exposed := nat.PortSet{}
	bindings := nat.PortMap{}
	for _, p := range o.ports {
		exposed[nat.Port(p)] = struct{}{}
		bindings[nat.Port(p)] = []nat.PortBinding{{HostIP: "127.0.0.1"}}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	created, err := w.docker.ContainerCreate(ctx,
		&container.Config{Image: w.image, Env: o.env, Labels: labels, ExposedPorts: exposed},
		&container.HostConfig{PortBindings: bindings}, nil, nil, name)
	if err != nil {
		w.t.Fatalf("create container: %v", err)
	}
	if err := w.docker.ContainerStart(ctx, created.ID, container.StartOptions{}); err != nil {
		w.t.Fatalf("start container: %v", err)
	}
	return name, created.ID
}

// hostPort is where the engine published a container's port on 127.0.0.1.
func (w *world) hostPort(id, port string) int {
	w.t.Helper()
	info, err := w.docker.ContainerInspect(context.Background(), id)
	if err != nil {
		w.t.Fatal(err)
	}
	for _, b := range info.NetworkSettings.Ports[nat.Port(port)] {
		if p, err := strconv.Atoi(b.HostPort); err == nil {
			return p
		}
	}
	w.t.Fatalf("port %s of %s is not published", port, id)
	return 0
}

func (w *world) stop(id string) {
	w.t.Helper()
	timeout := 5
	if err := w.docker.ContainerStop(context.Background(), id, container.StopOptions{Timeout: &timeout}); err != nil {
		w.t.Fatalf("stop container: %v", err)
	}
}

func (w *world) remove(id string) {
	w.t.Helper()
	if err := w.docker.ContainerRemove(context.Background(), id, container.RemoveOptions{Force: true}); err != nil {
		w.t.Fatalf("remove container: %v", err)
	}
}

// services lists the agent's services, or nil when the agent does not answer.
func (w *world) services() map[string]*capi.AgentService {
	s, err := w.agent.Services()
	if err != nil {
		return nil
	}
	return s
}

// waitFor polls the agent's services until cond holds (bounded).
func (w *world) waitFor(what string, cond func(map[string]*capi.AgentService) bool) map[string]*capi.AgentService {
	w.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		s := w.services()
		if s != nil && cond(s) {
			return s
		}
		if time.Now().After(deadline) {
			w.t.Fatalf("%s: not within 20 s; the agent holds %s", what, describe(s))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func describe(s map[string]*capi.AgentService) string {
	var out []string
	for id, v := range s {
		out = append(out, fmt.Sprintf("%s(%s %s:%d %v)", id, v.Service, v.Address, v.Port, v.Tags))
	}
	slices.Sort(out)
	return "[" + strings.Join(out, " ") + "]"
}

func has(id string) func(map[string]*capi.AgentService) bool {
	return func(s map[string]*capi.AgentService) bool { _, ok := s[id]; return ok }
}

func hasNot(id string) func(map[string]*capi.AgentService) bool {
	return func(s map[string]*capi.AgentService) bool { _, ok := s[id]; return !ok }
}

func TestPublishedContainerIsRegisteredAndStopRemovesIt(t *testing.T) {
	w := newWorld(t)
	w.startRegistrar(Config{Options: Options{HostIP: "127.0.0.7"}})
	name, id := w.run(runOpts{env: []string{"SERVICE_NAME=books-ms"}})
	sid := "reg-host:" + name + ":8080"
	s := w.waitFor("registration of "+sid, has(sid))[sid]
	if s.Service != "books-ms" || s.Address != "127.0.0.7" || s.Port != w.hostPort(id, "8080/tcp") {
		t.Fatalf("registered %s %s:%d; want books-ms 127.0.0.7:%d", s.Service, s.Address, s.Port, w.hostPort(id, "8080/tcp"))
	}
	w.stop(id)
	w.waitFor("deregistration after docker stop", hasNot(sid))
}

func TestRunningContainersAreRegisteredAtStart(t *testing.T) {
	w := newWorld(t)
	name, id := w.run(runOpts{})
	w.startRegistrar(Config{})
	sid := "reg-host:" + name + ":8080"
	s := w.waitFor("registration at start", has(sid))[sid]
	// The name comes from the image; the address from the binding (127.0.0.1).
	if s.Service != "webserver" || s.Address != "127.0.0.1" || s.Port != w.hostPort(id, "8080/tcp") {
		t.Fatalf("registered %s %s:%d", s.Service, s.Address, s.Port)
	}
}

func TestLabelsWinOverEnv(t *testing.T) {
	w := newWorld(t)
	w.startRegistrar(Config{})
	name, _ := w.run(runOpts{
		env:    []string{"SERVICE_NAME=from-env", "SERVICE_TAGS=env-tag", "SERVICE_VERSION=1"},
		labels: map[string]string{"SERVICE_NAME": "from-label", "SERVICE_TAGS": "a,b\\,c"},
	})
	sid := "reg-host:" + name + ":8080"
	s := w.waitFor("registration", has(sid))[sid]
	if s.Service != "from-label" || !slices.Equal(s.Tags, []string{"a", "b,c"}) || s.Meta["version"] != "1" {
		t.Fatalf("registered %s tags %v meta %v; want the label's name and tags, the env's version", s.Service, s.Tags, s.Meta)
	}
}

func TestSeveralPortsGetTheirPortInTheName(t *testing.T) {
	w := newWorld(t)
	w.startRegistrar(Config{})
	name, _ := w.run(runOpts{
		env:   []string{"EXTRA_PORTS=9090", "SERVICE_NAME=api", "SERVICE_9090_NAME=metrics", "SERVICE_9090_ID=metrics-id"},
		ports: []string{"8080/tcp", "9090/tcp"},
	})
	s := w.waitFor("both ports registered", func(s map[string]*capi.AgentService) bool {
		return has("reg-host:"+name+":8080")(s) && has("metrics-id")(s)
	})
	if got := s["reg-host:"+name+":8080"].Service; got != "api-8080" {
		t.Fatalf("port 8080 registered as %q, want api-8080", got)
	}
	if got := s["metrics-id"].Service; got != "metrics" {
		t.Fatalf("port 9090 registered as %q, want metrics (its own name, no suffix)", got)
	}
}

func TestIgnoredAndExplicit(t *testing.T) {
	w := newWorld(t)
	w.startRegistrar(Config{Options: Options{Explicit: true}})
	unnamed, _ := w.run(runOpts{})
	ignored, _ := w.run(runOpts{env: []string{"SERVICE_NAME=x", "SERVICE_IGNORE=true"}})
	named, _ := w.run(runOpts{env: []string{"SERVICE_NAME=named"}})
	s := w.waitFor("the named container", has("reg-host:"+named+":8080"))
	time.Sleep(time.Second) // give the others every chance to appear
	s = w.services()
	for _, n := range []string{unnamed, ignored} {
		if _, ok := s["reg-host:"+n+":8080"]; ok {
			t.Errorf("%s was registered although -explicit or SERVICE_IGNORE says not to", n)
		}
	}
}

func TestHTTPCheckTurnsPassing(t *testing.T) {
	w := newWorld(t)
	w.startRegistrar(Config{})
	name, _ := w.run(runOpts{env: []string{"SERVICE_NAME=checked", "SERVICE_CHECK_HTTP=/health", "SERVICE_CHECK_INTERVAL=1s"}})
	sid := "reg-host:" + name + ":8080"
	w.waitFor("registration", has(sid))
	deadline := time.Now().Add(20 * time.Second)
	for {
		checks, err := w.agent.Checks()
		if err == nil {
			for _, c := range checks {
				if c.ServiceID == sid && c.Status == capi.HealthPassing {
					return
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no passing check for %s within 20 s: %v", sid, checks)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func TestInternalRegistersTheContainersAddress(t *testing.T) {
	w := newWorld(t)
	w.startRegistrar(Config{Options: Options{Internal: true}})
	name, id := w.run(runOpts{env: []string{"SERVICE_NAME=inside"}})
	info, err := w.docker.ContainerInspect(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	var ip string
	for _, n := range info.NetworkSettings.Networks {
		ip = n.IPAddress
	}
	sid := "reg-host:" + name + ":8080"
	s := w.waitFor("registration", has(sid))[sid]
	if s.Address != ip || s.Port != 8080 || ip == "" {
		t.Fatalf("registered %s:%d; want the container's %s:8080", s.Address, s.Port, ip)
	}
}

func TestTagsFlag(t *testing.T) {
	w := newWorld(t)
	w.startRegistrar(Config{Options: Options{Tags: []string{"prod", "dc1"}}})
	name, _ := w.run(runOpts{env: []string{"SERVICE_TAGS=web"}})
	sid := "reg-host:" + name + ":8080"
	if s := w.waitFor("registration", has(sid))[sid]; !slices.Equal(s.Tags, []string{"web", "prod", "dc1"}) {
		t.Fatalf("tags %v, want [web prod dc1]", s.Tags)
	}
}

func TestDeregisterOnSuccess(t *testing.T) {
	w := newWorld(t)
	w.startRegistrar(Config{DeregisterOnSuccess: true})
	failed, failedID := w.run(runOpts{env: []string{"EXIT_AFTER=2s", "EXIT_CODE=3"}})
	ok, _ := w.run(runOpts{env: []string{"EXIT_AFTER=2s", "EXIT_CODE=0"}})
	failedSID, okSID := "reg-host:"+failed+":8080", "reg-host:"+ok+":8080"
	w.waitFor("both registered", func(s map[string]*capi.AgentService) bool { return has(failedSID)(s) && has(okSID)(s) })
	w.waitFor("the container that exited with 0 deregistered", hasNot(okSID))
	if _, still := w.services()[failedSID]; !still {
		t.Fatal("the container that exited with 3 was deregistered despite -deregister on-success")
	}
	w.remove(failedID)
	w.waitFor("the failed container's service gone once it is removed", hasNot(failedSID))
}

// countingRegistry passes every call to the real Consul backend and counts registrations.
type countingRegistry struct {
	Registry
	registers atomic.Int64
}

func (c *countingRegistry) Register(ctx context.Context, s Service) error {
	c.registers.Add(1)
	return c.Registry.Register(ctx, s)
}

// Registrator re-registered every service at each -resync. Consul 1.22 absorbs identical
// registrations, so what shows is the registrar's own traffic to the agent: none for unchanged services.
func TestResyncLeavesUnchangedRegistrationsAlone(t *testing.T) {
	w := newWorld(t)
	name, _ := w.run(runOpts{env: []string{"SERVICE_NAME=stable", "SERVICE_CHECK_HTTP=/health"}})
	engine, err := NewEngine()
	if err != nil {
		t.Fatal(err)
	}
	defer engine.Close()
	real, err := NewConsul("consul://" + w.consul.Addr)
	if err != nil {
		t.Fatal(err)
	}
	reg := &countingRegistry{Registry: real}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = NewBridge(engine, reg, Config{Options: Options{Hostname: "reg-host"}, Resync: 200 * time.Millisecond}).Run(ctx)
	}()
	defer func() { cancel(); <-done }()
	w.waitFor("registration", has("reg-host:"+name+":8080"))
	before := reg.registers.Load()
	time.Sleep(2 * time.Second) // about ten resyncs
	if n := reg.registers.Load() - before; n != 0 {
		t.Fatalf("resyncs registered an unchanged service %d more times", n)
	}
	// A registration lost from the agent is put back by the next resync.
	if err := real.Deregister(context.Background(), "reg-host:"+name+":8080"); err != nil {
		t.Fatal(err)
	}
	w.waitFor("the lost registration restored by a resync", has("reg-host:"+name+":8080"))
}

func TestChangesWaitForConsulAndLandWhenItIsBack(t *testing.T) {
	w := newWorld(t)
	w.startRegistrar(Config{})
	first, _ := w.run(runOpts{env: []string{"SERVICE_NAME=first"}})
	w.waitFor("registration", has("reg-host:"+first+":8080"))

	w.consul.Stop()
	second, _ := w.run(runOpts{env: []string{"SERVICE_NAME=second"}})
	time.Sleep(time.Second) // the start event arrives while Consul is down
	w.consul.Start()        // a dev agent comes back empty
	w.waitFor("both containers registered after Consul came back", func(s map[string]*capi.AgentService) bool {
		return has("reg-host:"+first+":8080")(s) && has("reg-host:"+second+":8080")(s)
	})
}

func TestCleanupRemovesDanglingRegistrationsOfThisHost(t *testing.T) {
	w := newWorld(t)
	// Registrations left by an earlier run that died: one of this host whose container is gone,
	// one of this host whose container runs, one of another host.
	gone := "reg-host:long-gone-container:8080"
	w.consul.RegisterService("old", gone, "127.0.0.1", 1)
	w.consul.RegisterService("other", "other-host:some-container:8080", "127.0.0.1", 2)
	name, _ := w.run(runOpts{env: []string{"SERVICE_NAME=alive"}})
	w.startRegistrar(Config{Cleanup: true})
	s := w.waitFor("the dangling registration removed", hasNot(gone))
	if !has("reg-host:"+name+":8080")(s) || !has("other-host:some-container:8080")(s) {
		t.Fatalf("cleanup removed too much: %s", describe(s))
	}
}
