package server

// Integration tests of the optional reconfigure parameters, one per parameter, through the real
// HAProxy and Consul: each asserts what a client or the service behind the proxy sees.

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
	"github.com/docker-flow-proxy/docker-flow-proxy/route/routetest"
)

// seen is what the echo backend received.
type seen struct {
	Backend string
	URI     string // the request target as sent: path and query, still percent-encoded
	Host    string
	Header  http.Header
}

// echo starts a backend that answers with what it received, as JSON, and registers it in Consul
// as an instance of service. A query parameter sleep=<duration> (at most 5s) delays the answer.
func (e *env) echo(service, name string) {
	e.t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if d, err := time.ParseDuration(r.URL.Query().Get("sleep")); err == nil {
			select {
			case <-time.After(min(d, 5*time.Second)):
			case <-r.Context().Done():
				return
			}
		}
		w.Header().Set("X-Backend", name)
		json.NewEncoder(w).Encode(seen{Backend: name, URI: r.RequestURI, Host: r.Host, Header: r.Header})
	}))
	e.t.Cleanup(srv.Close)
	port, _ := strconv.Atoi(srv.URL[strings.LastIndex(srv.URL, ":")+1:])
	e.consul.RegisterService(service, name, "127.0.0.1", port)
}

// tunnelBackend starts a backend that accepts an Upgrade with 101 and then echoes every line.
func (e *env) tunnelBackend(service, name string) {
	e.t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		conn, rw, err := w.(http.Hijacker).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(20 * time.Second))
		fmt.Fprint(rw, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")
		rw.Flush()
		for {
			line, err := rw.ReadString('\n')
			if err != nil {
				return
			}
			rw.WriteString(line)
			rw.Flush()
		}
	}))
	e.t.Cleanup(srv.Close)
	port, _ := strconv.Atoi(srv.URL[strings.LastIndex(srv.URL, ":")+1:])
	e.consul.RegisterService(service, name, "127.0.0.1", port)
}

// noRedirects is a client without keep-alive (see httpClient) that shows redirects instead of
// following them.
var noRedirects = &http.Client{
	Timeout:       10 * time.Second,
	Transport:     &http.Transport{DisableKeepAlives: true},
	CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
}

// fetch sends a GET with c; set, when not nil, changes the request (headers, Host, credentials).
// The answer's body is read and returned.
func fetch(t *testing.T, c *http.Client, url string, set func(*http.Request)) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if set != nil {
		set(req)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	return resp, string(b)
}

// fetchEcho sends a GET as fetch does and returns what the echo backend saw.
func fetchEcho(t *testing.T, c *http.Client, url string, set func(*http.Request)) seen {
	t.Helper()
	resp, body := fetch(t, c, url, set)
	return echoed(t, resp, body)
}

// echoed decodes the echo backend's answer; anything else fails the test.
func echoed(t *testing.T, resp *http.Response, body string) seen {
	t.Helper()
	var s seen
	if resp.StatusCode != http.StatusOK || json.Unmarshal([]byte(body), &s) != nil {
		t.Fatalf("GET %s: %d %q; want the echo backend's answer", resp.Request.URL, resp.StatusCode, body)
	}
	return s
}

func withHost(host string) func(*http.Request) { return func(r *http.Request) { r.Host = host } }

func withAuth(user, pass string) func(*http.Request) {
	return func(r *http.Request) { r.SetBasicAuth(user, pass) }
}

func withHeader(k, v string) func(*http.Request) { return func(r *http.Request) { r.Header.Add(k, v) } }

// tlsProxy is a server that also serves HTTPS, with a certificate its client trusts.
type tlsProxy struct {
	*running
	https  string       // https://127.0.0.1:port
	client *http.Client // no keep-alive, no redirects, trusts the proxy's certificate
}

