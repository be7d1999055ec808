package testenv

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// ConsulNode is the node name of the agents that tests start.
const ConsulNode = "test-node"

// Consul is a Consul dev agent started for one test, listening on 127.0.0.1 only.
type Consul struct {
	t    testing.TB
	bin  string
	Addr string // host:port of the HTTP API
	// Token is sent with the helpers' requests: the management token of an agent with ACLs.
	Token string

	mu   sync.Mutex
	cmd  *exec.Cmd
	out  *bytes.Buffer
	args []string
}

// StartConsul starts `consul agent -dev` on free ports and waits until it has a leader.
// The agent is stopped when the test ends.
func StartConsul(t testing.TB) *Consul {
	t.Helper()
	return startConsul(t, "", "-dev")
}

// ManagementToken is the management token of the agents StartConsulACL starts.
const ManagementToken = "dfp-test-management"

// StartConsulACL starts `consul agent -dev` with ACLs on, denying whatever a token is not granted;
// ManagementToken may do everything (the helpers send it).
func StartConsulACL(t testing.TB) *Consul {
	t.Helper()
	hcl := fmt.Sprintf(`acl { enabled = true, default_policy = "deny", tokens { initial_management = %q, agent = %q } }`,
		ManagementToken, ManagementToken)
	return startConsul(t, ManagementToken, "-dev", "-hcl", hcl)
}

// StartConsulServer starts a single Consul server that keeps its data in a folder, so that it comes
// back from Stop and Start with its catalog and KV, as a production cluster does.
func StartConsulServer(t testing.TB) *Consul {
	t.Helper()
	return startConsul(t, "", "-server", "-bootstrap-expect", "1", "-data-dir", t.TempDir())
}

func startConsul(t testing.TB, token string, mode ...string) *Consul {
	t.Helper()
	bin := ConsulBin(t)
	// A free port may be taken by another listener or connection of the machine between
	// FreePorts and Consul's bind: then the agent exits at once and another set of ports is tried.
	const attempts = 3
	for attempt := 1; ; attempt++ {
		ports := FreePorts(t, 4)
		httpPort := ports[0]
		c := &Consul{t: t, bin: bin, Addr: "127.0.0.1:" + strconv.Itoa(httpPort), Token: token}
		c.args = append(append([]string{"agent"}, mode...),
			"-bind", "127.0.0.1", "-client", "127.0.0.1", "-node", ConsulNode, "-log-level", "warn",
			"-http-port", strconv.Itoa(httpPort),
			"-dns-port", "-1", "-grpc-port", "-1", "-grpc-tls-port", "-1",
			"-serf-lan-port", strconv.Itoa(ports[1]),
			"-serf-wan-port", strconv.Itoa(ports[2]),
			"-server-port", strconv.Itoa(ports[3]),
		)
		err := c.start()
		if err == nil {
			t.Cleanup(c.Stop)
			return c
		}
		if attempt == attempts || !strings.Contains(c.Output(), "address already in use") {
			t.Fatal(err)
		}
		t.Logf("consul: a port was taken before the agent bound it; trying other ports (%d of %d)", attempt+1, attempts)
	}
}

// PID is the agent process's id; 0 while it is stopped.
func (c *Consul) PID() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cmd == nil || c.cmd.Process == nil {
		return 0
	}
	return c.cmd.Process.Pid
}

// Start (re)starts the agent on the same ports and waits until it has a leader. A dev agent
// keeps its data in memory: a restarted dev agent is empty.
func (c *Consul) Start() {
	c.t.Helper()
	if err := c.start(); err != nil {
		c.t.Fatal(err)
	}
}

// start is Start, returning what went wrong; the agent is stopped then.
func (c *Consul) start() error {
	c.mu.Lock()
	if c.cmd != nil {
		c.mu.Unlock()
		return nil
	}
	c.out = &bytes.Buffer{}
	cmd := exec.Command(c.bin, c.args...)
	cmd.Stdout = c.out
	cmd.Stderr = c.out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		c.mu.Unlock()
		return fmt.Errorf("start consul: %w", err)
	}
	c.cmd = cmd
	c.mu.Unlock()

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for {
		if leader, err := c.get(ctx, "/v1/status/leader"); err == nil && len(leader) > 4 {
			// The catalog answers once the node has registered itself.
			if nodes, err := c.get(ctx, "/v1/catalog/nodes"); err == nil && bytes.Contains(nodes, []byte(ConsulNode)) {
				return nil
			}
		}
		if exited(cmd.Process.Pid) {
			c.Stop()
			return fmt.Errorf("consul exited before it was ready; its output:\n%s", c.Output())
		}
		select {
		case <-ctx.Done():
			c.Stop()
			return fmt.Errorf("consul did not become ready within 60s; its output:\n%s", c.Output())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// exited reports whether the child pid has exited (a zombie not yet waited for, or gone).
func exited(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return true
	}
	// The state follows the command's name, which is in parentheses.
	i := bytes.LastIndexByte(b, ')')
	return i > 0 && i+2 < len(b) && (b[i+2] == 'Z' || b[i+2] == 'X')
}

// Stop ends the agent and waits for it (bounded).
func (c *Consul) Stop() {
	c.mu.Lock()
	cmd := c.cmd
	c.cmd = nil
	c.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
	}
}

// Output is what the agent printed so far.
func (c *Consul) Output() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.out == nil {
		return ""
	}
	return c.out.String()
}

// URL is the agent's HTTP API base URL.
func (c *Consul) URL() string { return "http://" + c.Addr }

func (c *Consul) get(ctx context.Context, path string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.URL()+path, nil)
	if err != nil {
		return nil, err
	}
	c.authorize(req)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	_, _ = b.ReadFrom(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", path, resp.Status)
	}
	return b.Bytes(), nil
}

// authorize adds the agent's token, if any, to a request.
func (c *Consul) authorize(req *http.Request) {
	if c.Token != "" {
		req.Header.Set("X-Consul-Token", c.Token)
	}
}

// RegisterService registers an instance of a service in the agent's catalog, with no health check
// (so it counts as passing), and fails the test on error.
func (c *Consul) RegisterService(name, id, address string, port int) {
	c.t.Helper()
	body := fmt.Sprintf(`{"ID":%q,"Name":%q,"Address":%q,"Port":%d}`, id, name, address, port)
	c.Put("/v1/agent/service/register", body)
}

// DeregisterService removes an instance from the agent's catalog.
func (c *Consul) DeregisterService(id string) {
	c.t.Helper()
	c.Put("/v1/agent/service/deregister/"+id, "")
}

// Put sends a PUT with body to the agent's HTTP API and fails the test unless it answers 200.
func (c *Consul) Put(path, body string) {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, c.URL()+path, bytes.NewBufferString(body))
	if err != nil {
		c.t.Fatal(err)
	}
	c.authorize(req)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		c.t.Fatalf("PUT %s: %v", path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var b bytes.Buffer
		_, _ = b.ReadFrom(resp.Body)
		c.t.Fatalf("PUT %s: %s %s", path, resp.Status, b.String())
	}
}
