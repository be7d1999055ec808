package lab

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/docker/docker/api/types/image"

	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
)

// daemon runs bin with args until the test ends (SIGTERM, then SIGKILL after 20 s); its output
// goes to a file of the test and is logged when the test failed.
func daemon(t *testing.T, bin string, args ...string) {
	t.Helper()
	logPath := filepath.Join(t.TempDir(), args[0]+".log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		t.Fatalf("start %s %s: %v", filepath.Base(bin), args[0], err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		logFile.Close()
		if t.Failed() {
			out, _ := os.ReadFile(logPath)
			t.Logf("output of %s %s:\n%s", filepath.Base(bin), args[0], out)
		}
	})
}

// httpGet does one bounded GET (HEAD when head is set) and returns the status, the body and the
// X-Instance header. Each request opens its own connection, as curl does: a keep-alive connection
// opened before a reconfigure may carry one more request to HAProxy's previous worker.
func httpGet(url string, head bool) (int, string, string, error) {
	oneShot := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	method := http.MethodGet
	if head {
		method = http.MethodHead
	}
	req, err := http.NewRequestWithContext(ctx, method, url, nil)
	if err != nil {
		return 0, "", "", err
	}
	resp, err := oneShot.Do(req)
	if err != nil {
		return 0, "", "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return resp.StatusCode, string(body), resp.Header.Get("X-Instance"), err
}

// waitFor polls check every 100 ms until it returns nil, for at most limit.
func waitFor(t *testing.T, limit time.Duration, what string, check func() error) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		err := check()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s within %v: %v", what, limit, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// backendServers returns the server lines of the backend <service>-be in a haproxy.cfg.
func backendServers(cfg, service string) []string {
	var servers []string
	in := false
	for _, line := range strings.Split(cfg, "\n") {
		if !strings.HasPrefix(line, " ") && !strings.HasPrefix(line, "\t") {
			in = strings.TrimSpace(line) == "backend "+service+"-be"
			continue
		}
		if f := strings.Fields(line); in && len(f) > 0 && f[0] == "server" {
			servers = append(servers, strings.TrimSpace(line))
		}
	}
	return servers
}

func randomHex(t *testing.T) string {
	t.Helper()
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// The pipeline's script does what the article's three jobs do, against a local Docker engine,
// Consul, the registrar and the proxy: deploy books-ms with compose (registered, not yet routed),
// deploy with proxy (curl -I through the proxy: 200), scale to 3 (three server lines, answers
// from three containers), then destroy.
func TestPipelineScriptDeploysAndScalesBooksMSThroughTheProxy(t *testing.T) {
	cli := testenv.Docker(t)
	composeBin := testenv.ComposeBin(t)
	haproxy := testenv.HAProxyBin(t)
	tool(t, "curl")
	consul := testenv.StartConsul(t)
	bin := testenv.BuildProxy(t, t.TempDir())
	root := testenv.ModuleRoot(t)

	suffix := randomHex(t)
	service := "books-ms-lab-" + suffix // apart from any other books-ms the engine runs
	project := testenv.ComposeProject(t)
	imageTag := "dfp-lab/books-ms:" + suffix
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if _, err := cli.ImageRemove(ctx, imageTag, image.RemoveOptions{Force: true, PruneChildren: true}); err != nil {
			t.Logf("cleanup: remove image %s: %v", imageTag, err)
		}
	})
	// testenv.Compose removes the project's containers when the test ends, whatever the script
	// left; it needs the file as docker-compose.yml in a folder.
	composeDir := t.TempDir()
	demo, err := os.ReadFile(filepath.Join(root, "docker-compose-demo.yml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(composeDir, "docker-compose.yml"), demo, 0o644); err != nil {
		t.Fatal(err)
	}
	testenv.Compose(t, composeDir, project, "config", "-q")

	// This host's registrar and proxy, as the lab runs them, on 127.0.0.1.
	daemon(t, bin, "registrator", "-ip", "127.0.0.1", "-hostname", "lab-"+suffix, "-retry-interval", "200", "consul://"+consul.Addr)
	httpPort, apiPort := testenv.FreePort(t), testenv.FreePort(t)
	state := t.TempDir()
	daemon(t, bin, "server", "--consul-address", consul.Addr, "--bind-address", "127.0.0.1",
		"--http-port", strconv.Itoa(httpPort), "--api-port", strconv.Itoa(apiPort),
		"--config-dir", filepath.Join(state, "cfg"), "--certs-dir", filepath.Join(state, "certs"),
		"--templates-dir", filepath.Join(state, "templates"), "--haproxy-bin", haproxy)
	api := "http://127.0.0.1:" + strconv.Itoa(apiPort)
	users := "http://127.0.0.1:" + strconv.Itoa(httpPort)
	waitFor(t, 30*time.Second, "the proxy's API answers", func() error {
		code, _, _, err := httpGet(api+"/v1/test", false)
		if err == nil && code != http.StatusOK {
			err = fmt.Errorf("status %d", code)
		}
		return err
	})

	pipeline := func(stage string, extra ...string) string {
		t.Helper()
		env := append([]string{
			"PROXY=" + api, "PROXY_HTTP=" + users, "CONSUL_ADDRESS=" + consul.Addr,
			"SERVICE_NAME=" + service, "COMPOSE_PROJECT=" + project, "DOCKER_COMPOSE=" + composeBin,
			"BOOKS_MS_IMAGE=" + imageTag, "BOOKS_MS_BIN=/nonexistent", // the script builds the image itself
			"WAIT_SECONDS=60",
		}, extra...)
		start := time.Now()
		out, err := command(4*time.Minute, root, env, filepath.Join(root, "scripts", "pipeline.sh"), stage)
		if err != nil {
			t.Fatalf("scripts/pipeline.sh %s: %v\n%s", stage, err, out)
		}
		t.Logf("scripts/pipeline.sh %s: %v", stage, time.Since(start).Round(time.Millisecond))
		return out
	}
	config := func() string {
		t.Helper()
		code, body, _, err := httpGet(api+"/v1/docker-flow-proxy/config", false)
		if err != nil || code != http.StatusOK {
			t.Fatalf("GET /config: %d %v", code, err)
		}
		return body
	}
	catalog := func() int {
		t.Helper()
		code, body, _, err := httpGet(consul.URL()+"/v1/catalog/service/"+service, false)
		if err != nil || code != http.StatusOK {
			t.Fatalf("catalog of %s: %d %v", service, code, err)
		}
		var entries []json.RawMessage
		if err := json.Unmarshal([]byte(body), &entries); err != nil {
			t.Fatalf("catalog of %s: %v: %s", service, err, body)
		}
		return len(entries)
	}
	path := users + "/api/v1/books"

	// deploy-to-swarm-without-proxy: the service runs and is in Consul; the proxy does not route it.
	pipeline("deploy-without-proxy")
	if n := catalog(); n != 1 {
		t.Fatalf("after deploy-without-proxy: %d instances of %s in Consul, want 1", n, service)
	}
	if code, _, _, err := httpGet(path, true); err != nil || code != http.StatusServiceUnavailable {
		t.Fatalf("HEAD %s before any reconfigure: %d %v, want HAProxy's 503", path, code, err)
	}

	// deploy-to-swarm-with-proxy: reconfigure, and curl -I through the proxy answers 200.
	out := pipeline("deploy-with-proxy")
	if !strings.Contains(out, `"Status":"OK"`) || !strings.Contains(out, "HTTP/1.1 200") {
		t.Fatalf("deploy-with-proxy printed no OK reconfigure and no 200:\n%s", out)
	}
	if code, _, _, err := httpGet(path, true); err != nil || code != http.StatusOK {
		t.Fatalf("HEAD %s after deploy-with-proxy: %d %v, want 200", path, code, err)
	}
	if servers := backendServers(config(), service); len(servers) != 1 {
		t.Fatalf("after deploy-with-proxy the config has %d server lines for %s, want 1: %q", len(servers), service, servers)
	}

	// scale-to-swarm-with-proxy with SCALE=3: three server lines, answers from three containers.
	pipeline("scale-with-proxy", "SCALE=3")
	if servers := backendServers(config(), service); len(servers) != 3 {
		t.Fatalf("after scale-with-proxy SCALE=3 the config has %d server lines for %s, want 3:\n%s", len(servers), service, config())
	}
	ids, err := command(time.Minute, root, nil, composeBin, "-p", project, "-f", filepath.Join(root, "docker-compose-demo.yml"), "ps", "-q", "app")
	if err != nil {
		t.Fatalf("docker-compose ps: %v\n%s", err, ids)
	}
	containers := map[string]bool{} // books-ms answers with its host name: the container's short ID
	for _, id := range strings.Fields(ids) {
		containers[id[:12]] = true
	}
	if len(containers) != 3 {
		t.Fatalf("docker-compose ps lists %d containers, want 3: %q", len(containers), ids)
	}
	answered := map[string]int{}
	for i := 0; i < 60 && len(answered) < 3; i++ {
		code, _, inst, err := httpGet(path, false)
		if err != nil || code != http.StatusOK {
			t.Fatalf("GET %s #%d: %d %v", path, i, code, err)
		}
		if !containers[inst] {
			t.Fatalf("GET %s answered by %q, not one of the project's containers %v", path, inst, containers)
		}
		answered[inst]++
	}
	if len(answered) != 3 {
		t.Fatalf("requests through the proxy were answered by %d containers, want 3: %v", len(answered), answered)
	}

	// destroy: the route leaves the proxy and the containers are removed.
	pipeline("destroy")
	if servers := backendServers(config(), service); len(servers) != 0 || strings.Contains(config(), service+"-be") {
		t.Fatalf("after destroy the config still routes %s:\n%s", service, config())
	}
	if left, err := command(time.Minute, root, nil, composeBin, "-p", project, "-f", filepath.Join(root, "docker-compose-demo.yml"), "ps", "-q"); err != nil || strings.TrimSpace(left) != "" {
		t.Fatalf("after destroy the project still has containers: %v %q", err, left)
	}
}