// startTLSProxy starts a server as startProxy does, with the server-wide users and, with tls,
// a self-signed certificate for 127.0.0.1 in its certificates folder.
func (e *env) startTLSProxy(users string, withTLS bool) *tlsProxy {
	e.t.Helper()
	httpsPort := testenv.FreePort(e.t)
	client := &http.Client{Timeout: noRedirects.Timeout, CheckRedirect: noRedirects.CheckRedirect,
		Transport: &http.Transport{DisableKeepAlives: true}}
	p := e.startProxyWith("docker-flow", func(c *Config) {
		c.Users, c.HTTPSPort = users, httpsPort
		if withTLS {
			c.CertsDir = e.t.TempDir()
			pool := writeCertificate(e.t, c.CertsDir)
			client.Transport = &http.Transport{DisableKeepAlives: true, TLSClientConfig: &tls.Config{RootCAs: pool}}
		}
	})
	return &tlsProxy{running: p, https: "https://127.0.0.1:" + strconv.Itoa(httpsPort), client: client}
}

// writeCertificate writes a self-signed certificate for 127.0.0.1 and its key as one PEM file in
// dir, and returns a pool that trusts it.
func writeCertificate(t *testing.T, dir string) *x509.CertPool {
	t.Helper()
	full, certPEM, _ := testenv.NewCert(t, "127.0.0.1")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "proxy.pem"), full, 0o600); err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(certPEM) {
		t.Fatal("the test certificate does not parse")
	}
	return pool
}

func TestReqPathSearchAndReplaceRewriteThePath(t *testing.T) {
	e := newEnv(t)
	for _, s := range []string{"http", "vote", "items"} {
		e.echo(s, s)
	}
	p := e.startProxy("docker-flow")
	p.reconfigure(t, "serviceName=http&servicePath=/http&reqPathSearch=/http/&reqPathReplace=/renamed/")
	p.reconfigure(t, "serviceName=vote&servicePath=/vote&reqPathSearch=^/vote/&reqPathReplace=/")
	// A back-reference, and a '%' in the replacement that HAProxy must not read as log-format.
	p.reconfigure(t, "serviceName=items&servicePath=/items&reqPathSearch="+url.QueryEscape(`^/items/([0-9]+)$`)+
		"&reqPathReplace="+url.QueryEscape(`/item%20\1`))
	for path, want := range map[string]string{
		"/http/x/y":     "/renamed/x/y",
		"/http/a/http/": "/renamed/a/http/", // the first match only, as the original's regsub
		"/vote/a?q=1":   "/a?q=1",
		"/vote":         "/vote",
		"/items/42":     "/item%2042",
		"/items/42/not": "/items/42/not",
	} {
		if got := fetchEcho(t, httpClient, p.http+path, nil).URI; got != want {
			t.Errorf("GET %s: the backend saw %s, want %s", path, got, want)
		}
	}
}

func TestUsersAskForCredentials(t *testing.T) {
	e := newEnv(t)
	for _, s := range []string{"clear", "hashed", "open"} {
		e.echo(s, s)
	}
	p := e.startProxy("docker-flow")
	p.reconfigure(t, "serviceName=clear&servicePath=/clear&users=alice:secret,bob:"+url.QueryEscape("p@ss:w%rd!"))
	p.reconfigure(t, "serviceName=hashed&servicePath=/hashed&usersPassEncrypted=true&users=carol:"+url.QueryEscape(routetest.Hash))
	p.reconfigure(t, "serviceName=open&servicePath=/open")

	resp, _ := fetch(t, httpClient, p.http+"/clear", nil)
	if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(resp.Header.Get("WWW-Authenticate"), `Basic realm="clear"`) {
		t.Fatalf("without credentials: %d %q; want 401 asking for Basic auth", resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
	}
	for _, tc := range []struct {
		path, user, pass string
		want             int
	}{
		{"/clear", "alice", "secret", http.StatusOK},
		{"/clear", "bob", "p@ss:w%rd!", http.StatusOK},
		{"/clear", "alice", "wrong", http.StatusUnauthorized},
		{"/clear", "carol", "secret", http.StatusUnauthorized},
		{"/hashed", "carol", "secret", http.StatusOK},
		{"/hashed", "carol", routetest.Hash, http.StatusUnauthorized},
		{"/hashed", "alice", "secret", http.StatusUnauthorized},
	} {
		resp, body := fetch(t, httpClient, p.http+tc.path, withAuth(tc.user, tc.pass))
		if resp.StatusCode != tc.want {
			t.Errorf("%s as %s: %d, want %d", tc.path, tc.user, resp.StatusCode, tc.want)
		}
		if tc.want == http.StatusOK {
			echoed(t, resp, body)
		}
	}
	if resp, _ := fetch(t, httpClient, p.http+"/hashed", nil); resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("hashed route without credentials: %d", resp.StatusCode)
	}
	if resp, _ := fetch(t, httpClient, p.http+"/open", nil); resp.StatusCode != http.StatusOK {
		t.Errorf("a route without users asked for credentials: %d", resp.StatusCode)
	}
}

