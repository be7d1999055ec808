package templates_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
	"github.com/docker-flow-proxy/docker-flow-proxy/route"
	"github.com/docker-flow-proxy/docker-flow-proxy/templates"
)

func newRenderer(t *testing.T, dir string, addrs []string, timeout time.Duration) *templates.Renderer {
	t.Helper()
	logger := slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
	return templates.New(dir, addrs, timeout, logger)
}

// writeTemplate writes a file of the templates folder dir (its folders created) and returns its name.
func writeTemplate(t *testing.T, dir, name, contents string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(contents), 0o644); err != nil {
		t.Fatal(err)
	}
	return name
}

// consulPut sends a PUT to the agent's HTTP API and fails the test unless it answers 200.
func consulPut(t *testing.T, c *testenv.Consul, path, body string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, c.URL()+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("PUT %s: %v", path, err)
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	_, _ = b.ReadFrom(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("PUT %s: %s %s", path, resp.Status, b.String())
	}
}

// renderErr renders rel and returns its error as a *RenderError, failing the test when it renders.
func renderErr(t *testing.T, r *templates.Renderer, rel string) *templates.RenderError {
	t.Helper()
	out, err := r.Render(context.Background(), rel)
	if err == nil {
		t.Fatalf("Render(%s) = %q, want an error", rel, out)
	}
	var re *templates.RenderError
	if !errors.As(err, &re) {
		t.Fatalf("Render(%s) error %v (%T), want a *RenderError", rel, err, err)
	}
	return re
}

func TestRenderFrontendAndBackendSnippets(t *testing.T) {
	c := testenv.StartConsul(t)
	r := newRenderer(t, "testdata", []string{c.Addr}, 5*time.Second)
	ctx := context.Background()

	fe, err := r.Render(ctx, "books-ms-fe.tmpl")
	if err != nil {
		t.Fatal(err)
	}
	if want := "    acl url_books-ms path_beg /api/v1/books\n"; fe != want {
		t.Errorf("frontend without instances = %q, want %q", fe, want)
	}
	be, err := r.Render(ctx, "books-ms-be.tmpl")
	if err != nil {
		t.Fatal(err)
	}
	if want := "backend books-ms-be\n    mode http\n"; be != want {
		t.Errorf("backend without instances = %q, want %q", be, want)
	}

	c.RegisterService("books-ms", "books-ms-1", "127.0.0.1", 8001)
	c.RegisterService("books-ms", "books-ms-2", "127.0.0.2", 8002)

	fe, err = r.Render(ctx, "books-ms-fe.tmpl")
	if err != nil {
		t.Fatal(err)
	}
	if want := "    acl url_books-ms path_beg /api/v1/books\n    use_backend books-ms-be if url_books-ms\n"; fe != want {
		t.Errorf("frontend = %q, want %q", fe, want)
	}
	be, err = r.Render(ctx, "books-ms-be.tmpl")
	if err != nil {
		t.Fatal(err)
	}
	want := "backend books-ms-be\n    mode http\n" +
		"    server test-node_8001 127.0.0.1:8001 check\n" +
		"    server test-node_8002 127.0.0.2:8002 check\n"
	if be != want {
		t.Errorf("backend = %q, want %q", be, want)
	}
}

func TestRenderPassingOnlyOrAny(t *testing.T) {
	c := testenv.StartConsul(t)
	c.RegisterService("books-ms", "books-ms-1", "127.0.0.1", 8001)
	c.RegisterService("books-ms", "books-ms-2", "127.0.0.1", 8002)
	consulPut(t, c, "/v1/agent/check/register",
		`{"Name":"books-ms-2 health","ServiceID":"books-ms-2","TTL":"10m","Status":"critical"}`)

	dir := t.TempDir()
	writeTemplate(t, dir, "passing.tmpl", `{{range service "books-ms"}}{{.Port}} {{end}}`)
	writeTemplate(t, dir, "any.tmpl", `{{range service "books-ms" "any"}}{{.Port}}:{{.Status}} {{end}}`)
	r := newRenderer(t, dir, []string{c.Addr}, 5*time.Second)

	for _, tc := range []struct{ tmpl, want string }{
		{"passing.tmpl", "8001 "},
		{"any.tmpl", "8001:passing 8002:critical "},
	} {
		out, err := r.Render(context.Background(), tc.tmpl)
		if err != nil {
			t.Fatalf("%s: %v", tc.tmpl, err)
		}
		if out != tc.want {
			t.Errorf("%s = %q, want %q", tc.tmpl, out, tc.want)
		}
	}
}

