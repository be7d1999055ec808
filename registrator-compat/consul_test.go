package registrator

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
)

func TestRegistryURIs(t *testing.T) {
	for _, tc := range []struct{ uri, address, scheme string }{
		{"consul://10.0.0.5:8500", "10.0.0.5:8500", "http"},
		{"consul://consul", "consul:8500", "http"},
		{"consul-tls://consul.example.com:8501", "consul.example.com:8501", "https"},
		{"consul-unix:///var/run/consul.sock", "/var/run/consul.sock", ""}, // the client dials the path
	} {
		c, err := NewConsul(tc.uri)
		if err != nil {
			t.Errorf("%s: %v", tc.uri, err)
			continue
		}
		if c.address != tc.address || (tc.scheme != "" && c.scheme != tc.scheme) {
			t.Errorf("%s: address %q scheme %q; want %q %q", tc.uri, c.address, c.scheme, tc.address, tc.scheme)
		}
	}
	for _, bad := range []string{"etcd://x:2379", "consul-unix://", "::"} {
		if _, err := NewConsul(bad); err == nil {
			t.Errorf("%s was accepted", bad)
		}
	}
}

// A Consul agent serving its HTTP API on a unix socket, reached through consul-unix://.
func TestConsulUnixSocket(t *testing.T) {
	bin := testenv.ConsulBin(t)
	dir, err := os.MkdirTemp("", "dfpsock")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "consul.sock")
	cfg := filepath.Join(dir, "agent.hcl")
	if err := os.WriteFile(cfg, []byte(`addresses { http = "unix://`+sock+`" }`+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	free := func() string {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		return strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
	}
	cmd := exec.Command(bin, "agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1", "-config-file", cfg,
		"-dns-port", "-1", "-grpc-port", "-1", "-grpc-tls-port", "-1", "-serf-lan-port", free(),
		"-serf-wan-port", free(), "-server-port", free(), "-log-level", "warn")
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()

	reg, err := NewConsul("consul-unix://" + sock)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for reg.Ping(context.Background()) != nil {
		if time.Now().After(deadline) {
			t.Fatalf("no agent on %s within 30 s:\n%s", sock, out.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	ctx := context.Background()
	if err := reg.Register(ctx, Service{ID: "h:c:80", Name: "web", Address: "127.0.0.1", Port: 80}); err != nil {
		t.Fatal(err)
	}
	got, err := reg.Services(ctx)
	if err != nil || got["h:c:80"].Name != "web" {
		t.Fatalf("services over the unix socket: %v %v", got, err)
	}
}
