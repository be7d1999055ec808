package haproxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

func TestDiffServers(t *testing.T) {
	const head = "global\n    stats socket /x/haproxy.sock mode 600 level admin\n\nfrontend f\n    bind :80\n\n"
	be := func(name string, lines ...string) string {
		s := "backend " + name + "\n    balance roundrobin\n"
		for _, l := range lines {
			s += "    " + l + "\n"
		}
		return s
	}
	a1 := "server 10.0.0.1:80 10.0.0.1:80 check"
	a2 := "server 10.0.0.2:80 10.0.0.2:80 check"
	s1 := Server{Name: "10.0.0.1:80", Addr: "10.0.0.1:80", Check: "check"}
	s2 := Server{Name: "10.0.0.2:80", Addr: "10.0.0.2:80", Check: "check"}
	tests := []struct {
		name     string
		old, new string
		want     []ServerChange
		ok       bool
	}{
		{"equal", head + be("a", a1), head + be("a", a1), nil, true},
		{"add", head + be("a", a1), head + be("a", a1, a2),
			[]ServerChange{{Backend: "a", Add: []Server{s2}}}, true},
		{"remove", head + be("a", a1, a2), head + be("a", a2),
			[]ServerChange{{Backend: "a", Remove: []Server{s1}}}, true},
		{"replace, to and from none", head + be("a", a1) + "\n" + be("b"), head + be("a", a2) + "\n" + be("b", a1),
			[]ServerChange{{Backend: "a", Add: []Server{s2}, Remove: []Server{s1}}, {Backend: "b", Add: []Server{s1}}}, true},
		{"without check", head + be("a"), head + be("a", "server [::1]:80 [::1]:80"),
			[]ServerChange{{Backend: "a", Add: []Server{{Name: "[::1]:80", Addr: "[::1]:80"}}}}, true},
		{"remove all", head + be("a", a1, a2), head + be("a"),
			[]ServerChange{{Backend: "a", Remove: []Server{s1, s2}}}, true},
		{"host name added", head + be("a", a1), head + be("a", a1, "server db:80 db:80 check"), nil, false},
		{"host name removed", head + be("a", a1, "server db:80 db:80 check"), head + be("a", a1),
			[]ServerChange{{Backend: "a", Remove: []Server{{Name: "db:80", Addr: "db:80", Check: "check"}}}}, true},
		{"check changed", head + be("a", a1), head + be("a", "server 10.0.0.1:80 10.0.0.1:80"), nil, false},
		{"same name, other address", head + be("a", a1), head + be("a", "server 10.0.0.1:80 10.0.0.9:80 check"), nil, false},
		{"backend added", head + be("a", a1), head + be("a", a1) + "\n" + be("b", a2), nil, false},
		{"backend removed", head + be("a", a1) + "\n" + be("b", a2), head + be("a", a1), nil, false},
		{"frontend changed", head + be("a", a1), strings.Replace(head, ":80", ":81", 1) + be("a", a1, a2), nil, false},
		{"backend setting changed", head + be("a", a1), head + be("a", "timeout server 5s", a1, a2), nil, false},
		{"unknown server option", head + be("a", a1), head + be("a", a1, a2+" weight 2"), nil, false},
		{"duplicate server", head + be("a", a1), head + be("a", a1, a1), nil, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := diffServers([]byte(tt.old), []byte(tt.new))
			if ok != tt.ok || !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("diffServers = %+v, %v; want %+v, %v", got, ok, tt.want, tt.ok)
			}
		})
	}
}

func TestStatsSocket(t *testing.T) {
	cfg := "# comment\nglobal\n    stats socket /run/h.sock mode 600 level admin expose-fd listeners\n\nbackend b\n    stats socket /no\n"
	if got := statsSocket([]byte(cfg)); got != "/run/h.sock" {
		t.Fatalf("statsSocket = %q", got)
	}
	if got := statsSocket([]byte("global\n    maxconn 10\n")); got != "" {
		t.Fatalf("statsSocket without one = %q", got)
	}
}