func TestServerWideUsersProtectEveryRouteWithoutItsOwn(t *testing.T) {
	e := newEnv(t)
	e.echo("shared", "shared")
	e.echo("own", "own")
	p := e.startTLSProxy("admin:adminpw,ops:"+routetest.Hash, false)
	p.reconfigure(t, "serviceName=shared&servicePath=/shared")
	p.reconfigure(t, "serviceName=own&servicePath=/own&users=dave:davepw")
	for _, tc := range []struct {
		path, user, pass string
		want             int
	}{
		{"/shared", "", "", http.StatusUnauthorized},
		{"/shared", "admin", "adminpw", http.StatusOK},
		{"/shared", "ops", "secret", http.StatusOK}, // a hash in USERS
		{"/shared", "admin", "wrong", http.StatusUnauthorized},
		{"/shared", "dave", "davepw", http.StatusUnauthorized},
		{"/own", "", "", http.StatusUnauthorized},
		{"/own", "dave", "davepw", http.StatusOK},
		{"/own", "admin", "adminpw", http.StatusUnauthorized}, // the route's own users replace USERS
	} {
		var set func(*http.Request)
		if tc.user != "" {
			set = withAuth(tc.user, tc.pass)
		}
		if resp, _ := fetch(t, httpClient, p.http+tc.path, set); resp.StatusCode != tc.want {
			t.Errorf("%s as %q: %d, want %d", tc.path, tc.user, resp.StatusCode, tc.want)
		}
	}
}

func TestBadServerWideUsersStopTheStart(t *testing.T) {
	_, err := Start(context.Background(), Config{Users: "admin:with space", ConfigDir: t.TempDir()})
	if err == nil || !strings.Contains(err.Error(), "USERS") {
		t.Fatalf("Start with a bad USERS: %v", err)
	}
}

func TestHTTPSOnlyRedirectsPlainHTTP(t *testing.T) {
	e := newEnv(t)
	e.echo("secure", "secure")
	e.echo("plain", "plain")
	p := e.startTLSProxy("", true)
	p.reconfigure(t, "serviceName=secure&servicePath=/secure&httpsOnly=true")
	p.reconfigure(t, "serviceName=plain&servicePath=/plain")

	resp, _ := fetch(t, p.client, p.http+"/secure/x?q=1", withHost("books.example.com"))
	if resp.StatusCode != http.StatusMovedPermanently || resp.Header.Get("Location") != "https://books.example.com/secure/x?q=1" {
		t.Fatalf("plain HTTP: %d Location %q; want 301 to https://books.example.com/secure/x?q=1", resp.StatusCode, resp.Header.Get("Location"))
	}
	if s := fetchEcho(t, p.client, p.https+"/secure/x", nil); s.Backend != "secure" {
		t.Fatalf("HTTPS reached %q", s.Backend)
	}
	if resp, _ := fetch(t, p.client, p.http+"/plain", nil); resp.StatusCode != http.StatusOK {
		t.Fatalf("a route without httpsOnly redirected: %d", resp.StatusCode)
	}
}

func TestRedirectWhenHttpProtoFollowsTheLoadBalancersHeader(t *testing.T) {
	e := newEnv(t)
	e.echo("behind-lb", "behind-lb")
	p := e.startProxy("docker-flow")
	p.reconfigure(t, "serviceName=behind-lb&servicePath=/lb&redirectWhenHttpProto=true&httpsOnly=true")

	resp, _ := fetch(t, noRedirects, p.http+"/lb/x", func(r *http.Request) {
		r.Host = "shop.example.com"
		r.Header.Set("X-Forwarded-Proto", "http")
	})
	if resp.StatusCode != http.StatusMovedPermanently || resp.Header.Get("Location") != "https://shop.example.com/lb/x" {
		t.Fatalf("X-Forwarded-Proto: http: %d Location %q; want 301 to https://shop.example.com/lb/x", resp.StatusCode, resp.Header.Get("Location"))
	}
	// The load balancer terminated TLS: a plain connection with X-Forwarded-Proto https is served.
	if s := fetchEcho(t, noRedirects, p.http+"/lb/x", withHeader("X-Forwarded-Proto", "https")); s.Backend != "behind-lb" {
		t.Fatalf("X-Forwarded-Proto: https reached %q", s.Backend)
	}
	fetchEcho(t, noRedirects, p.http+"/lb/x", nil)
}

