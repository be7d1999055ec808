package server

// Integration tests of request modes and destinations: reqMode=tcp with srcPort and port,
// reqMode=sni (TLS passed through, routed by name) and indexed destinations, through the real
// HAProxy and Consul.

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
)

// tcpEcho starts a TCP server on 127.0.0.1 that answers every line with "<name> <line>", and
// registers it in Consul as an instance of service.
func (e *env) tcpEcho(service, name string) {
	e.t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				conn.SetDeadline(time.Now().Add(20 * time.Second))
				sc := bufio.NewScanner(conn)
				for sc.Scan() {
					fmt.Fprintf(conn, "%s %s\n", name, sc.Text())
				}
			}()
		}
	}()
	e.consul.RegisterService(service, name, "127.0.0.1", ln.Addr().(*net.TCPAddr).Port)
}

// tcpRoundTrip connects to addr, sends line and returns the answer's line.
func tcpRoundTrip(addr, line string) (string, error) {
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintf(conn, "%s\n", line); err != nil {
		return "", err
	}
	answer, err := bufio.NewReader(conn).ReadString('\n')
	return strings.TrimSuffix(answer, "\n"), err
}

func TestReqModeTCPPassesBytesOnItsPort(t *testing.T) {
	e := newEnv(t)
	e.tcpEcho("redis", "redis-1")
	p := e.startProxy("docker-flow")
	src := testenv.FreePort(t)
	r := p.reconfigure(t, "serviceName=redis&reqMode=tcp&srcPort="+strconv.Itoa(src))
	if r.ReqMode != "tcp" || r.SrcPort != src {
		t.Errorf("answer = %+v, want reqMode tcp and srcPort %d", r, src)
	}
	addr := "127.0.0.1:" + strconv.Itoa(src)
	got, err := tcpRoundTrip(addr, "PING")
	if err != nil || got != "redis-1 PING" {
		t.Fatalf("through the TCP frontend: %q, %v; want the backend's echo", got, err)
	}
	if kv, _ := e.kvGet("docker-flow/redis/reqmode"); kv != "tcp" {
		t.Errorf("KV reqmode = %q", kv)
	}
	if kv, _ := e.kvGet("docker-flow/redis/srcport"); kv != strconv.Itoa(src) {
		t.Errorf("KV srcport = %q", kv)
	}

	// A port the proxy serves HTTP on, or a port another TCP route holds, is refused; nothing changes.
	before := p.config(t)
	httpPort := p.http[strings.LastIndex(p.http, ":")+1:]
	for _, q := range []string{
		"serviceName=other&reqMode=tcp&srcPort=" + httpPort,
		"serviceName=other&reqMode=tcp&srcPort=" + strconv.Itoa(src),
	} {
		code, resp := p.call(t, "/v1/docker-flow-proxy/reconfigure?"+q)
		if code != http.StatusBadRequest || !strings.Contains(resp.Message, "srcPort") {
			t.Errorf("%s: %d %q, want 400 naming srcPort", q, code, resp.Message)
		}
	}
	if p.config(t) != before {
		t.Error("a refused TCP route changed the config")
	}

	// port selects the Consul service of one of the service's ports (<service>-<port>).
	e.tcpEcho("cache-6380", "cache-6380-1")
	src2 := testenv.FreePort(t)
	p.reconfigure(t, "serviceName=cache&reqMode=tcp&port=6380&srcPort="+strconv.Itoa(src2))
	if got, err := tcpRoundTrip("127.0.0.1:"+strconv.Itoa(src2), "GET k"); err != nil || got != "cache-6380-1 GET k" {
		t.Fatalf("through the port's TCP frontend: %q, %v", got, err)
	}

	// A new instance is balanced over with no call (the catalog is followed); remove closes the port.
	e.tcpEcho("redis", "redis-2")
	seen := map[string]bool{}
	eventually(t, 5*time.Second, "both TCP instances answer", func() bool {
		if got, err := tcpRoundTrip(addr, "x"); err == nil {
			seen[strings.Fields(got)[0]] = true
		}
		return seen["redis-1"] && seen["redis-2"]
	})
	if code, _ := p.call(t, "/v1/docker-flow-proxy/remove?serviceName=redis"); code != http.StatusOK {
		t.Fatalf("remove: %d", code)
	}
	if _, err := tcpRoundTrip(addr, "x"); err == nil {
		t.Error("the TCP port still answers after remove")
	}
}

// tlsBackend starts an HTTPS server that presents a certificate for name and answers with its
// name, registers it as an instance of service, and returns the certificate's pool.
func (e *env) tlsBackend(service, name string) *x509.CertPool {
	e.t.Helper()
	_, certPEM, keyPEM := testenv.NewCert(e.t, name)
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		e.t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%s %s", name, r.URL.Path)
	}))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{pair}}
	srv.StartTLS()
	e.t.Cleanup(srv.Close)
	port, _ := strconv.Atoi(srv.URL[strings.LastIndex(srv.URL, ":")+1:])
	e.consul.RegisterService(service, name, "127.0.0.1", port)
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(certPEM)
	return pool
}