// runtimeFixture is HAProxy serving one rendered backend "app-be" on a free port, with the stats socket.
type runtimeFixture struct {
	p     *Process
	s     Settings
	ports map[string]int // backend body -> port
}

func newRuntimeFixture(t *testing.T, bodies ...string) *runtimeFixture {
	t.Helper()
	dir := t.TempDir()
	f := &runtimeFixture{ports: map[string]int{}}
	for _, b := range bodies {
		f.ports[b] = startBackend(t, b)
	}
	f.s = DefaultSettings()
	f.s.BindAddress, f.s.HTTPPort = "127.0.0.1", testenv.FreePort(t)
	f.s.StatsSocket = filepath.Join(dir, "haproxy.sock")
	f.p = NewProcess(Options{Binary: testenv.HAProxyBin(t), Dir: dir, Logger: testLogger(), ReloadTimeout: 10 * time.Second})
	if err := f.p.Start(ctxFor(t, 10*time.Second), f.config(bodies[:1]...)); err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := f.p.Stop(ctx); err != nil {
			t.Errorf("Stop: %v", err)
		}
	})
	return f
}

// config renders app-be with the backends that answer bodies.
func (f *runtimeFixture) config(bodies ...string) []byte {
	var inst []route.Instance
	for _, b := range bodies {
		inst = append(inst, route.Instance{Address: "127.0.0.1", Port: f.ports[b]})
	}
	r := route.Route{ServiceName: "app", ServicePath: []string{"/"}, PathType: route.PathBeg}
	return Render(f.s, []route.Backend{{Route: r, Instances: inst}})
}

// seen sends requests on new connections until every body of want answered (or 5s pass) and
// returns the bodies that answered, failing on any failed request.
func (f *runtimeFixture) seen(t *testing.T, want ...string) map[string]int {
	t.Helper()
	got := map[string]int{}
	deadline := time.Now().Add(5 * time.Second)
	for n := 0; ; n++ {
		body, err := getBody(f.s.HTTPPort)
		if err != nil {
			t.Fatalf("request %d: %v", n, err)
		}
		got[body]++
		all := true
		for _, w := range want {
			all = all && got[w] > 0
		}
		if (all && n >= 20) || time.Now().After(deadline) {
			return got
		}
	}
}

func (f *runtimeFixture) checkServed(t *testing.T, cfg []byte) {
	t.Helper()
	if !bytes.Equal(f.p.Config(), cfg) {
		t.Fatalf("Config() is not the new config:\n%s", f.p.Config())
	}
	if !bytes.Equal(onDisk(t, f.p), cfg) {
		t.Fatalf("haproxy.cfg on disk is not the new config:\n%s", onDisk(t, f.p))
	}
}

func TestUpdateServersWithoutReload(t *testing.T) {
	f := newRuntimeFixture(t, "b1", "b2", "b3")
	ctx := ctxFor(t, 30*time.Second)
	reloads := showProc(t, f.p).Reloads

	three := f.config("b1", "b2", "b3")
	if _, err := f.p.UpdateServers(ctx, three); err != nil {
		t.Fatalf("UpdateServers 1 -> 3: %v", err)
	}
	if got := f.seen(t, "b1", "b2", "b3"); len(got) != 3 {
		t.Fatalf("after adding two servers the answers came from %v", got)
	}
	if r := showProc(t, f.p).Reloads; r != reloads {
		t.Fatalf("reloads %d -> %d: adding servers reloaded HAProxy", reloads, r)
	}
	f.checkServed(t, three)

	one := f.config("b3")
	if _, err := f.p.UpdateServers(ctx, one); err != nil {
		t.Fatalf("UpdateServers 3 -> 1: %v", err)
	}
	if got := f.seen(t, "b3"); len(got) != 1 {
		t.Fatalf("after removing b1 and b2 the answers came from %v", got)
	}
	if r := showProc(t, f.p).Reloads; r != reloads {
		t.Fatalf("reloads %d -> %d: removing servers reloaded HAProxy", reloads, r)
	}
	f.checkServed(t, one)

	// A later reload serves the same servers: the file agrees with what runs.
	if err := f.p.Apply(ctx, append(bytes.Clone(one), "\n# reload\n"...)); err != nil {
		t.Fatal(err)
	}
	if got := f.seen(t, "b3"); len(got) != 1 {
		t.Fatalf("after a reload the answers came from %v", got)
	}
}

