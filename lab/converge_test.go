package lab

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/image"
	"github.com/docker/docker/api/types/network"
	"github.com/docker/docker/client"
	"github.com/docker/go-connections/nat"

	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
)

// debianImage is the Debian host the roles converge on: a debootstrap root filesystem imported
// into the engine, kept between runs (it takes about a minute to make).
const debianImage = "dfp-lab/debian-systemd:bookworm"

// ensureDebianImage makes debianImage unless the engine has it: debootstrap (minbase, with
// python3 for Ansible, systemd to run the roles' services, sudo for become), then docker import.
func ensureDebianImage(t *testing.T, cli *client.Client) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	if _, err := cli.ImageInspect(ctx, debianImage); err == nil {
		return
	}
	debootstrap := tool(t, "debootstrap")
	if os.Geteuid() != 0 {
		testenv.Require(t, "root", "debootstrap makes the Debian host's root filesystem as root")
	}
	mirror := os.Getenv("DFP_DEBIAN_MIRROR")
	if mirror == "" {
		mirror = "http://deb.debian.org/debian"
	}
	rootfs := filepath.Join(t.TempDir(), "rootfs")
	start := time.Now()
	out, err := command(10*time.Minute, "", nil, debootstrap, "--variant=minbase", "--include=python3,systemd,sudo", "bookworm", rootfs, mirror)
	if err != nil {
		t.Fatalf("debootstrap bookworm: %v\n%s", err, out)
	}

	tarCmd := exec.CommandContext(ctx, "tar", "-C", rootfs, "--numeric-owner", "-c", ".")
	stream, err := tarCmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := tarCmd.Start(); err != nil {
		t.Fatalf("tar the root filesystem: %v", err)
	}
	resp, err := cli.ImageImport(ctx, image.ImportSource{Source: stream, SourceName: "-"}, debianImage,
		image.ImportOptions{Changes: []string{`CMD ["/lib/systemd/systemd"]`, "LABEL " + testenv.TestLabel + ".image=lab-debian"}})
	if err == nil {
		_, err = io.Copy(io.Discard, resp)
		resp.Close()
	}
	if werr := tarCmd.Wait(); err == nil && werr != nil {
		err = fmt.Errorf("tar: %w", werr)
	}
	if err != nil {
		t.Fatalf("docker import %s: %v", debianImage, err)
	}
	if _, err := cli.ImageInspect(ctx, debianImage); err != nil {
		t.Fatalf("image %s after its import: %v", debianImage, err)
	}
	t.Logf("made %s with debootstrap in %v", debianImage, time.Since(start).Round(time.Second))
}

// dockerSocket is the engine's socket on this machine, mounted into the Debian host for its
// registrar.
func dockerSocket(cli *client.Client) string {
	if h := cli.DaemonHost(); strings.HasPrefix(h, "unix://") {
		return strings.TrimPrefix(h, "unix://")
	}
	return "/var/run/docker.sock"
}

// startDebianHost runs debianImage with systemd as PID 1 (unprivileged: tmpfs for /run, the
// cgroup tree read-only) and the engine's socket, and waits until systemd has booted. It returns
// the container's name and IP; the container is removed when the test ends.
func startDebianHost(t *testing.T, cli *client.Client) (string, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	name := "dfp-lab-host-" + randomHex(t)
	created, err := cli.ContainerCreate(ctx,
		&container.Config{Image: debianImage, Hostname: name, Cmd: []string{"/lib/systemd/systemd"},
			Env: []string{"container=docker"}, Labels: testenv.LabelFor(t)},
		&container.HostConfig{
			Tmpfs: map[string]string{"/run": "", "/run/lock": ""},
			Binds: []string{"/sys/fs/cgroup:/sys/fs/cgroup:ro", dockerSocket(cli) + ":/var/run/docker.sock"},
		}, nil, nil, name)
	if err != nil {
		t.Fatalf("create the Debian host: %v", err)
	}
	if err := cli.ContainerStart(ctx, created.ID, container.StartOptions{}); err != nil {
		t.Fatalf("start the Debian host: %v", err)
	}
	info, err := cli.ContainerInspect(ctx, created.ID)
	if err != nil {
		t.Fatal(err)
	}
	ip := info.NetworkSettings.IPAddress
	if ip == "" {
		for _, n := range info.NetworkSettings.Networks {
			ip = n.IPAddress
		}
	}
	if ip == "" {
		t.Fatal("the Debian host has no IP address")
	}
	docker := tool(t, "docker")
	waitFor(t, 60*time.Second, "systemd boots in the Debian host", func() error {
		out, _ := command(10*time.Second, "", nil, docker, "exec", name, "systemctl", "is-system-running")
		if s := strings.TrimSpace(out); s != "running" && s != "degraded" {
			return fmt.Errorf("systemctl is-system-running: %q", s)
		}
		return nil
	})
	return name, ip
}

var recapRE = regexp.MustCompile(`(?m)^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)`)

// recap returns the changed and failed+unreachable counts of host in ansible-playbook's output.
func recap(t *testing.T, out, host string) (changed, failed int) {
	t.Helper()
	for _, m := range recapRE.FindAllStringSubmatch(out, -1) {
		if m[1] == host {
			c, _ := strconv.Atoi(m[3])
			u, _ := strconv.Atoi(m[4])
			f, _ := strconv.Atoi(m[5])
			return c, u + f
		}
	}
	t.Fatalf("no PLAY RECAP line for %s:\n%s", host, out)
	return 0, 0
}

