package server

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/api"
	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
)

// certProxy is a server with a certificates folder and the address of its HTTPS port.
type certProxy struct {
	*running
	certsDir string
	https    string // 127.0.0.1:port
}

func (e *env) startCertProxy(instanceName string) *certProxy {
	e.t.Helper()
	cp := &certProxy{certsDir: filepath.Join(e.t.TempDir(), "certs")}
	cp.running = e.startProxyWith(instanceName, func(c *Config) {
		c.CertsDir = cp.certsDir
		cp.https = net.JoinHostPort("127.0.0.1", strconv.Itoa(c.HTTPSPort))
	})
	return cp
}

// putCert sends PUT /cert and decodes the answer.
func (p *certProxy) putCert(t *testing.T, query string, body []byte) (int, api.Response) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPut, p.api+"/v1/docker-flow-proxy/cert?"+query, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := httpClient.Do(req)
	if err != nil {
		t.Fatalf("PUT /cert?%s: %v", query, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var r api.Response
	if err := json.Unmarshal(b, &r); err != nil {
		t.Fatalf("PUT /cert?%s: %d, answer is not JSON: %q", query, resp.StatusCode, b)
	}
	return resp.StatusCode, r
}

// peerName dials the HTTPS port with SNI serverName and returns the DNS name of the certificate
// presented; "" and the error when the handshake fails.
func peerName(addr, serverName string) (string, error) {
	d := &net.Dialer{Timeout: 5 * time.Second}
	conn, err := tls.DialWithDialer(d, "tcp", addr, &tls.Config{ServerName: serverName, InsecureSkipVerify: true})
	if err != nil {
		return "", err
	}
	defer conn.Close()
	certs := conn.ConnectionState().PeerCertificates
	if len(certs) == 0 || len(certs[0].DNSNames) == 0 {
		return "", nil
	}
	return certs[0].DNSNames[0], nil
}

// presents waits until the HTTPS port presents the certificate for name when asked for it by SNI.
func presents(t *testing.T, addr, name string) {
	t.Helper()
	var got string
	var err error
	eventually(t, 10*time.Second, "the certificate for "+name+" is presented", func() bool {
		got, err = peerName(addr, name)
		return err == nil && got == name
	})
}

func (p *certProxy) files(t *testing.T) map[string]string {
	t.Helper()
	out := map[string]string{}
	entries, err := os.ReadDir(p.certsDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(p.certsDir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		out[e.Name()] = string(b)
	}
	return out
}

func (p *certProxy) certNames(t *testing.T) []string {
	t.Helper()
	code, body := get(t, p.api+"/v1/docker-flow-proxy/certs", nil)
	var r api.CertsResponse
	if code != http.StatusOK || json.Unmarshal([]byte(body), &r) != nil || r.Status != api.StatusOK {
		t.Fatalf("GET /certs: %d %q", code, body)
	}
	return r.Certs
}

func TestPutCertIsServedAndChosenBySNI(t *testing.T) {
	e := newEnv(t)
	p := e.startCertProxy("docker-flow")
	// No certificate yet: no HTTPS port.
	if strings.Contains(p.config(t), "ssl crt") {
		t.Fatalf("https is bound without a certificate:\n%s", p.config(t))
	}
	if names := p.certNames(t); len(names) != 0 {
		t.Fatalf("certs: %v", names)
	}
	a, _, _ := testenv.NewCert(t, "a.example.com")
	b, _, _ := testenv.NewCert(t, "b.example.com")
	if code, r := p.putCert(t, "certName=a.example.com.pem", a); code != http.StatusOK || r.Status != api.StatusOK {
		t.Fatalf("PUT a: %d %+v", code, r)
	}
	presents(t, p.https, "a.example.com")
	// The name gets .pem appended.
	if code, r := p.putCert(t, "certName=b.example.com", b); code != http.StatusOK || r.Status != api.StatusOK {
		t.Fatalf("PUT b: %d %+v", code, r)
	}
	presents(t, p.https, "b.example.com")
	presents(t, p.https, "a.example.com")
	if names := p.certNames(t); !reflect.DeepEqual(names, []string{"a.example.com.pem", "b.example.com.pem"}) {
		t.Fatalf("certs: %v", names)
	}
	if kv := e.kvTree("docker-flow-certs/"); kv["docker-flow-certs/a.example.com.pem"] != string(a) ||
		kv["docker-flow-certs/b.example.com.pem"] != string(b) || len(kv) != 2 {
		t.Fatalf("KV holds %d keys: %v", len(kv), keysOf(kv))
	}
	if kv := e.kvTree("docker-flow/"); len(kv) != 0 {
		t.Fatalf("certificates reached the route table: %v", keysOf(kv))
	}
	fi, err := os.Stat(filepath.Join(p.certsDir, "a.example.com.pem"))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("a.example.com.pem: %v %v, want mode 0600", fi, err)
	}
	// Replacing a certificate serves the new one.
	a2, _, _ := testenv.NewCert(t, "a.example.com")
	if code, r := p.putCert(t, "certName=a.example.com.pem", a2); code != http.StatusOK {
		t.Fatalf("PUT a again: %d %+v", code, r)
	}
	if got := p.files(t)["a.example.com.pem"]; got != string(a2) {
		t.Fatal("the certificate was not replaced in the folder")
	}
	d := &net.Dialer{Timeout: 5 * time.Second}
	conn, err := tls.DialWithDialer(d, "tcp", p.https, &tls.Config{ServerName: "a.example.com", InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	want, _ := pem.Decode(a2)
	if !bytes.Equal(conn.ConnectionState().PeerCertificates[0].Raw, want.Bytes) {
		t.Fatal("the replaced certificate is still presented")
	}
}

func keysOf(m map[string]string) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

func TestBadCertsAreRefusedAndChangeNothing(t *testing.T) {
	e := newEnv(t)
	p := e.startCertProxy("docker-flow")
	good, certOnly, _ := testenv.NewCert(t, "good.example.com")
	if code, r := p.putCert(t, "certName=good", good); code != http.StatusOK {
		t.Fatalf("PUT good: %d %+v", code, r)
	}
	presents(t, p.https, "good.example.com")
	_, _, otherKey := testenv.NewCert(t, "other.example.com")
	filesBefore, kvBefore, reloadsBefore := p.files(t), e.kvTree("docker-flow-certs/"), reloads(t, p.running)

	for _, tc := range []struct {
		name, query string
		body        []byte
		param       string
	}{
		{"garbage", "certName=x.pem", []byte("not a certificate"), "body"},
		{"empty", "certName=x.pem", nil, "body"},
		{"certificate without key", "certName=x.pem", certOnly, "body"},
		{"key not matching", "certName=x.pem", append(append([]byte{}, certOnly...), otherKey...), "body"},
		{"key only", "certName=x.pem", otherKey, "body"},
		{"bad certificate block", "certName=x.pem", append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte("junk")}), otherKey...), "body"},
		{"too large", "certName=x.pem", append(bytes.Repeat([]byte("a"), 1<<20), good...), "body"},
		{"no name", "", good, "certName"},
		{"name with slash", "certName=" + url.QueryEscape("../x.pem"), good, "certName"},
		{"name with space", "certName=a%20b", good, "certName"},
		{"name with newline", "certName=a%0Ab", good, "certName"},
		{"hidden name", "certName=.x", good, "certName"},
		{"overwriting with garbage", "certName=good.pem", []byte("junk"), "body"},
	} {
		code, r := p.putCert(t, tc.query, tc.body)
		if code != http.StatusBadRequest || r.Status != api.StatusNOK || !strings.Contains(r.Message, tc.param) {
			t.Errorf("%s: %d %+v; want 400 naming %s", tc.name, code, r, tc.param)
		}
	}
	// A bad serviceCert is refused like a bad body, and the route is not written either.
	code, r := p.call(t, "/v1/docker-flow-proxy/reconfigure?serviceName=svc&servicePath=/svc&serviceCert="+url.QueryEscape(string(certOnly)))
	if code != http.StatusBadRequest || !strings.Contains(r.Message, "serviceCert") {
		t.Errorf("bad serviceCert: %d %+v", code, r)
	}
	if code, _ := get(t, p.api+"/v1/docker-flow-proxy/cert?certName=x", nil); code != http.StatusMethodNotAllowed {
		t.Errorf("GET /cert: %d, want 405", code)
	}
	if f := p.files(t); !reflect.DeepEqual(f, filesBefore) {
		t.Errorf("a bad certificate changed the folder: %v", keysOf(f))
	}
	if kv := e.kvTree("docker-flow-certs/"); !reflect.DeepEqual(kv, kvBefore) {
		t.Errorf("a bad certificate changed KV: %v", keysOf(kv))
	}
	if kv := e.kvTree("docker-flow/"); len(kv) != 0 {
		t.Errorf("a bad serviceCert wrote the route: %v", keysOf(kv))
	}
	if n := reloads(t, p.running); n != reloadsBefore {
		t.Errorf("bad certificates caused %d reloads", n-reloadsBefore)
	}
	presents(t, p.https, "good.example.com")
}