func TestRenderKeys(t *testing.T) {
	c := testenv.StartConsul(t)
	consulPut(t, c, "/v1/kv/settings/books-ms/timeout", "45")
	consulPut(t, c, "/v1/kv/settings/books-ms/balance", "roundrobin")

	dir := t.TempDir()
	writeTemplate(t, dir, "key.tmpl", `    timeout server {{key "settings/books-ms/timeout"}}s
    retries {{keyOrDefault "settings/books-ms/retries" "3"}}
{{- range tree "settings/books-ms"}}
    # {{.Key}}={{.Value}}
{{- end}}
`)
	r := newRenderer(t, dir, []string{c.Addr}, 5*time.Second)
	out, err := r.Render(context.Background(), "key.tmpl")
	if err != nil {
		t.Fatal(err)
	}
	want := "    timeout server 45s\n    retries 3\n    # balance=roundrobin\n    # timeout=45\n"
	if out != want {
		t.Errorf("Render = %q, want %q", out, want)
	}
}

// A key that does not exist makes `key` wait, as in consul-template: the render ends at its
// timeout with the dependency named, or renders as soon as the key is written.
func TestRenderMissingKey(t *testing.T) {
	c := testenv.StartConsul(t)
	dir := t.TempDir()
	writeTemplate(t, dir, "missing.tmpl", `maxconn {{key "missing"}}`)
	writeTemplate(t, dir, "later.tmpl", `maxconn {{key "later"}}`)

	t.Run("times out", func(t *testing.T) {
		const timeout = time.Second
		r := newRenderer(t, dir, []string{c.Addr}, timeout)
		start := time.Now()
		re := renderErr(t, r, "missing.tmpl")
		took := time.Since(start)
		if took < timeout-50*time.Millisecond || took > timeout+2*time.Second {
			t.Errorf("Render failed after %v, want about the timeout %v", took, timeout)
		}
		want := `template "missing.tmpl" waits for data Consul does not have: kv.block(missing)`
		if re.Error() != want {
			t.Errorf("error = %q, want %q", re.Error(), want)
		}
		if re.Unavailable {
			t.Error("Unavailable = true for a key Consul does not have; Consul did answer")
		}
	})

	// The deadline falls as a blocking query ends: the key is still missing, never "".
	t.Run("short deadlines", func(t *testing.T) {
		r := newRenderer(t, dir, []string{c.Addr}, 150*time.Millisecond)
		for range 8 {
			re := renderErr(t, r, "missing.tmpl")
			if !strings.Contains(re.Error(), "waits for data Consul does not have: kv.block(missing)") {
				t.Fatalf("error = %q, want it to name kv.block(missing)", re.Error())
			}
		}
		r = newRenderer(t, dir, []string{c.Addr}, 10*time.Second)
		for range 16 {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Millisecond)
			out, err := r.Render(ctx, "missing.tmpl")
			cancel()
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("Render with the caller's deadline passed = %q, %v; want context.DeadlineExceeded", out, err)
			}
		}
	})

	t.Run("arrives while waiting", func(t *testing.T) {
		r := newRenderer(t, dir, []string{c.Addr}, 10*time.Second)
		type result struct {
			out string
			err error
		}
		done := make(chan result, 1)
		go func() {
			out, err := r.Render(context.Background(), "later.tmpl")
			done <- result{out, err}
		}()
		time.Sleep(500 * time.Millisecond)
		written := time.Now()
		consulPut(t, c, "/v1/kv/later", "2000")
		select {
		case res := <-done:
			if res.err != nil || res.out != "maxconn 2000" {
				t.Fatalf("Render = %q, %v; want %q", res.out, res.err, "maxconn 2000")
			}
			if took := time.Since(written); took > 3*time.Second {
				t.Errorf("Render returned %v after the key was written, want at once", took)
			}
		case <-time.After(15 * time.Second):
			t.Fatal("Render did not return within 15s")
		}
	})
}