// sniGet opens TLS to addr asking for name, verifies the certificate against pool (so the
// connection reached the backend itself: the proxy has no such key) and returns the body of GET /.
func sniGet(addr, name string, pool *x509.CertPool) (string, error) {
	d := &net.Dialer{Timeout: 5 * time.Second}
	tr := &http.Transport{DisableKeepAlives: true, TLSClientConfig: &tls.Config{ServerName: name, RootCAs: pool},
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return d.DialContext(ctx, network, addr) // every request goes to the proxy's SNI port
		}}
	c := &http.Client{Timeout: 10 * time.Second, Transport: tr}
	resp, err := c.Get("https://" + name + "/")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

func TestReqModeSNIRoutesTLSByName(t *testing.T) {
	e := newEnv(t)
	poolA := e.tlsBackend("site-a", "a.test")
	poolB := e.tlsBackend("site-b", "b.test")
	p := e.startProxy("docker-flow")
	src := strconv.Itoa(testenv.FreePort(t))
	p.reconfigure(t, "serviceName=site-a&reqMode=sni&srcPort="+src+"&serviceDomain=a.test")
	p.reconfigure(t, "serviceName=site-b&reqMode=sni&srcPort="+src+"&serviceDomain=b.test")
	addr := "127.0.0.1:" + src
	for name, pool := range map[string]*x509.CertPool{"a.test": poolA, "b.test": poolB} {
		body, err := sniGet(addr, name, pool)
		if err != nil || body != name+" /" {
			t.Errorf("TLS for %s through the SNI port: %q, %v; want the backend's own certificate and answer", name, body, err)
		}
	}
	// A name no route lists gets no backend.
	if body, err := sniGet(addr, "c.test", poolA); err == nil {
		t.Errorf("an unknown name reached a backend: %q", body)
	}
	// A name already routed on the port is refused.
	code, resp := p.call(t, "/v1/docker-flow-proxy/reconfigure?serviceName=site-c&reqMode=sni&srcPort="+src+"&serviceDomain=a.test")
	if code != http.StatusBadRequest || !strings.Contains(resp.Message, "srcPort") {
		t.Errorf("a second route for a.test: %d %q, want 400 naming srcPort", code, resp.Message)
	}
}

func TestIndexedDestinationsRouteOneServiceSeveralWays(t *testing.T) {
	e := newEnv(t)
	e.backend("books-ms", "books-1")
	e.backend("books-ms-9000", "books-admin-1")
	e.tcpEcho("books-ms-7000", "books-raw-1")
	p := e.startProxy("docker-flow")
	src := strconv.Itoa(testenv.FreePort(t))
	r := p.reconfigure(t, "serviceName=books-ms&servicePath=/api/v1/books"+
		"&servicePath.1=/admin&port.1=9000&reqMode.2=tcp&srcPort.2="+src+"&port.2=7000")
	if len(r.Destinations) != 2 || r.Destinations[0].Port != 9000 || r.Destinations[1].SrcPort != mustAtoi(t, src) {
		t.Errorf("answer's destinations = %+v", r.Destinations)
	}
	for path, want := range map[string]string{"/api/v1/books/1": "books-1", "/admin/users": "books-admin-1"} {
		code, body := get(t, p.http+path, nil)
		if code != http.StatusOK || !strings.HasPrefix(body, want+" ") {
			t.Errorf("GET %s: %d %q, want an answer from %s", path, code, body, want)
		}
	}
	if got, err := tcpRoundTrip("127.0.0.1:"+src, "hello"); err != nil || got != "books-raw-1 hello" {
		t.Errorf("TCP destination: %q, %v", got, err)
	}
	for key, want := range map[string]string{"path": "/api/v1/books", "path.1": "/admin", "port.1": "9000",
		"reqmode.2": "tcp", "srcport.2": src, "port.2": "7000"} {
		if got, _ := e.kvGet("docker-flow/books-ms/" + key); got != want {
			t.Errorf("KV %s = %q, want %q", key, got, want)
		}
	}
	// Each destination's Consul service is followed: a second admin instance is served with no call.
	e.backend("books-ms-9000", "books-admin-2")
	eventually(t, 5*time.Second, "the second admin instance receives traffic", func() bool {
		return backendsReached(t, p.http+"/admin", 4)["books-admin-2"] > 0
	})
	// A new server on the same Consul renders the same config and serves every destination.
	second := e.startProxy("docker-flow")
	if a, b := comparable(p.config(t)), comparable(second.config(t)); a != b {
		t.Fatalf("the replicas' configs differ:\n%s\n---\n%s", a, b)
	}
	if code, body := get(t, second.http+"/admin", nil); code != http.StatusOK || !strings.HasPrefix(body, "books-admin-") {
		t.Errorf("the second server's /admin: %d %q", code, body)
	}
	// An indexed parameter with a bad value is a 400 naming it; nothing changes.
	before := p.config(t)
	code, resp := p.call(t, "/v1/docker-flow-proxy/reconfigure?serviceName=books-ms&servicePath=/api&servicePath.1=/a%0Ab")
	if code != http.StatusBadRequest || !strings.Contains(resp.Message, "servicePath.1") {
		t.Errorf("bad servicePath.1: %d %q", code, resp.Message)
	}
	if p.config(t) != before {
		t.Error("a refused request changed the config")
	}
}

func mustAtoi(t *testing.T, s string) int {
	t.Helper()
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatal(err)
	}
	return n
}