func TestANewReplicaServesTheCertificatesInKV(t *testing.T) {
	e := newEnv(t)
	first := e.startCertProxy("docker-flow")
	c, _, _ := testenv.NewCert(t, "shared.example.com")
	if code, r := first.putCert(t, "certName=shared.example.com", c); code != http.StatusOK {
		t.Fatalf("PUT: %d %+v", code, r)
	}
	second := e.startCertProxy("docker-flow") // its certificates folder is empty
	presents(t, second.https, "shared.example.com")
	if got := second.files(t)["shared.example.com.pem"]; got != string(c) {
		t.Fatalf("the second replica's folder holds %q", got)
	}
	// Another instance name shares no certificate.
	other := e.startCertProxy("other")
	if names := other.certNames(t); len(names) != 0 {
		t.Fatalf("instance other serves %v", names)
	}
}

func TestServiceCertOnReconfigureIsStoredAndServed(t *testing.T) {
	e := newEnv(t)
	e.echo("shop", "shop")
	p := e.startCertProxy("docker-flow")
	c, _, _ := testenv.NewCert(t, "shop.example.com")
	p.reconfigure(t, "serviceName=shop&servicePath=/shop&serviceCert="+url.QueryEscape(string(c)))
	presents(t, p.https, "shop.example.com")
	if kv := e.kvTree("docker-flow-certs/"); kv["docker-flow-certs/shop.pem"] != string(c) {
		t.Fatalf("KV: %v", keysOf(kv))
	}
	if kv := e.kvTree("docker-flow/shop/"); kv["docker-flow/shop/path"] != "/shop" || len(kv) != 3 {
		t.Fatalf("route in KV: %v", kv)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(c)
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true,
		TLSClientConfig: &tls.Config{RootCAs: pool, ServerName: "shop.example.com"}}}
	if s := fetchEcho(t, client, "https://"+p.https+"/shop/x", nil); s.Backend != "shop" {
		t.Fatalf("HTTPS reached %q", s.Backend)
	}
}