func TestResolve(t *testing.T) {
	dir := t.TempDir()
	writeTemplate(t, dir, "fe.tmpl", "frontend part\n")
	writeTemplate(t, dir, "sub/be.tmpl", "backend part\n")
	writeTemplate(t, dir, "big.tmpl", strings.Repeat("#", templates.MaxSize+1))
	writeTemplate(t, dir, "max.tmpl", strings.Repeat("#", templates.MaxSize))
	outside := filepath.Join(t.TempDir(), "secret.cfg")
	if err := os.WriteFile(outside, []byte("SECRET-CONTENTS\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for link, target := range map[string]string{
		"out.tmpl":     outside,
		"in.tmpl":      "fe.tmpl",
		"sub/up.tmpl":  "../fe.tmpl",
		"passwd.tmpl":  "/etc/passwd",
		"dangle.tmpl":  "nowhere.tmpl",
		"subdir.tmpl":  "sub",
		"outdir":       filepath.Dir(outside),
		"sub/abs.tmpl": filepath.Join(dir, "fe.tmpl"),
	} {
		if err := os.Symlink(target, filepath.Join(dir, link)); err != nil {
			t.Fatal(err)
		}
	}
	r := templates.New(dir, nil, time.Second, nil)

	for _, tc := range []struct {
		path string
		want string // the path returned, or the reason of the refusal
		ok   bool
	}{
		{"fe.tmpl", "fe.tmpl", true},
		{"./sub//be.tmpl", "sub/be.tmpl", true},
		{filepath.Join(dir, "sub", "be.tmpl"), "sub/be.tmpl", true},
		{"in.tmpl", "in.tmpl", true},
		{"sub/up.tmpl", "sub/up.tmpl", true},
		{"sub/abs.tmpl", "sub/abs.tmpl", true},
		{"max.tmpl", "max.tmpl", true},
		{"../x", `"../x" contains '..'`, false},
		{"sub/../fe.tmpl", `"sub/../fe.tmpl" contains '..'`, false},
		{"..", `".." contains '..'`, false},
		{"/etc/passwd", `"/etc/passwd" is outside the templates folder`, false},
		{outside, "is outside the templates folder", false},
		{"out.tmpl", `"out.tmpl" is outside the templates folder (a symbolic link leads out of it)`, false},
		{"passwd.tmpl", "is outside the templates folder", false},
		{"outdir/secret.cfg", "is outside the templates folder", false},
		{"sub", `"sub" is a folder, not a template file`, false},
		{"subdir.tmpl", "is a folder", false},
		{dir, "names the templates folder, not a file in it", false},
		{".", "names the templates folder", false},
		{"missing.tmpl", `"missing.tmpl" does not exist in the templates folder`, false},
		{"dangle.tmpl", "does not exist in the templates folder", false},
		{"", "is empty", false},
		{"big.tmpl", `"big.tmpl" is larger than 1 MiB`, false},
		{"fe.tmpl\nbackend evil", "contains a control character", false},
		{"fe\x00.tmpl", "contains a control character", false},
		{"fe\xff.tmpl", "is not valid UTF-8", false},
		{strings.Repeat("a/", 600) + "x", "is longer than 1024 bytes", false},
	} {
		got, err := r.Resolve("templateFePath", tc.path)
		if tc.ok {
			if err != nil || got != tc.want {
				t.Errorf("Resolve(%q) = %q, %v; want %q", tc.path, got, err, tc.want)
			}
			continue
		}
		var pe *route.ParamError
		if !errors.As(err, &pe) {
			t.Errorf("Resolve(%q) = %q, %v; want a *route.ParamError", tc.path, got, err)
			continue
		}
		if pe.Param != "templateFePath" || !strings.Contains(pe.Reason, tc.want) {
			t.Errorf("Resolve(%q) error = %q, want parameter templateFePath and %q", tc.path, err, tc.want)
		}
		if strings.Contains(err.Error(), "SECRET-CONTENTS") || strings.Contains(err.Error(), "root:") {
			t.Errorf("Resolve(%q) error shows a file's contents: %q", tc.path, err)
		}
		if strings.ContainsAny(err.Error(), "\n\x00") {
			t.Errorf("Resolve(%q) error holds a control character: %q", tc.path, err)
		}
	}

	t.Run("folder missing", func(t *testing.T) {
		missing := filepath.Join(t.TempDir(), "templates")
		r := templates.New(missing, nil, time.Second, nil)
		_, err := r.Resolve("templateBePath", "be.tmpl")
		var pe *route.ParamError
		if !errors.As(err, &pe) || pe.Param != "templateBePath" ||
			!strings.Contains(pe.Reason, "the templates folder "+missing+" does not exist") {
			t.Fatalf("Resolve with a missing folder: %v; want a ParamError saying the folder does not exist", err)
		}
		// Once the folder exists, the same Renderer finds its files.
		writeTemplate(t, missing, "be.tmpl", "x")
		if got, err := r.Resolve("templateBePath", "be.tmpl"); err != nil || got != "be.tmpl" {
			t.Fatalf("Resolve after the folder was created = %q, %v", got, err)
		}
	})

	t.Run("unreadable", func(t *testing.T) {
		if os.Geteuid() == 0 {
			t.Skip("root reads every file: file permissions cannot be tested")
		}
		writeTemplate(t, dir, "locked.tmpl", "x")
		if err := os.Chmod(filepath.Join(dir, "locked.tmpl"), 0); err != nil {
			t.Fatal(err)
		}
		_, err := r.Resolve("templateFePath", "locked.tmpl")
		if err == nil || !strings.Contains(err.Error(), "permission denied") {
			t.Fatalf("Resolve(locked.tmpl) = %v, want permission denied", err)
		}
	})
}

// Errors of the template itself are found without Consul: the only address here has no agent.
func TestRenderTemplateErrors(t *testing.T) {
	dir := t.TempDir()
	writeTemplate(t, dir, "common.cfg", "    option httplog\n")
	writeTemplate(t, dir, "includes.tmpl", `backend x{{"\n"}}{{file "common.cfg"}}`)
	outside := filepath.Join(t.TempDir(), "secret.cfg")
	if err := os.WriteFile(outside, []byte("SECRET-CONTENTS\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	closed := "127.0.0.1:" + strconv.Itoa(testenv.FreePort(t))
	r := newRenderer(t, dir, []string{closed}, 2*time.Second)

	out, err := r.Render(context.Background(), "includes.tmpl")
	if err != nil || out != "backend x\n    option httplog\n" {
		t.Errorf("file of the folder: Render = %q, %v", out, err)
	}

	for _, tc := range []struct{ name, contents, want string }{
		{"unclosed.tmpl", "backend x\n{{range service \"books-ms\"}}\n    server a\n",
			`template "unclosed.tmpl" does not parse: line 4: unexpected EOF`},
		{"syntax.tmpl", "backend x\n\n    server {{.Address}\n",
			`template "syntax.tmpl" does not parse: line 3: bad character U+007D '}'`},
		{"unknown.tmpl", "backend x\n{{range servicez \"books-ms\"}}{{end}}\n",
			`template "unknown.tmpl" does not parse: unknown function servicez (line 2: function "servicez" not defined)`},
		{"plugin.tmpl", `{{plugin "/bin/sh" "-c" "id"}}`,
			`template "plugin.tmpl" calls plugin, which is denied in templates`},
		{"write.tmpl", `{{"x" | writeToFile "/tmp/dfp-template-test" "" "" "0644"}}`,
			`template "write.tmpl" calls writeToFile, which is denied in templates`},
		{"env.tmpl", `{{env "CONSUL_HTTP_TOKEN"}}`,
			`template "env.tmpl" calls env, which is denied in templates`},
		{"secret.tmpl", `{{with secret "secret/x"}}{{.Data}}{{end}}`,
			`template "secret.tmpl" calls secret, which is denied in templates`},
		{"nomad.tmpl", `{{range nomadService "x"}}{{end}}`,
			`template "nomad.tmpl" calls nomadService, which is denied in templates`},
		{"file-out.tmpl", fmt.Sprintf(`{{file %q}}`, outside), `is outside the templates folder`},
		{"file-up.tmpl", `{{file "../secret.cfg"}}`, `contains '..'`},
		{"fails.tmpl", `{{index (parseJSON "[]") 3}}`, `template "fails.tmpl" fails: line 1:2: <index`},
	} {
		writeTemplate(t, dir, tc.name, tc.contents)
		start := time.Now()
		re := renderErr(t, r, tc.name)
		if !strings.Contains(re.Error(), tc.want) {
			t.Errorf("%s: error = %q, want it to contain %q", tc.name, re.Error(), tc.want)
		}
		if re.Unavailable {
			t.Errorf("%s: Unavailable = true for an error of the template", tc.name)
		}
		if strings.Contains(re.Error(), "SECRET-CONTENTS") {
			t.Errorf("%s: error shows a file's contents: %q", tc.name, re.Error())
		}
		if took := time.Since(start); took > time.Second {
			t.Errorf("%s: took %v: a template error must be found before Consul is asked", tc.name, took)
		}
	}
	if _, err := os.Stat("/tmp/dfp-template-test"); err == nil {
		t.Error("writeToFile wrote a file")
	}

	// A template removed after Resolve accepted it.
	re := renderErr(t, r, "gone.tmpl")
	if want := `template "gone.tmpl" does not exist in the templates folder`; re.Error() != want {
		t.Errorf("error = %q, want %q", re.Error(), want)
	}
}

func TestRenderConsulUnreachable(t *testing.T) {
	c := testenv.StartConsul(t)
	addr := c.Addr
	c.Stop()
	dir := t.TempDir()
	writeTemplate(t, dir, "be.tmpl", `{{range service "books-ms" "any"}}server {{.Address}}{{end}}`)
	const timeout = 3 * time.Second
	r := newRenderer(t, dir, []string{addr}, timeout)

	start := time.Now()
	re := renderErr(t, r, "be.tmpl")
	if took := time.Since(start); took > timeout {
		t.Errorf("Render failed after %v, want within the timeout %v", took, timeout)
	}
	if !re.Unavailable {
		t.Errorf("Unavailable = false for a stopped agent: %v", re)
	}
	if want := `template "be.tmpl" cannot be rendered: Consul did not answer: ` + addr; !strings.Contains(re.Error(), want) {
		t.Errorf("error = %q, want it to contain %q", re.Error(), want)
	}
}

func TestRenderFailsOverToTheNextAddress(t *testing.T) {
	down := testenv.StartConsul(t)
	down.Stop()
	up := testenv.StartConsul(t)
	up.RegisterService("books-ms", "books-ms-1", "127.0.0.1", 8001)

	var logs testenv.LogBuffer
	r := templates.New("testdata", []string{down.Addr, up.Addr}, 5*time.Second,
		slog.New(slog.NewTextHandler(&logs, nil)))
	want := "backend books-ms-be\n    mode http\n    server test-node_8001 127.0.0.1:8001 check\n"
	for i := range 2 {
		out, err := r.Render(context.Background(), "books-ms-be.tmpl")
		if err != nil {
			t.Fatalf("render %d: %v", i+1, err)
		}
		if out != want {
			t.Errorf("render %d = %q, want %q", i+1, out, want)
		}
	}
	// The first render found the first agent down; the second started with the one that answered.
	if n := strings.Count(logs.String(), "consul="+down.Addr); n != 1 {
		t.Errorf("the stopped agent was tried %d times in two renders, want once; logs:\n%s", n, logs.String())
	}
}

// An agent that accepts connections and never answers (a paused or wedged agent) cannot be made
// from testenv's agent, which the test cannot pause: a listener on 127.0.0.1 that accepts and
// stays silent stands for it. The render still ends at its timeout and says Consul did not answer.
func TestRenderSilentAgentIsBounded(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var conns sync.WaitGroup
	accepted := make(chan net.Conn, 16)
	conns.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	})
	t.Cleanup(func() {
		_ = l.Close()
		conns.Wait()
		close(accepted)
		for c := range accepted {
			_ = c.Close()
		}
	})

	dir := t.TempDir()
	writeTemplate(t, dir, "be.tmpl", `{{range service "books-ms" "any"}}server {{.Address}}{{end}}`)
	const timeout = time.Second
	r := newRenderer(t, dir, []string{l.Addr().String()}, timeout)
	start := time.Now()
	re := renderErr(t, r, "be.tmpl")
	if took := time.Since(start); took < timeout-50*time.Millisecond || took > timeout+time.Second {
		t.Errorf("Render failed after %v, want at its timeout %v", took, timeout)
	}
	want := fmt.Sprintf(`template "be.tmpl" cannot be rendered: Consul at %s did not answer within 1s: health.service(books-ms|any)`, l.Addr())
	if re.Error() != want || !re.Unavailable {
		t.Errorf("error = %q (Unavailable %v), want %q (Unavailable)", re.Error(), re.Unavailable, want)
	}
}

func TestRenderConcurrently(t *testing.T) {
	c := testenv.StartConsul(t)
	for i := range 3 {
		c.RegisterService("books-ms", fmt.Sprintf("books-ms-%d", i), "127.0.0.1", 8001+i)
	}
	consulPut(t, c, "/v1/kv/settings/maxconn", "100")
	dir := t.TempDir()
	writeTemplate(t, dir, "be.tmpl", `backend books-ms-be
    maxconn {{key "settings/maxconn"}}
{{- range service "books-ms" "any"}}
    server {{.Node}}_{{.Port}} {{.Address}}:{{.Port}} check
{{- end}}
`)
	want := "backend books-ms-be\n    maxconn 100\n" +
		"    server test-node_8001 127.0.0.1:8001 check\n" +
		"    server test-node_8002 127.0.0.1:8002 check\n" +
		"    server test-node_8003 127.0.0.1:8003 check\n"
	r := newRenderer(t, dir, []string{c.Addr}, 10*time.Second)

	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for range 16 {
		wg.Go(func() {
			out, err := r.Render(context.Background(), "be.tmpl")
			if err == nil && out != want {
				err = fmt.Errorf("Render = %q, want %q", out, want)
			}
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
}

func TestRenderCancelled(t *testing.T) {
	c := testenv.StartConsul(t)
	dir := t.TempDir()
	writeTemplate(t, dir, "missing.tmpl", `{{key "missing"}}`)
	r := newRenderer(t, dir, []string{c.Addr}, 30*time.Second)

	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(300*time.Millisecond, cancel)
	start := time.Now()
	_, err := r.Render(ctx, "missing.tmpl")
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Render = %v, want context.Canceled", err)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("Render returned %v after it started, want soon after the cancellation", took)
	}
}

// Every goroutine a Render starts ends: after renders that succeed, time out waiting for a key,
// find no agent and are cancelled, the count comes back to what it was.
func TestRenderLeavesNoGoroutine(t *testing.T) {
	c := testenv.StartConsul(t)
	c.RegisterService("books-ms", "books-ms-1", "127.0.0.1", 8001)
	dir := t.TempDir()
	writeTemplate(t, dir, "be.tmpl", `{{range service "books-ms" "any"}}server {{.Address}}:{{.Port}}{{end}} {{keyOrDefault "x" "y"}}`)
	writeTemplate(t, dir, "missing.tmpl", `{{range service "books-ms"}}{{end}}{{key "missing"}}`)
	closed := "127.0.0.1:" + strconv.Itoa(testenv.FreePort(t))
	const timeout = 700 * time.Millisecond
	r := newRenderer(t, dir, []string{c.Addr}, timeout)
	down := newRenderer(t, dir, []string{closed}, timeout)

	runtime.GC()
	before := runtime.NumGoroutine()
	for range 5 {
		if _, err := r.Render(context.Background(), "be.tmpl"); err != nil {
			t.Fatal(err)
		}
		if _, err := r.Render(context.Background(), "missing.tmpl"); err == nil {
			t.Fatal("missing.tmpl rendered")
		}
		if _, err := down.Render(context.Background(), "be.tmpl"); err == nil {
			t.Fatal("rendered with no agent")
		}
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		_, err := r.Render(ctx, "missing.tmpl")
		cancel()
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("cancelled render: %v", err)
		}
	}
	// A cancelled render's blocking query ends within the timeout; allow for that.
	deadline := time.Now().Add(timeout + 3*time.Second)
	for {
		n := runtime.NumGoroutine()
		if n <= before {
			break
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			t.Fatalf("%d goroutines after the renders, %d before; stacks:\n%s", n, before, buf)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
