// Package testenv starts the real programs that integration tests run against: HAProxy and a
// Consul dev agent on 127.0.0.1 with free ports. When a program is missing, a test is skipped
// outside CI and fails under CI=true: a missing real part is never a silent pass.
package testenv

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// CI reports whether the tests run under CI (CI=true), where every real part is required.
func CI() bool { return os.Getenv("CI") == "true" }

// Require stops a test that needs a real part which is missing: a failure under CI, a skip with
// the reason otherwise.
func Require(t testing.TB, what, why string) {
	t.Helper()
	msg := what + " is not available (" + why + "); run scripts/test.sh, which installs it"
	if CI() {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// HAProxyBin returns the HAProxy binary: $DFP_HAPROXY_BIN, haproxy on PATH, or /usr/sbin/haproxy.
func HAProxyBin(t testing.TB) string {
	t.Helper()
	if p := os.Getenv("DFP_HAPROXY_BIN"); p != "" {
		return p
	}
	if p, err := exec.LookPath("haproxy"); err == nil {
		return p
	}
	if _, err := os.Stat("/usr/sbin/haproxy"); err == nil {
		return "/usr/sbin/haproxy"
	}
	Require(t, "haproxy", "not on PATH and DFP_HAPROXY_BIN unset")
	return ""
}

// ConsulBin returns the Consul binary: $DFP_CONSUL_BIN, consul on PATH, or the one that
// scripts/setup.sh caches.
func ConsulBin(t testing.TB) string {
	t.Helper()
	if p := os.Getenv("DFP_CONSUL_BIN"); p != "" {
		return p
	}
	if p, err := exec.LookPath("consul"); err == nil {
		return p
	}
	cache := os.Getenv("DFP_CACHE")
	if cache == "" {
		if dir, err := os.UserCacheDir(); err == nil {
			cache = filepath.Join(dir, "docker-flow-proxy")
		}
	}
	matches, _ := filepath.Glob(filepath.Join(cache, "consul-*", "consul"))
	if len(matches) > 0 {
		return matches[len(matches)-1]
	}
	Require(t, "consul", "not on PATH, not cached and DFP_CONSUL_BIN unset")
	return ""
}

// FreePort returns a TCP port on 127.0.0.1 that nothing listens on right now.
func FreePort(t testing.TB) int {
	t.Helper()
	return FreePorts(t, 1)[0]
}

// FreePorts returns n distinct free TCP ports on 127.0.0.1: they are held together while chosen,
// so that the kernel cannot hand out one of them twice (one program's ports must differ).
func FreePorts(t testing.TB, n int) []int {
	t.Helper()
	ports := make([]int, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("free port: %v", err)
		}
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports
}
