// Package e2e runs the docker-flow-proxy binary as users do, as separate processes, against a real
// Docker engine, Consul agent and HAProxy: the registrar, the proxy, docker-compose.
package e2e

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	capi "github.com/hashicorp/consul/api"

	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
)

var (
	buildOnce sync.Once
	binPath   string
)

// binary builds cmd/docker-flow-proxy once per test run.
func binary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "dfp-e2e-bin")
		if err != nil {
			t.Fatal(err)
		}
		binPath = testenv.BuildProxy(t, dir)
	})
	if binPath == "" {
		t.Fatal("cmd/docker-flow-proxy was not built (see the first test that asked for it)")
	}
	return binPath
}

// process is the binary running one command.
type process struct {
	cmd  *exec.Cmd
	out  *syncBuffer
	done chan struct{}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// start runs the binary with args and env; it is killed when the test ends.
func start(t *testing.T, env []string, args ...string) *process {
	t.Helper()
	cmd := exec.Command(binary(t), args...)
	cmd.Env = append(os.Environ(), env...)
	p := &process{cmd: cmd, out: &syncBuffer{}, done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = p.out, p.out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			<-p.done
		}
		if t.Failed() {
			t.Logf("output of %v:\n%s", args, p.out.String())
		}
	})
	return p
}

func (p *process) kill(t *testing.T) {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		t.Fatal("the process did not die after SIGKILL")
	}
}

type world struct {
	t      *testing.T
	consul *testenv.Consul
	api    *capi.Client
	image  string
	host   string
}

func newWorld(t *testing.T) *world {
	t.Helper()
	testenv.Docker(t)
	testenv.HAProxyBin(t)
	img := testenv.WebServerImage(t)
	c := testenv.StartConsul(t)
	api, err := capi.NewClient(&capi.Config{Address: c.Addr})
	if err != nil {
		t.Fatal(err)
	}
	return &world{t: t, consul: c, api: api, image: img, host: "e2e-" + strconv.Itoa(os.Getpid())}
}

// registrar starts `docker-flow-proxy registrator` in Registrator's own flag style.
func (w *world) registrar(flags ...string) *process {
	w.t.Helper()
	args := append([]string{"registrator", "-ip", "127.0.0.1", "-hostname", w.host, "-retry-interval", "200"}, flags...)
	return start(w.t, []string{"LOG_LEVEL=info"}, append(args, "consul://"+w.consul.Addr)...)
}

// compose writes a compose file for service app (the test image, SERVICE_NAME given) and returns
// a function running docker-compose on it.
func (w *world) compose(serviceName string) func(args ...string) string {
	w.t.Helper()
	dir := w.t.TempDir()
	var labels strings.Builder
	for k, v := range testenv.LabelFor(w.t) {
		fmt.Fprintf(&labels, "      %s: %q\n", k, v)
	}
	yml := fmt.Sprintf(`version: "2"
services:
  app:
    image: %s
    environment:
      SERVICE_NAME: %s
    ports:
      - "127.0.0.1::8080"
    labels:
%s`, w.image, serviceName, labels.String())
	if err := os.WriteFile(filepath.Join(dir, "docker-compose.yml"), []byte(yml), 0o644); err != nil {
		w.t.Fatal(err)
	}
	project := testenv.ComposeProject(w.t) + strings.ReplaceAll(strings.ToLower(serviceName), "_", "")
	return func(args ...string) string { return testenv.Compose(w.t, dir, project, args...) }
}