func TestXForwardedProtoTellsTheBackendHowTheClientCame(t *testing.T) {
	e := newEnv(t)
	e.echo("proto", "proto")
	p := e.startTLSProxy("", true)
	p.reconfigure(t, "serviceName=proto&servicePath=/proto&xForwardedProto=true")
	if got := fetchEcho(t, p.client, p.http+"/proto", nil).Header.Values("X-Forwarded-Proto"); !reflect.DeepEqual(got, []string{"http"}) {
		t.Errorf("over HTTP the backend saw X-Forwarded-Proto %q, want http", got)
	}
	if got := fetchEcho(t, p.client, p.https+"/proto", nil).Header.Values("X-Forwarded-Proto"); !reflect.DeepEqual(got, []string{"https"}) {
		t.Errorf("over HTTPS the backend saw X-Forwarded-Proto %q, want https", got)
	}
	// A client cannot pretend.
	got := fetchEcho(t, p.client, p.http+"/proto", withHeader("X-Forwarded-Proto", "https")).Header.Values("X-Forwarded-Proto")
	if !reflect.DeepEqual(got, []string{"http"}) {
		t.Errorf("over HTTP with a forged header the backend saw %q, want http", got)
	}
}

func TestAddHeaderAndSetHeaderReachTheBackend(t *testing.T) {
	e := newEnv(t)
	e.echo("headers", "headers")
	p := e.startProxy("docker-flow")
	p.reconfigure(t, "serviceName=headers&servicePath=/headers&addHeader="+url.QueryEscape("X-Added:one two,X-Added:three")+
		"&setHeader="+url.QueryEscape("X-Set:a=b;c,X-Original value:with:colons"))
	s := fetchEcho(t, httpClient, p.http+"/headers", func(r *http.Request) {
		r.Header.Set("X-Added", "from-client")
		r.Header.Set("X-Set", "from-client")
	})
	if got := s.Header.Values("X-Added"); !reflect.DeepEqual(got, []string{"from-client", "one two", "three"}) {
		t.Errorf("X-Added = %q; want the client's value then the two added", got)
	}
	if got := s.Header.Values("X-Set"); !reflect.DeepEqual(got, []string{"a=b;c"}) {
		t.Errorf("X-Set = %q; want the set value only", got)
	}
	if got := s.Header.Values("X-Original"); !reflect.DeepEqual(got, []string{"value:with:colons"}) {
		t.Errorf("X-Original = %q", got)
	}
}

func TestTimeoutServerAnswers504WhenTheServiceIsSlower(t *testing.T) {
	e := newEnv(t)
	e.echo("slow", "slow")
	p := e.startProxy("docker-flow")
	p.reconfigure(t, "serviceName=slow&servicePath=/slow&timeoutServer=1")
	if !strings.Contains(p.config(t), "    timeout server 1s\n") {
		t.Fatal("the config lacks timeout server 1s")
	}
	start := time.Now()
	resp, _ := fetch(t, httpClient, p.http+"/slow?sleep=4s", nil)
	if resp.StatusCode != http.StatusGatewayTimeout || time.Since(start) > 3500*time.Millisecond {
		t.Fatalf("a service 4 s slow: %d after %s; want 504 after about 1 s", resp.StatusCode, time.Since(start))
	}
	fetchEcho(t, httpClient, p.http+"/slow?sleep=100ms", nil)
}