// A certificate stored through one replica is served by the other replicas while they run.
func TestRunningReplicasServeACertificatePutOnAnother(t *testing.T) {
	e := newEnv(t)
	first := e.startCertProxy("docker-flow")
	second := e.startCertProxy("docker-flow")
	other := e.startCertProxy("other")
	c, _, _ := testenv.NewCert(t, "live.example.com")
	if code, r := first.putCert(t, "certName=live.example.com", c); code != http.StatusOK {
		t.Fatalf("PUT: %d %+v", code, r)
	}
	presents(t, second.https, "live.example.com")
	if got := second.files(t)["live.example.com.pem"]; got != string(c) {
		t.Fatalf("the second replica's folder holds %q", got)
	}
	// A replaced certificate is served again; another instance name is not touched.
	c2, _, _ := testenv.NewCert(t, "live.example.com")
	if code, r := second.putCert(t, "certName=live.example.com", c2); code != http.StatusOK {
		t.Fatalf("PUT on the second: %d %+v", code, r)
	}
	eventually(t, 10*time.Second, "the first replica holds the replaced certificate", func() bool {
		return first.files(t)["live.example.com.pem"] == string(c2)
	})
	if names := other.certNames(t); len(names) != 0 {
		t.Fatalf("instance other serves %v", names)
	}
}