// The proxy, Consul and registrar roles (with HAProxy's) converge on a Debian host, a second run
// changes nothing, and afterwards the host serves: the proxy's API and HAProxy answer, Consul
// has a leader, the registrar puts a container of the engine in that Consul.
func TestRolesConvergeOnADebianHost(t *testing.T) {
	playbook := tool(t, "ansible-playbook")
	docker := tool(t, "docker") // Ansible's docker connection runs it
	cli := testenv.Docker(t)
	consulBin := testenv.ConsulBin(t)
	proxyBin := testenv.BuildProxy(t, t.TempDir())
	ensureDebianImage(t, cli)
	host, ip := startDebianHost(t, cli)
	root := testenv.ModuleRoot(t)

	// The host in the groups of the proxy, Consul server and registrar plays of site.yml; it
	// registers with its own Consul agent, so nothing leaves the container.
	dir := t.TempDir()
	inventory := fmt.Sprintf(`[all:vars]
ansible_connection=community.docker.docker
lab_ip=%s

[consul_servers]
%s

[registrar]
%s

[proxy]
%s
`, ip, host, host, host)
	if err := os.WriteFile(filepath.Join(dir, "inventory.ini"), []byte(inventory), 0o644); err != nil {
		t.Fatal(err)
	}
	vars, _ := json.Marshal(map[string]string{"dfp_binary_src": proxyBin, "consul_binary_src": consulBin})
	if err := os.WriteFile(filepath.Join(dir, "vars.json"), vars, 0o644); err != nil {
		t.Fatal(err)
	}
	env := []string{
		"ANSIBLE_CONFIG=" + filepath.Join(root, "ansible", "ansible.cfg"),
		"ANSIBLE_LOCAL_TEMP=" + t.TempDir(), "ANSIBLE_NOCOLOR=1", "ANSIBLE_PIPELINING=1",
	}
	converge := func(run string) (int, string) {
		t.Helper()
		start := time.Now()
		out, err := command(8*time.Minute, filepath.Join(root, "ansible"), env, playbook,
			"-i", filepath.Join(dir, "inventory.ini"), "-e", "@"+filepath.Join(dir, "vars.json"), "site.yml")
		changed, failed := recap(t, out, host)
		if err != nil || failed != 0 {
			t.Fatalf("%s ansible-playbook site.yml: %v (failed or unreachable: %d)\n%s", run, err, failed, out)
		}
		t.Logf("%s run: changed=%d in %v", run, changed, time.Since(start).Round(time.Second))
		return changed, out
	}
	if changed, out := converge("first"); changed == 0 {
		t.Fatalf("the first run on a fresh host changed nothing:\n%s", out)
	}
	if changed, out := converge("second"); changed != 0 {
		t.Fatalf("the second run changed %d things, want changed=0:\n%s", changed, out)
	}

	// The proxy answers /v1/test, and says HAProxy runs and Consul is reachable.
	api := "http://" + ip + ":8080"
	if code, body, _, err := httpGet(api+"/v1/test", false); err != nil || code != http.StatusOK || !strings.Contains(body, `"Status":"OK"`) {
		t.Fatalf("GET %s/v1/test: %d %q %v", api, code, body, err)
	}
	code, body, _, err := httpGet(api+"/v1/docker-flow-proxy/health", false)
	if err != nil || code != http.StatusOK || !strings.Contains(body, `"HAProxy":"running"`) || !strings.Contains(body, `"Consul":"reachable"`) {
		t.Fatalf("GET %s/v1/docker-flow-proxy/health: %d %q %v", api, code, body, err)
	}
	// HAProxy, the proxy's child, serves port 80 (the service user has only that capability):
	// no route yet, so its 503.
	if code, _, _, err := httpGet("http://"+ip+"/", false); err != nil || code != http.StatusServiceUnavailable {
		t.Fatalf("GET http://%s/ (HAProxy): %d %v, want 503", ip, code, err)
	}
	// Debian's own haproxy.service stays out of the way.
	if out, _ := command(10*time.Second, "", nil, docker, "exec", host, "systemctl", "is-enabled", "haproxy"); strings.TrimSpace(out) != "masked" {
		t.Fatalf("haproxy.service is %q, want masked", strings.TrimSpace(out))
	}

	// The registrar follows the engine whose socket the host has: a container with a published
	// port appears in the host's Consul, at the host's address.
	service := "lab-converge-" + randomHex(t)
	webserver := testenv.WebServerImage(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	created, err := cli.ContainerCreate(ctx,
		&container.Config{Image: webserver, Env: []string{"SERVICE_NAME=" + service}, Labels: testenv.LabelFor(t),
			ExposedPorts: nat.PortSet{"8080/tcp": {}}},
		&container.HostConfig{PortBindings: nat.PortMap{"8080/tcp": {{HostIP: "127.0.0.1"}}}},
		&network.NetworkingConfig{}, nil, "")
	if err != nil {
		t.Fatal(err)
	}
	if err := cli.ContainerStart(ctx, created.ID, container.StartOptions{}); err != nil {
		t.Fatal(err)
	}
	catalog := "http://" + ip + ":8500/v1/catalog/service/" + url.PathEscape(service)
	waitFor(t, 30*time.Second, "the registrar on the Debian host registers the container", func() error {
		code, body, _, err := httpGet(catalog, false)
		if err != nil {
			return err
		}
		var entries []struct{ ServiceAddress string }
		if code != http.StatusOK || json.Unmarshal([]byte(body), &entries) != nil || len(entries) != 1 {
			return fmt.Errorf("GET %s: %d %s", catalog, code, body)
		}
		if entries[0].ServiceAddress != ip {
			return fmt.Errorf("registered at %s, want the host's address %s", entries[0].ServiceAddress, ip)
		}
		return nil
	})
}