func TestTimeoutTunnelClosesIdleTunnels(t *testing.T) {
	e := newEnv(t)
	e.tunnelBackend("short", "short")
	e.tunnelBackend("default", "default")
	p := e.startProxy("docker-flow")
	p.reconfigure(t, "serviceName=short&servicePath=/short&timeoutTunnel=1")
	p.reconfigure(t, "serviceName=default&servicePath=/default")
	if !strings.Contains(p.config(t), "    timeout tunnel 1s\n") {
		t.Fatal("the config lacks timeout tunnel 1s")
	}
	if v, _ := e.kvGet("docker-flow/short/timeouttunnel"); v != "1" {
		t.Fatalf("KV timeouttunnel = %q", v)
	}
	// An idle tunnel of the route is closed after about 1 s; one of the other route stays open
	// (its timeouts are the defaults, 30 s).
	if open := tunnelOpenAfter(t, p.http, "/short", 3*time.Second); open {
		t.Error("the tunnel of the route with timeoutTunnel=1 was still open after 3 s idle")
	}
	if open := tunnelOpenAfter(t, p.http, "/default", 3*time.Second); !open {
		t.Error("the tunnel of the route without timeoutTunnel was closed within 3 s")
	}
}

// tunnelOpenAfter opens a tunnel through the proxy, checks that it carries a line, stays idle for
// idle and reports whether it still carries one.
func tunnelOpenAfter(t *testing.T, base, path string, idle time.Duration) bool {
	t.Helper()
	u, _ := url.Parse(base)
	conn, err := net.DialTimeout("tcp", u.Host, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(idle + 10*time.Second))
	fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n", path, u.Host)
	r := bufio.NewReader(conn)
	resp, err := http.ReadResponse(r, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade through %s: %v %v", path, resp, err)
	}
	roundTrip := func() bool {
		if _, err := fmt.Fprint(conn, "ping\n"); err != nil {
			return false
		}
		line, err := r.ReadString('\n')
		return err == nil && line == "ping\n"
	}
	if !roundTrip() {
		t.Fatalf("the tunnel through %s carries nothing", path)
	}
	time.Sleep(idle)
	return roundTrip()
}

func TestACLNameOrdersTheRoutes(t *testing.T) {
	e := newEnv(t)
	for _, s := range []string{"zeta", "alpha", "plain"} {
		e.echo(s, s)
	}
	p := e.startProxy("docker-flow")
	// Without aclName the longest path wins: /api/x goes to alpha.
	p.reconfigure(t, "serviceName=zeta&servicePath=/api")
	p.reconfigure(t, "serviceName=alpha&servicePath=/api/x")
	p.reconfigure(t, "serviceName=plain&servicePath=/api/x/y")
	reached := func(path string) string { return fetchEcho(t, httpClient, p.http+path, nil).Backend }
	if got := reached("/api/x"); got != "alpha" {
		t.Fatalf("without aclName /api/x reached %s, want alpha", got)
	}
	// With aclNames the smaller one wins, whatever the paths; routes without one come after.
	p.reconfigure(t, "serviceName=zeta&servicePath=/api&aclName=01-first")
	p.reconfigure(t, "serviceName=alpha&servicePath=/api/x&aclName=02-second")
	for path, want := range map[string]string{"/api/x": "zeta", "/api/x/y": "zeta", "/api": "zeta"} {
		if got := reached(path); got != want {
			t.Errorf("%s reached %s, want %s", path, got, want)
		}
	}
	p.reconfigure(t, "serviceName=zeta&servicePath=/api&aclName=03-third")
	if got := reached("/api/x"); got != "alpha" {
		t.Errorf("after zeta's aclName became 03-third, /api/x reached %s, want alpha", got)
	}
	if got := reached("/api/other"); got != "zeta" {
		t.Errorf("/api/other reached %s, want zeta", got)
	}
}

func TestServiceDomainMatchAllMatchesSubdomains(t *testing.T) {
	e := newEnv(t)
	for _, s := range []string{"all", "exact", "fallback"} {
		e.echo(s, s)
	}
	p := e.startProxy("docker-flow")
	p.reconfigure(t, "serviceName=all&servicePath=/&serviceDomain=a.com&serviceDomainMatchAll=true")
	p.reconfigure(t, "serviceName=exact&servicePath=/&serviceDomain=b.com")
	p.reconfigure(t, "serviceName=fallback&servicePath=/")
	for host, want := range map[string]string{
		"a.com": "all", "sub.a.com": "all", "x.y.a.com:8000": "all", "SUB.A.COM": "all",
		"a.com.evil.org": "fallback", "xa.com": "fallback", "evil.org": "fallback",
		"b.com": "exact", "sub.b.com": "fallback",
	} {
		if got := fetchEcho(t, httpClient, p.http+"/", withHost(host)).Backend; got != want {
			t.Errorf("Host %s reached %s, want %s", host, got, want)
		}
	}
}

