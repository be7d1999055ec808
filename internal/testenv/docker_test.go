package testenv

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/filters"
	"github.com/docker/go-connections/nat"
)

// httpGet gets http://127.0.0.1:port/path until it answers 200 or the time runs out.
func httpGet(t *testing.T, port, path string, within time.Duration) string {
	t.Helper()
	c := &http.Client{Timeout: 2 * time.Second}
	deadline := time.Now().Add(within)
	var last string
	for {
		resp, err := c.Get("http://127.0.0.1:" + port + path)
		if err == nil {
			body, rerr := io.ReadAll(resp.Body)
			resp.Body.Close()
			if rerr == nil && resp.StatusCode == http.StatusOK {
				return string(body)
			}
			last = fmt.Sprintf("status %d, body %q, read error %v", resp.StatusCode, body, rerr)
		} else {
			last = err.Error()
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET 127.0.0.1:%s%s: no 200 within %v: %s", port, path, within, last)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// runWebServer creates and starts a container of the web server image, labelled for the test,
// with the given ports published on 127.0.0.1 only (a free host port each), and returns its id
// and the host port of each.
func runWebServer(t *testing.T, env []string, ports ...string) (string, map[string]string) {
	t.Helper()
	cli := Docker(t)
	img := WebServerImage(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	exposed := nat.PortSet{}
	bindings := nat.PortMap{}
	for _, p := range ports {
		exposed[nat.Port(p)] = struct{}{}
		bindings[nat.Port(p)] = []nat.PortBinding{{HostIP: "127.0.0.1"}}
	}
	created, err := cli.ContainerCreate(ctx,
		&container.Config{Image: img, Env: env, Labels: LabelFor(t), ExposedPorts: exposed},
		&container.HostConfig{PortBindings: bindings}, nil, nil, "")
	if err != nil {
		t.Fatalf("create container: %v", err)
	}
	if err := cli.ContainerStart(ctx, created.ID, container.StartOptions{}); err != nil {
		t.Fatalf("start container: %v", err)
	}
	info, err := cli.ContainerInspect(ctx, created.ID)
	if err != nil {
		t.Fatalf("inspect container: %v", err)
	}
	hostPorts := map[string]string{}
	for _, p := range ports {
		b := info.NetworkSettings.Ports[nat.Port(p)]
		if len(b) == 0 || b[0].HostPort == "" {
			t.Fatalf("port %s of %.12s is not published: %v", p, created.ID, info.NetworkSettings.Ports)
		}
		if b[0].HostIP != "127.0.0.1" {
			t.Fatalf("port %s of %.12s is published on %s, want 127.0.0.1", p, created.ID, b[0].HostIP)
		}
		hostPorts[p] = b[0].HostPort
	}
	return created.ID, hostPorts
}

// waitExit waits (bounded) for a container to stop and returns its exit code.
func waitExit(t *testing.T, id string, within time.Duration) int64 {
	t.Helper()
	cli := Docker(t)
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	okC, errC := cli.ContainerWait(ctx, id, container.WaitConditionNotRunning)
	select {
	case res := <-okC:
		return res.StatusCode
	case err := <-errC:
		t.Fatalf("wait for %.12s: %v", id, err)
	}
	return -1
}

func TestWebServerImageServesThroughPublishedPort(t *testing.T) {
	cli := Docker(t)
	img := WebServerImage(t)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ii, err := cli.ImageInspect(ctx, img)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := ii.Config.ExposedPorts["8080/tcp"]; !ok {
		t.Errorf("image exposes %v, want 8080/tcp", ii.Config.ExposedPorts)
	}
	if want := []string{"/webserver"}; !slices.Equal(ii.Config.Entrypoint, want) {
		t.Errorf("entrypoint %v, want %v", ii.Config.Entrypoint, want)
	}

	id, ports := runWebServer(t, []string{"EXTRA_PORTS=9091"}, "8080/tcp", "9091/tcp")
	for _, p := range []string{"8080/tcp", "9091/tcp"} {
		if got, want := httpGet(t, ports[p], "/x", 30*time.Second), id[:12]+" /x"; got != want {
			t.Errorf("GET /x on %s: %q, want %q", p, got, want)
		}
	}
	if got := httpGet(t, ports["8080/tcp"], "/health", 5*time.Second); got != "ok" {
		t.Errorf("GET /health: %q, want ok", got)
	}

	timeout := 10
	if err := cli.ContainerStop(ctx, id, container.StopOptions{Timeout: &timeout}); err != nil {
		t.Fatal(err)
	}
	if code := waitExit(t, id, 30*time.Second); code != 0 {
		t.Errorf("exit code after SIGTERM: %d, want 0", code)
	}

	// LabelFor's cleanup is registered: the container is there until the test ends.
	list, err := cli.ContainerList(ctx, container.ListOptions{All: true, Filters: filters.NewArgs(filters.Arg("label", TestLabel+"="+sanitize(t.Name())))})
	if err != nil || len(list) != 1 {
		t.Fatalf("labelled containers: %d, %v; want 1", len(list), err)
	}
}

func TestWebServerExitCodes(t *testing.T) {
	cli := Docker(t)

	t.Run("EXIT_AFTER", func(t *testing.T) {
		id, _ := runWebServer(t, []string{"EXIT_AFTER=1s", "EXIT_CODE=3"})
		if code := waitExit(t, id, 30*time.Second); code != 3 {
			t.Errorf("exit code: %d, want 3", code)
		}
	})
	t.Run("SIGTERM", func(t *testing.T) {
		id, ports := runWebServer(t, []string{"EXIT_CODE=5"}, "8080/tcp")
		httpGet(t, ports["8080/tcp"], "/health", 30*time.Second)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		timeout := 10
		start := time.Now()
		if err := cli.ContainerStop(ctx, id, container.StopOptions{Timeout: &timeout}); err != nil {
			t.Fatal(err)
		}
		if code := waitExit(t, id, 30*time.Second); code != 5 {
			t.Errorf("exit code: %d, want 5", code)
		}
		if d := time.Since(start); d > 8*time.Second {
			t.Errorf("stop took %v: SIGTERM was not handled", d)
		}
	})
}

func TestLabelForRemovesContainers(t *testing.T) {
	cli := Docker(t)
	var id string
	t.Run("sub/test", func(t *testing.T) {
		labels := LabelFor(t)
		if labels[TestLabel] != "TestLabelForRemovesContainers_sub_test" || labels[RunLabel] == "" {
			t.Fatalf("labels %v", labels)
		}
		LabelFor(t) // a second call registers no second cleanup
		id, _ = runWebServer(t, nil)
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := cli.ContainerInspect(ctx, id); err == nil {
		t.Fatalf("container %.12s still there after its test", id)
	}
}

func TestBuildImageOncePerTag(t *testing.T) {
	Docker(t) // skips, or fails under CI, without an engine: the parallel builds below cannot tell
	const tag = "dfp-test/webserver-once:latest"
	var wg sync.WaitGroup
	tags := make([]string, 4)
	for i := range tags {
		wg.Add(1)
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			t.Parallel()
			defer wg.Done()
			tags[i] = BuildImage(t, tag, "testdata/webserver", "8080/tcp")
		})
	}
	t.Cleanup(func() {
		wg.Wait()
		for i, got := range tags {
			if got != tag {
				t.Errorf("build %d: %q, want %q", i, got, tag)
			}
		}
		buildsMu.Lock()
		n := buildCount[tag]
		buildsMu.Unlock()
		if n != 1 {
			t.Errorf("%s built %d times, want once", tag, n)
		}
	})
}

func TestComposeUpScaleDown(t *testing.T) {
	cli := Docker(t)
	img := WebServerImage(t)
	dir := t.TempDir()
	yml := `version: "2"
services:
  app:
    image: ` + img + `
    environment:
      - EXIT_CODE=0
    ports:
      - "127.0.0.1::8080"
`
	if err := os.WriteFile(filepath.Join(dir, "docker-compose.yml"), []byte(yml), 0o644); err != nil {
		t.Fatal(err)
	}
	project := ComposeProject(t)

	// running lists the project's running app containers: id and host port of 8080.
	running := func() map[string]string {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		list, err := cli.ContainerList(ctx, container.ListOptions{Filters: filters.NewArgs(
			filters.Arg("label", "com.docker.compose.project="+project),
			filters.Arg("label", "com.docker.compose.service=app"))})
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]string{}
		for _, c := range list {
			for _, p := range c.Ports {
				if p.PrivatePort == 8080 && p.PublicPort != 0 {
					if p.IP != "127.0.0.1" {
						t.Fatalf("%.12s: 8080 published on %s, want 127.0.0.1", c.ID, p.IP)
					}
					out[c.ID] = fmt.Sprint(p.PublicPort)
				}
			}
		}
		return out
	}
	check := func(want int) {
		t.Helper()
		got := running()
		if len(got) != want {
			t.Fatalf("%d app containers running, want %d", len(got), want)
		}
		for id, port := range got {
			if body := httpGet(t, port, "/x", 30*time.Second); body != id[:12]+" /x" {
				t.Errorf("container %.12s answers %q", id, body)
			}
		}
	}

	Compose(t, dir, project, "up", "-d")
	check(1)
	Compose(t, dir, project, "scale", "app=3")
	check(3)
	Compose(t, dir, project, "up", "-d", "--scale", "app=2")
	check(2)
	out := Compose(t, dir, project, "ps")
	if strings.Count(out, project+"_app_") != 2 {
		t.Errorf("docker-compose ps:\n%s", out)
	}
	Compose(t, dir, project, "down", "-v", "--remove-orphans", "-t", "5")
	check(0)
}
