package server

// Custom templates (templateFePath, templateBePath and the original's consulTemplate* names): files
// of the templates folder in consul-template syntax, rendered in process against the real Consul,
// through the real HAProxy.

import (
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const (
	feTemplate = `    acl url_custom path_beg /custom
{{- if service "books-ms"}}
    use_backend books-ms-be if url_custom
{{- end}}
`
	beTemplate = `backend books-ms-be
    http-response set-header X-Template custom-backend
{{- range service "books-ms" "any"}}
    server {{.Node}}_{{.Port}} {{.Address}}:{{.Port}}
{{- end}}
`
)

func (e *env) startTemplateProxy(files map[string]string) *running {
	e.t.Helper()
	dir := filepath.Join(e.t.TempDir(), "templates")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		e.t.Fatal(err)
	}
	for name, text := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(text), 0o644); err != nil {
			e.t.Fatal(err)
		}
	}
	return e.startProxyWith("docker-flow", func(c *Config) { c.TemplatesDir = dir })
}

func TestCustomTemplatesReplaceTheGeneratedLines(t *testing.T) {
	e := newEnv(t)
	e.backend("books-ms", "books-1")
	files := map[string]string{"fe.tmpl": feTemplate, "be.tmpl": beTemplate,
		"broken.tmpl":      "backend books-ms-be\n{{range service \"books-ms\"}\n",
		"bad-haproxy.tmpl": "backend books-ms-be\n    no-such-directive on\n",
		"waits.tmpl":       "backend books-ms-be\n    # {{key \"no/such/key\"}}\n"}
	p := e.startTemplateProxy(files)
	r := p.reconfigure(t, "serviceName=books-ms&servicePath=/api&templateFePath=fe.tmpl&consulTemplateBePath=be.tmpl")
	if r.TemplateFePath != "fe.tmpl" || r.TemplateBePath != "be.tmpl" {
		t.Errorf("answer = %+v", r)
	}
	resp, body := fetch(t, httpClient, p.http+"/custom/x", nil)
	if resp.StatusCode != http.StatusOK || resp.Header.Get("X-Template") != "custom-backend" || !strings.HasPrefix(body, "books-1 ") {
		t.Fatalf("GET /custom/x: %d %q (X-Template %q); want the template's route and backend", resp.StatusCode, body, resp.Header.Get("X-Template"))
	}
	// The frontend template stands for the generated ACLs: /api is not routed.
	if code, _ := get(t, p.http+"/api", nil); code != http.StatusServiceUnavailable {
		t.Errorf("GET /api: %d, want 503 (the template does not route it)", code)
	}
	for key, want := range map[string]string{"templatefepath": "fe.tmpl", "templatebepath": "be.tmpl"} {
		if got, _ := e.kvGet("docker-flow/books-ms/" + key); got != want {
			t.Errorf("KV %s = %q, want %q", key, got, want)
		}
	}

	// The backend template lists the instances: a new one is rendered in with no call.
	e.backend("books-ms", "books-2")
	eventually(t, 5*time.Second, "the new instance is served through the template", func() bool {
		return backendsReached(t, p.http+"/custom", 4)["books-2"] > 0
	})

	// A new server renders the same templates.
	second := e.startTemplateProxy(files)
	eventually(t, 5*time.Second, "the second server serves the templated route", func() bool {
		resp, _ := fetch(t, httpClient, second.http+"/custom/y", nil)
		return resp.StatusCode == http.StatusOK && resp.Header.Get("X-Template") == "custom-backend"
	})
	if a, b := comparable(p.config(t)), comparable(second.config(t)); a != b {
		t.Fatalf("the servers' configs differ:\n%s\n---\n%s", a, b)
	}

	// Refusals: 400 naming the parameter, and nothing changes.
	before := p.config(t)
	for _, tc := range []struct{ query, param, reason string }{
		{"templateFePath=../fe.tmpl", "templateFePath", ".."},
		{"templateFePath=/etc/passwd", "templateFePath", "absolute"},
		{"templateBePath=missing.tmpl", "templateBePath", "missing.tmpl"},
		{"templateBePath=broken.tmpl", "templateBePath", "parse"},
		{"consulTemplateBePath=bad-haproxy.tmpl", "", "no-such-directive"},
		{"templateBePath=waits.tmpl", "templateBePath", "no/such/key"},
	} {
		code, resp := p.call(t, "/v1/docker-flow-proxy/reconfigure?serviceName=books-ms&servicePath=/api&"+tc.query)
		if code != http.StatusBadRequest || !strings.Contains(resp.Message, tc.param) || !strings.Contains(resp.Message, tc.reason) {
			t.Errorf("%s: %d %q, want 400 naming %s and %q", tc.query, code, resp.Message, tc.param, tc.reason)
		}
	}
	if p.config(t) != before {
		t.Error("a refused template changed the config")
	}
}

func TestTemplatesNeedATemplatesFolder(t *testing.T) {
	e := newEnv(t)
	p := e.startProxyWith("docker-flow", func(c *Config) { c.TemplatesDir = "" })
	code, resp := p.call(t, "/v1/docker-flow-proxy/reconfigure?serviceName=books-ms&servicePath=/api&templateFePath=fe.tmpl")
	if code != http.StatusBadRequest || !strings.Contains(resp.Message, "templateFePath") {
		t.Fatalf("%d %q, want 400 naming templateFePath", code, resp.Message)
	}
}