func TestOutboundHostnameIsTheHostTheBackendSees(t *testing.T) {
	e := newEnv(t)
	e.echo("renamed", "renamed")
	e.echo("kept", "kept")
	p := e.startProxy("docker-flow")
	p.reconfigure(t, "serviceName=renamed&servicePath=/renamed&outboundHostname=internal.example.com")
	p.reconfigure(t, "serviceName=kept&servicePath=/kept")
	if got := fetchEcho(t, httpClient, p.http+"/renamed", withHost("public.example.com")).Host; got != "internal.example.com" {
		t.Errorf("the backend saw Host %q, want internal.example.com", got)
	}
	if got := fetchEcho(t, httpClient, p.http+"/kept", withHost("public.example.com")).Host; got != "public.example.com" {
		t.Errorf("a route without outboundHostname: the backend saw Host %q", got)
	}
}

// Every option goes through Consul KV: a second server reads the same routes and renders the same
// config, and KV holds one readable key per option.
func TestSecondServerServesEveryOptionFromKV(t *testing.T) {
	e := newEnv(t)
	e.echo("everything", "everything")
	e.echo("second", "second")
	first := e.startProxy("docker-flow")
	first.reconfigure(t, "serviceName=everything&servicePath=/vote,/http&serviceDomain=a.example.com&serviceDomainMatchAll=true"+
		"&aclName=10-everything&httpsOnly=true&redirectWhenHttpProto=true&xForwardedProto=true"+
		"&users=alice:"+url.QueryEscape(routetest.Hash)+",bob:"+url.QueryEscape(routetest.Hash)+"&usersPassEncrypted=true"+
		"&reqPathSearch="+url.QueryEscape(`^/vote/(.*)$`)+"&reqPathReplace="+url.QueryEscape(`/ballot%20box/\1`)+
		"&outboundHostname=internal.example.com&addHeader="+url.QueryEscape("X-A:one two,X-A:three")+
		"&setHeader="+url.QueryEscape("X-Set:a=b;c")+"&timeoutServer=5&timeoutTunnel=3600")
	first.reconfigure(t, "serviceName=second&servicePath=/second&users=carol:pw&aclName=05-second&timeoutServer=2")

	want := map[string]string{
		"servicedomainmatchall": "true", "aclname": "10-everything", "httpsonly": "true", "redirectwhenhttpproto": "true",
		"xforwardedproto": "true", "users": "alice:" + routetest.Hash + ",bob:" + routetest.Hash, "userspassencrypted": "true",
		"reqpathsearch": `^/vote/(.*)$`, "reqpathreplace": `/ballot%20box/\1`, "outboundhostname": "internal.example.com",
		"addheader": "X-A:one two,X-A:three", "setheader": "X-Set:a=b;c", "timeoutserver": "5", "timeouttunnel": "3600",
	}
	kv := e.kvTree("docker-flow/everything/")
	for k, v := range want {
		if kv["docker-flow/everything/"+k] != v {
			t.Errorf("KV %s = %q, want %q", k, kv["docker-flow/everything/"+k], v)
		}
	}

	second := e.startProxy("docker-flow")
	if a, b := comparable(first.config(t)), comparable(second.config(t)); a != b {
		t.Fatalf("the replicas' configs differ:\n%s\n---\n%s", a, b)
	}
	for _, line := range []string{"userlist everything-users", "http-request replace-path", "timeout tunnel 3600s", "use_backend second-be"} {
		if !strings.Contains(second.config(t), line) {
			t.Errorf("the second server's config lacks %q", line)
		}
	}
	if resp, _ := fetch(t, httpClient, second.http+"/second", nil); resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("the second server let a request without credentials through: %d", resp.StatusCode)
	}
	if s := fetchEcho(t, httpClient, second.http+"/second", withAuth("carol", "pw")); s.Backend != "second" {
		t.Errorf("the second server: %+v", s)
	}
}
