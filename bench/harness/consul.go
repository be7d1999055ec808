package harness

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"strconv"
	"syscall"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
)

// agent is the Consul dev agent of one world.
type agent struct {
	addr string
	pid  int
	stop func()
}

// startConsul starts the Consul agent of a world: testenv's, with Consul's default limits, or,
// when maxConns > 0, the same dev agent with limits.http_max_conns_per_client raised to maxConns
// (the server keeps one blocking query open per Consul node, plus a few).
func (h *harness) startConsul(ctx context.Context, maxConns int) (*agent, error) {
	if maxConns <= 0 {
		var c *testenv.Consul
		if err := h.tbCall(func() { c = testenv.StartConsul(h.tb) }); err != nil {
			return nil, err
		}
		return &agent{addr: c.Addr, pid: c.PID(), stop: c.Stop}, nil
	}
	var bin string
	var ports [4]int
	if err := h.tbCall(func() {
		bin = testenv.ConsulBin(h.tb)
		for i := range ports {
			ports[i] = testenv.FreePort(h.tb)
		}
	}); err != nil {
		return nil, err
	}
	var out bytes.Buffer
	cmd := exec.Command(bin, "agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1",
		"-node", "test-node", "-log-level", "warn",
		"-http-port", strconv.Itoa(ports[0]), "-dns-port", "-1", "-grpc-port", "-1", "-grpc-tls-port", "-1",
		"-serf-lan-port", strconv.Itoa(ports[1]), "-serf-wan-port", strconv.Itoa(ports[2]),
		"-server-port", strconv.Itoa(ports[3]),
		"-hcl", fmt.Sprintf("limits { http_max_conns_per_client = %d }", maxConns))
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start consul: %w", err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	stop := func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-done
		}
	}
	a := &agent{addr: "127.0.0.1:" + strconv.Itoa(ports[0]), pid: cmd.Process.Pid, stop: stop}
	rctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	for {
		leader, err1 := httpGet(rctx, "http://"+a.addr+"/v1/status/leader")
		nodes, err2 := httpGet(rctx, "http://"+a.addr+"/v1/catalog/nodes")
		if err1 == nil && err2 == nil && len(leader) > 4 && bytes.Contains(nodes, []byte("test-node")) {
			return a, nil
		}
		select {
		case <-done:
			return nil, fmt.Errorf("consul exited: %s", out.String())
		case <-rctx.Done():
			stop()
			return nil, fmt.Errorf("consul not ready within a minute: %s", out.String())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func httpGet(ctx context.Context, url string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err == nil && resp.StatusCode != http.StatusOK {
		err = fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return b, err
}