// instances waits until the catalog lists n passing instances of service and returns them.
func (w *world) instances(service string, n int) []*capi.ServiceEntry {
	w.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		entries, _, err := w.api.Health().Service(service, "", true, nil)
		if err == nil && len(entries) == n {
			return entries
		}
		if time.Now().After(deadline) {
			w.t.Fatalf("%s: %d instances in the catalog within 30 s, want %d (%v)", service, len(entries), n, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestComposeScaleIsFollowedByTheRegistrar(t *testing.T) {
	w := newWorld(t)
	w.registrar()
	compose := w.compose("books-ms")
	compose("up", "-d")
	w.instances("books-ms", 1)
	compose("scale", "app=3")
	entries := w.instances("books-ms", 3)
	ports := map[int]bool{}
	for _, e := range entries {
		if e.Service.Address != "127.0.0.1" || e.Service.Port == 0 || !strings.HasPrefix(e.Service.ID, w.host+":") {
			t.Fatalf("instance registered as %s %s:%d", e.Service.ID, e.Service.Address, e.Service.Port)
		}
		ports[e.Service.Port] = true
	}
	if len(ports) != 3 {
		t.Fatalf("three instances share ports: %v", ports)
	}
	compose("scale", "app=1")
	w.instances("books-ms", 1)
}

func TestRegistrarKilledThenCleanupRemovesWhatItLeft(t *testing.T) {
	w := newWorld(t)
	first := w.registrar()
	goneCompose := w.compose("leaving")
	stayCompose := w.compose("staying")
	goneCompose("up", "-d")
	stayCompose("up", "-d")
	w.instances("leaving", 1)
	w.instances("staying", 1)

	first.kill(t)
	goneCompose("down", "-t", "1") // removed while no registrar runs: nobody deregisters it
	time.Sleep(500 * time.Millisecond)
	if entries, _, _ := w.api.Health().Service("leaving", "", false, nil); len(entries) != 1 {
		t.Fatalf("expected the dangling registration to be there before the restart, found %d", len(entries))
	}

	w.registrar("-cleanup")
	w.instances("leaving", 0)
	if e := w.instances("staying", 1); !strings.HasPrefix(e[0].Service.ID, w.host+":") {
		t.Fatalf("staying registered as %s", e[0].Service.ID)
	}
	time.Sleep(time.Second)
	if all, _, _ := w.api.Health().Service("staying", "", false, nil); len(all) != 1 {
		t.Fatalf("%d registrations of the staying container, want exactly one", len(all))
	}
}

func TestComposeScaleAndOneReconfigureBalanceOverEveryContainer(t *testing.T) {
	w := newWorld(t)
	// The registrar configured the urfave/cli way: --flags and environment variables.
	start(t, []string{"REGISTRATOR_IP=127.0.0.1", "REGISTRATOR_HOSTNAME=" + w.host, "REGISTRATOR_URI=consul://" + w.consul.Addr},
		"registrator", "--retry-interval=200", "--deregister", "always")
	httpPort, apiPort := testenv.FreePort(t), testenv.FreePort(t)
	start(t, []string{"CONSUL_ADDRESS=" + w.consul.Addr, "BIND_ADDRESS=127.0.0.1", "HTTP_PORT=" + strconv.Itoa(httpPort),
		"API_PORT=" + strconv.Itoa(apiPort), "CONFIG_DIR=" + t.TempDir(), "CERTS_DIR=" + t.TempDir(),
		"HAPROXY_BIN=" + testenv.HAProxyBin(t), "LOG_LEVEL=warn"}, "server")
	compose := w.compose("books-ms")
	compose("up", "-d")
	compose("scale", "app=3")
	w.instances("books-ms", 3)

	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	get := func(url string) (int, string, error) {
		resp, err := client.Get(url)
		if err != nil {
			return 0, "", err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b), err
	}
	api := "http://127.0.0.1:" + strconv.Itoa(apiPort)
	deadline := time.Now().Add(30 * time.Second)
	for {
		if code, _, err := get(api + "/v1/docker-flow-proxy/health"); err == nil && code == http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the proxy did not become healthy within 30 s")
		}
		time.Sleep(100 * time.Millisecond)
	}
	code, body, err := get(api + "/v1/docker-flow-proxy/reconfigure?serviceName=books-ms&servicePath=/api/v1/books")
	if err != nil || code != http.StatusOK || !strings.Contains(body, `"Instances":3`) {
		t.Fatalf("reconfigure: %d %s %v", code, body, err)
	}
	seen := map[string]int{}
	for i := 0; i < 30; i++ {
		code, body, err := get("http://127.0.0.1:" + strconv.Itoa(httpPort) + "/api/v1/books")
		if err != nil || code != http.StatusOK {
			t.Fatalf("request %d through the proxy: %d %q %v", i, code, body, err)
		}
		seen[strings.Fields(body)[0]]++
	}
	if len(seen) != 3 {
		t.Fatalf("30 requests reached the containers %v, want three", seen)
	}
}

// The engine restarted under the registrar: it reconnects, and a container started afterwards is
// registered. This test stops and starts the Docker engine, which would break the other packages'
// containers, so scripts/test.sh runs it on its own (DFP_DOCKERD_RESTART=1), after the others.
func TestRegistrarFollowsARestartedEngine(t *testing.T) {
	if os.Getenv("DFP_DOCKERD_RESTART") != "1" {
		t.Skip("restarts the Docker engine: scripts/test.sh runs it alone with DFP_DOCKERD_RESTART=1")
	}
	w := newWorld(t)
	w.registrar()
	before := w.compose("before-restart")
	before("up", "-d")
	w.instances("before-restart", 1)

	script := filepath.Join(testenv.ModuleRoot(t), "scripts", "docker.sh")
	for _, action := range []string{"restart"} {
		ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
		out, err := exec.CommandContext(ctx, "bash", script, action).CombinedOutput()
		cancel()
		if err != nil {
			t.Fatalf("docker.sh %s: %v\n%s", action, err, out)
		}
	}
	// Containers do not survive a restart of the engine without live-restore: the registrar
	// notices when it resyncs after reconnecting.
	w.instances("before-restart", 0)
	after := w.compose("after-restart")
	after("up", "-d")
	w.instances("after-restart", 1)
}