func TestUpdateServersRefusesOrFailsAndApplyRepairs(t *testing.T) {
	f := newRuntimeFixture(t, "b1", "b2")
	ctx := ctxFor(t, 30*time.Second)
	before := f.p.Config()
	reloads := showProc(t, f.p).Reloads

	// More than servers: refused, nothing touched.
	other := bytes.Replace(f.config("b1", "b2"), []byte("backend app-be"), []byte("backend zzz-be"), 1)
	other = bytes.Replace(other, []byte("use_backend app-be"), []byte("use_backend zzz-be"), 1)
	if _, err := f.p.UpdateServers(ctx, other); !errors.Is(err, ErrNeedsReload) {
		t.Fatalf("UpdateServers with a renamed backend = %v, want ErrNeedsReload", err)
	}
	// Servers only, but invalid (port out of range): `haproxy -c` rejects it before any command.
	bad := bytes.Replace(f.config("b1"), []byte("    balance roundrobin\n"),
		[]byte("    balance roundrobin\n    server 127.0.0.1:99999 127.0.0.1:99999 check\n"), 1)
	if _, ok := diffServers(before, bad); !ok {
		t.Fatalf("diffServers refuses a config that differs in servers only:\n%s", bad)
	}
	var cerr *ConfigError
	if _, err := f.p.UpdateServers(ctx, bad); !errors.As(err, &cerr) {
		t.Fatalf("UpdateServers with an invalid port = %v, want a *ConfigError", err)
	}
	if !bytes.Equal(f.p.Config(), before) || showProc(t, f.p).Reloads != reloads {
		t.Fatal("a refused UpdateServers changed something")
	}

	// The runtime API refuses a command: a server of that name already exists (added behind our back).
	two := f.config("b1", "b2")
	name := fmt.Sprintf("127.0.0.1:%d", f.ports["b2"])
	if _, err := Command(ctx, f.s.StatsSocket, "add server app-be/"+name+" 127.0.0.1:1"); err != nil {
		t.Fatal(err)
	}
	_, err := f.p.UpdateServers(ctx, two)
	if err == nil || errors.Is(err, ErrNeedsReload) {
		t.Fatalf("UpdateServers with a clashing server = %v, want a runtime API error", err)
	}
	if !bytes.Equal(f.p.Config(), before) {
		t.Fatal("a failed UpdateServers changed Config()")
	}
	// The caller falls back to a reload, which serves the new config.
	if err := f.p.Apply(ctx, two); err != nil {
		t.Fatalf("Apply after a failed UpdateServers: %v", err)
	}
	if r := showProc(t, f.p).Reloads; r != reloads+1 {
		t.Fatalf("reloads %d -> %d, want one reload", reloads, r)
	}
	f.checkServed(t, two)
	if got := f.seen(t, "b1", "b2"); len(got) != 2 {
		t.Fatalf("after the fallback reload the answers came from %v", got)
	}
}

// diffServers is Diff for a config that adds no route: ok is false when new adds a backend.
func diffServers(old, new []byte) (changes []ServerChange, ok bool) {
	d, ok := Diff(old, new)
	if !ok || len(d.Backends) > 0 || len(d.MapAdds) > 0 || len(d.MapDels) > 0 || len(d.Removed) > 0 {
		return nil, false
	}
	return d.Servers, true
}
