package main

import (
	"context"
	"errors"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/haproxy"
	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
)

// TestMain lets a test run this binary as the real command: with DFP_RUN_MAIN=1 it is main().
func TestMain(m *testing.M) {
	if os.Getenv("DFP_RUN_MAIN") == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func TestSIGTERMStopsTheServerAndHAProxy(t *testing.T) {
	hap := testenv.HAProxyBin(t)
	c := testenv.StartConsul(t)
	dir := t.TempDir()
	httpPort, apiPort := testenv.FreePort(t), testenv.FreePort(t)
	cmd := exec.Command(os.Args[0], "server")
	cmd.Env = append(os.Environ(), "DFP_RUN_MAIN=1", "CONSUL_ADDRESS="+c.Addr, "BIND_ADDRESS=127.0.0.1",
		"HTTP_PORT="+strconv.Itoa(httpPort), "API_PORT="+strconv.Itoa(apiPort), "CONFIG_DIR="+dir,
		"CERTS_DIR="+t.TempDir(), "HAPROXY_BIN="+hap, "LOG_LEVEL=warn")
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() { _ = cmd.Process.Kill() }()

	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get("http://127.0.0.1:" + strconv.Itoa(apiPort) + "/v1/docker-flow-proxy/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the server did not become healthy within 30 s: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := haproxy.Command(ctx, filepath.Join(dir, "master.sock"), "show proc")
	if err != nil {
		t.Fatalf("master CLI: %v", err)
	}
	info, err := haproxy.ParseShowProc(out)
	if err != nil || info.MasterPID == 0 || len(info.Workers) == 0 {
		t.Fatalf("show proc: %+v %v", info, err)
	}

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("the server exited with %v after SIGTERM, want 0", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the server did not exit within 30 s of SIGTERM")
	}
	for _, pid := range append([]int{info.MasterPID}, info.Workers...) {
		if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
			t.Errorf("HAProxy process %d still exists after the server stopped (%v)", pid, err)
		}
	}
	if conn, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(httpPort), time.Second); err == nil {
		conn.Close()
		t.Error("HAProxy's port still accepts connections after the server stopped")
	}
}
