package haproxy

import (
	"encoding/csv"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

func TestCheckIntervalOnServerLines(t *testing.T) {
	s := testSettings()
	inst := []route.Instance{{Address: "10.0.0.1", Port: 80}, {Address: "10.0.0.2", Port: 80}}
	checked := newRoute("checked", inst, "/checked")
	skipped := newRoute("skipped", inst, "/skipped")
	skipped.Route.SkipCheck = true
	servers := func(cfg []byte, backend string) []string {
		var out []string
		in := false
		for _, l := range strings.Split(string(cfg), "\n") {
			if strings.HasPrefix(l, "backend ") {
				in = l == "backend "+backend
			} else if in && strings.HasPrefix(l, serverPrefix) {
				out = append(out, l)
			}
		}
		return out
	}
	for _, tc := range []struct {
		interval time.Duration
		want     string
	}{
		{0, " check"},
		{30 * time.Second, " check inter 30s"},
		{1500 * time.Millisecond, " check inter 1500ms"},
	} {
		s.CheckInterval = tc.interval
		cfg := Render(s, []route.Backend{checked, skipped})
		want := []string{serverPrefix + "10.0.0.1:80 10.0.0.1:80" + tc.want, serverPrefix + "10.0.0.2:80 10.0.0.2:80" + tc.want}
		if got := servers(cfg, "checked-be"); !slices.Equal(got, want) {
			t.Errorf("interval %s: the checked route's servers are\n%q, want\n%q", tc.interval, got, want)
		}
		noCheck := []string{serverPrefix + "10.0.0.1:80 10.0.0.1:80", serverPrefix + "10.0.0.2:80 10.0.0.2:80"}
		if got := servers(cfg, "skipped-be"); !slices.Equal(got, noCheck) {
			t.Errorf("interval %s: the skipCheck route's servers are\n%q, want\n%q", tc.interval, got, noCheck)
		}
		// The renderer that keeps sections from one change to the next writes the interval too.
		r := &Renderer{}
		if got := r.RenderTable(s, map[string]route.Backend{"checked": checked, "skipped": skipped}); string(got) != string(cfg) {
			t.Errorf("interval %s: Renderer and Render differ:\n%s\n---\n%s", tc.interval, got, cfg)
		}
	}
	// A renderer given another interval writes every section again.
	r := &Renderer{}
	s.CheckInterval = 0
	r.RenderTable(s, map[string]route.Backend{"checked": checked})
	s.CheckInterval = 5 * time.Second
	if got := servers(r.RenderTable(s, map[string]route.Backend{"checked": checked}), "checked-be"); len(got) != 2 || !strings.HasSuffix(got[0], " check inter 5s") {
		t.Errorf("after the interval changed the servers are %q", got)
	}
}

// The automatic interval (Settings.CheckInterval 0) is HAProxy's 2 s up to 4,000 checked instances,
// then doubles so that HAProxy checks at most 2,000 a second; routes with skipCheck do not count,
// and an interval set by hand is kept whatever the table.
func TestAutomaticCheckInterval(t *testing.T) {
	for _, tc := range []struct {
		checked int
		want    time.Duration
	}{{0, 2 * time.Second}, {4000, 2 * time.Second}, {4001, 4 * time.Second}, {8000, 4 * time.Second},
		{8001, 8 * time.Second}, {30000, 16 * time.Second}, {100000, 64 * time.Second}} {
		if got := AutoCheckInterval(tc.checked); got != tc.want {
			t.Errorf("AutoCheckInterval(%d) = %s, want %s", tc.checked, got, tc.want)
		}
	}

	// Routes of 1,000 instances each: the server lines of a checked route say the interval.
	table := func(checked, skipped int) map[string]route.Backend {
		inst := make([]route.Instance, 1000)
		for i := range inst {
			inst[i] = route.Instance{Address: "10.0.0.1", Port: 1000 + i}
		}
		out := map[string]route.Backend{}
		for i := range checked + skipped {
			name := fmt.Sprintf("svc-%d", i)
			be := newRoute(name, inst, "/"+name)
			be.Route.SkipCheck = i >= checked
			out[name] = be
		}
		return out
	}
	line := func(cfg []byte) string {
		for _, l := range strings.Split(string(cfg), "\n") {
			if strings.HasPrefix(l, serverPrefix+"10.0.0.1:1000 ") && strings.Contains(l, " check") {
				return strings.TrimPrefix(l, serverPrefix+"10.0.0.1:1000 10.0.0.1:1000 ")
			}
		}
		return ""
	}
	s := testSettings()
	r := &Renderer{}
	for _, tc := range []struct {
		checked, skipped int
		interval         time.Duration
		want             string
	}{
		{4, 10, 0, "check"},                       // 4,000 checked: 2 s, HAProxy's default, not written
		{5, 0, 0, "check inter 4s"},               // 5,000: 4 s
		{9, 0, 0, "check inter 8s"},               // 9,000: 8 s
		{2, 0, 0, "check"},                        // back to 2,000: 2 s
		{9, 0, 3 * time.Second, "check inter 3s"}, // set by hand
	} {
		s.CheckInterval = tc.interval
		tb := table(tc.checked, tc.skipped)
		cfg := Render(s, slicesOf(tb))
		if got := line(cfg); got != tc.want {
			t.Errorf("%d checked routes of 1,000 instances and %d skipped, interval %s: a server line ends %q, want %q",
				tc.checked, tc.skipped, tc.interval, got, tc.want)
		}
		if got := r.RenderTable(s, tb); string(got) != string(cfg) {
			t.Errorf("%d checked routes of 1,000 instances, interval %s: the Renderer and Render differ", tc.checked, tc.interval)
		}
	}
}

// TestCheckIntervalReachesEveryServer: HAProxy checks the server of a route served since its start
// and the server of a route added through the runtime API at the interval set. Their instances
// go away, and both servers are marked down; the instances come back, and both are marked up
// within 1.8 s. Two passing checks (rise) take 400 ms at 200 ms; at HAProxy's default of 2 s
// they take 2 s or more.
func TestCheckIntervalReachesEveryServer(t *testing.T) {
	s, p := runtimeSetup(t, 2, time.Hour)
	s.CheckInterval = 200 * time.Millisecond
	routes := map[string]route.Backend{}
	for i := 0; i < MinMapRoutes+1; i++ {
		name := fmt.Sprintf("svc-%d", i)
		routes[name] = newRoute(name, []route.Instance{{Address: "127.0.0.1", Port: startBackend(t, name)}}, "/"+name)
	}
	static, added := newStoppable(t, "static"), newStoppable(t, "added")
	routes["static"] = newRoute("static", []route.Instance{static.inst}, "/static")
	render := func() []byte { return Render(s, slicesOf(routes)) }
	ctx := ctxFor(t, 60*time.Second)
	startForTest(ctx, t, p, render())
	reloads := showProc(t, p).Reloads

	routes["added"] = newRoute("added", []route.Instance{added.inst}, "/added")
	if _, err := p.UpdateServers(ctx, render()); err != nil {
		t.Fatalf("UpdateServers with a new route: %v", err)
	}
	if r := showProc(t, p).Reloads; r != reloads {
		t.Fatalf("reloads %d -> %d: the new route was not added through the runtime API", reloads, r)
	}
	for _, path := range []string{"/static", "/added"} {
		if code, body := getHost(t, s.HTTPPort, "", path); code != http.StatusOK || body != path[1:] {
			t.Fatalf("GET %s = %d %q", path, code, body)
		}
	}
	servers := []string{ServerName(static.inst), ServerName(added.inst)}
	waitStatus := func(want string, within time.Duration) time.Duration {
		t.Helper()
		t0 := time.Now()
		for {
			got := map[string]string{}
			for _, row := range serverStats(t, s.StatsSocket) {
				if slices.Contains(servers, row["svname"]) {
					got[row["svname"]] = row["status"]
				}
			}
			if got[servers[0]] == want && got[servers[1]] == want {
				return time.Since(t0)
			}
			if time.Since(t0) > within {
				t.Fatalf("%s after the change, checked every 200 ms, the servers are %v, want %s", within, got, want)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}

	static.stop()
	added.stop()
	down := waitStatus("DOWN", 3500*time.Millisecond) // at 2 s, three failed checks take 4 s or more
	static.start()
	added.start()
	up := waitStatus("UP", 1800*time.Millisecond) // at 2 s, two passing checks take 2 s or more
	t.Logf("both servers down %s after their instances went away, up %s after they came back", down.Round(10*time.Millisecond), up.Round(10*time.Millisecond))
}

// stoppable is a backend on a port of its own that can go away and come back on the same port.
type stoppable struct {
	t    *testing.T
	body string
	inst route.Instance
	srv  *http.Server
}

func newStoppable(t *testing.T, body string) *stoppable {
	b := &stoppable{t: t, body: body}
	b.start()
	t.Cleanup(b.stop)
	return b
}

func (b *stoppable) start() {
	b.t.Helper()
	addr := "127.0.0.1:0"
	if b.inst.Port != 0 {
		addr = b.inst.HostPort()
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		b.t.Fatalf("backend %s: %v", b.body, err)
	}
	b.inst = route.Instance{Address: "127.0.0.1", Port: ln.Addr().(*net.TCPAddr).Port}
	b.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { fmt.Fprint(w, b.body) }),
		ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = b.srv.Serve(ln) }()
}

func (b *stoppable) stop() {
	if b.srv != nil {
		_ = b.srv.Close()
		b.srv = nil
	}
}

func slicesOf(routes map[string]route.Backend) []route.Backend {
	out := make([]route.Backend, 0, len(routes))
	for _, be := range routes {
		out = append(out, be)
	}
	return out
}

// serverStats is `show stat` of every server, one map of column to value per server.
func serverStats(t *testing.T, sock string) []map[string]string {
	t.Helper()
	out, err := Command(ctxFor(t, 5*time.Second), sock, "show stat -1 4 -1")
	if err != nil {
		t.Fatal(err)
	}
	recs, err := csv.NewReader(strings.NewReader(strings.TrimPrefix(out, "# "))).ReadAll()
	if err != nil || len(recs) == 0 {
		t.Fatalf("show stat: %v\n%s", err, out)
	}
	var rows []map[string]string
	for _, rec := range recs[1:] {
		row := map[string]string{}
		for i, col := range recs[0] {
			if i < len(rec) {
				row[col] = rec[i]
			}
		}
		rows = append(rows, row)
	}
	return rows
}

// TestOpenFilesLimitTooLowForChecks: HAProxy runs under an open files limit of 1,000 (a shell sets
// it, as a container's limit does). A table of 400 routes of three instances with health checks
// needs more, and HAProxy refuses to start on it: the error says so and what to do. The same table
// with skipCheck starts. Started on 100 such routes, HAProxy accepts fewer connections at once than
// without checks, and says so; the proxy refuses a change to the 400: the
// reload fails with the same words and the previous config keeps serving.
func TestOpenFilesLimitTooLowForChecks(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "haproxy-limited")
	script := "#!/bin/sh\nulimit -n 1000 || exit 1\nexec " + testenv.HAProxyBin(t) + " \"$@\"\n"
	if err := os.WriteFile(bin, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	setup := func() (Settings, *Process) {
		dir := t.TempDir()
		s := DefaultSettings()
		s.BindAddress, s.HTTPPort = "127.0.0.1", testenv.FreePort(t)
		s.StatsSocket, s.MapsDir = filepath.Join(dir, "haproxy.sock"), filepath.Join(dir, "maps")
		return s, NewProcess(Options{Binary: bin, Dir: dir, Logger: testLogger(), ReloadTimeout: 10 * time.Second})
	}
	first := startBackend(t, "svc-0")
	table := func(n int, skipCheck bool) []route.Backend {
		var bs []route.Backend
		for i := 0; i < n; i++ {
			name := fmt.Sprintf("svc-%d", i)
			inst := []route.Instance{{Address: "127.0.0.1", Port: 1}, {Address: "127.0.0.2", Port: 1}, {Address: "127.0.0.3", Port: 1}}
			if i == 0 {
				inst = []route.Instance{{Address: "127.0.0.1", Port: first}}
			}
			be := newRoute(name, inst, "/"+name)
			be.Route.SkipCheck = skipCheck
			bs = append(bs, be)
		}
		return bs
	}
	ctx := ctxFor(t, 60*time.Second)

	s, p := setup()
	err := p.Start(ctx, Render(s, table(400, false)))
	if err == nil {
		_ = p.Stop(ctx)
		t.Fatal("HAProxy started with 1,200 health-checked servers under an open files limit of 1,000")
	}
	if !strings.Contains(err.Error(), "Cannot raise FD limit") || !strings.Contains(err.Error(), fileLimitHint) {
		t.Fatalf("the start's error does not explain the open files limit: %v", err)
	}

	s, p = setup()
	startForTest(ctx, t, p, Render(s, table(400, true)))
	if code, body := getHost(t, s.HTTPPort, "", "/svc-0"); code != http.StatusOK || body != "svc-0" {
		t.Fatalf("with skipCheck, GET /svc-0 = %d %q", code, body)
	}
	unchecked := p.MaxConn()

	s, p = setup()
	served := Render(s, table(100, false))
	startForTest(ctx, t, p, served)
	// HAProxy takes the descriptors of the checks from those of connections: it reports how many
	// connections it accepts, as /metrics shows it.
	if checked := p.MaxConn(); checked <= 0 || checked >= unchecked || checked >= LowMaxConn {
		t.Fatalf("HAProxy accepts %d connections with 300 checked servers and %d with none, under a limit of 1,000 open files: want fewer with the checks, and both read", checked, unchecked)
	}
	err = p.Apply(ctx, Render(s, table(400, false)))
	if !errors.Is(err, ErrReloadFailed) || !strings.Contains(err.Error(), fileLimitHint) {
		t.Fatalf("a change to 1,200 health-checked servers = %v, want ErrReloadFailed that explains the open files limit", err)
	}
	if !bytesEqual(p.Config(), served) || !bytesEqual(onDisk(t, p), served) {
		t.Fatal("after the refused reload the config served is not the previous one")
	}
	if code, body := getHost(t, s.HTTPPort, "", "/svc-0"); code != http.StatusOK || body != "svc-0" {
		t.Fatalf("after the refused reload GET /svc-0 = %d %q", code, body)
	}
}
