package haproxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

// plainRoutes are n plain routes /svc-<i>, each with one instance on 10.0.0.<i+1>:80.
func plainRoutes(n int) []route.Backend {
	var bs []route.Backend
	for i := 0; i < n; i++ {
		name := fmt.Sprintf("svc-%d", i)
		bs = append(bs, route.Backend{
			Route:     route.Route{ServiceName: name, ServicePath: []string{"/" + name}, PathType: route.PathBeg},
			Instances: []route.Instance{{Address: fmt.Sprintf("10.0.0.%d", i+1), Port: 80}},
		})
	}
	return bs
}

func newRoute(name string, inst []route.Instance, paths ...string) route.Backend {
	return route.Backend{Route: route.Route{ServiceName: name, ServicePath: paths, PathType: route.PathBeg}, Instances: inst}
}

func TestDiffAddedRoutes(t *testing.T) {
	s := testSettings()
	s.MapsDir = "/run/dfp/maps"
	s.SpareBackends = 2
	base := plainRoutes(MinMapRoutes + 1)
	one := []route.Instance{{Address: "10.1.0.1", Port: 8080}}
	old := Render(s, base)
	with := func(extra ...route.Backend) []byte {
		return Render(s, append(append([]route.Backend{}, base...), extra...))
	}
	oldMap := mapUse.FindStringSubmatch(string(old))[2]

	t.Run("a plain route", func(t *testing.T) {
		next := with(newRoute("new", one, "/new"))
		d, ok := Diff(old, next)
		if !ok {
			t.Fatalf("Diff refuses a plain route added to the map:\n%s", next)
		}
		newMap := mapUse.FindStringSubmatch(string(next))[2]
		want := Delta{
			Backends: []ServerChange{{Backend: "new-be", Add: []Server{{Name: "10.1.0.1:8080", Addr: "10.1.0.1:8080", Check: "check"}}}},
			MapAdds:  []MapEntry{{Map: oldMap, Key: "/new", Backend: "new-be"}},
			Renamed:  map[string]string{newMap: oldMap},
		}
		if !reflect.DeepEqual(d, want) {
			t.Fatalf("Diff = %+v\nwant %+v", d, want)
		}
		if _, ok := diffServers(old, next); ok {
			t.Fatal("diffServers accepts a new backend")
		}
	})
	t.Run("a route by domain", func(t *testing.T) {
		var hosts []route.Backend
		for i, b := range base {
			b.Route.ServiceDomain = []string{fmt.Sprintf("h%d.example.com", i)}
			hosts = append(hosts, b)
		}
		oldHosts := Render(s, hosts)
		r := newRoute("new", one, "/new")
		r.Route.ServiceDomain = []string{"New.example.com", "new.example.org"}
		next := Render(s, append(hosts, r))
		d, ok := Diff(oldHosts, next)
		if !ok {
			t.Fatalf("Diff refuses a route by domain added to the map by host and path:\n%s", next)
		}
		m := mapUse.FindStringSubmatch(string(oldHosts))[2]
		want := []MapEntry{{Map: m, Key: "new.example.com/new", Backend: "new-be"}, {Map: m, Key: "new.example.org/new", Backend: "new-be"}}
		if !reflect.DeepEqual(d.MapAdds, want) || len(d.Backends) != 1 {
			t.Fatalf("Diff = %+v\nwant the map adds %+v and one backend", d, want)
		}
	})
	t.Run("a route removed", func(t *testing.T) {
		next := Render(s, base[1:])
		d, ok := Diff(old, next)
		newMap := mapUse.FindStringSubmatch(string(next))[2]
		want := Delta{
			MapDels: []MapEntry{{Map: oldMap, Key: "/svc-0", Backend: "svc-0-be"}},
			Removed: []string{"svc-0-be"},
			Renamed: map[string]string{newMap: oldMap},
		}
		if !ok || !reflect.DeepEqual(d, want) {
			t.Fatalf("Diff = %+v, %v\nwant %+v", d, ok, want)
		}
	})
	t.Run("a route's paths changed", func(t *testing.T) {
		changed := append([]route.Backend{}, base...)
		changed[3].Route.ServicePath = []string{"/svc-3-new", "/svc-3-other"}
		d, ok := Diff(old, Render(s, changed))
		want := []MapEntry{{Map: oldMap, Key: "/svc-3-new", Backend: "svc-3-be"}, {Map: oldMap, Key: "/svc-3-other", Backend: "svc-3-be"}}
		if !ok || !reflect.DeepEqual(d.MapAdds, want) || len(d.MapDels) != 1 || d.MapDels[0].Key != "/svc-3" ||
			len(d.Removed) != 0 || len(d.Backends) != 0 {
			t.Fatalf("Diff = %+v, %v", d, ok)
		}
	})
	t.Run("a route removed that shadowed another's entry", func(t *testing.T) {
		// /svc-1 of long comes first and shadows route svc-1's: once long is gone, svc-1's entry
		// comes back.
		withLong := with(newRoute("long", one, "/svc-1", "/a-path-longer-than-the-others"))
		d, ok := Diff(withLong, old)
		m := mapUse.FindStringSubmatch(string(withLong))[2]
		if !ok || len(d.MapAdds) != 0 || !reflect.DeepEqual(d.MapSets, []MapEntry{{Map: m, Key: "/svc-1", Backend: "svc-1-be"}}) ||
			!reflect.DeepEqual(d.MapDels, []MapEntry{{Map: m, Key: "/a-path-longer-than-the-others", Backend: "long-be"}}) ||
			!reflect.DeepEqual(d.Removed, []string{"long-be"}) {
			t.Fatalf("Diff = %+v, %v", d, ok)
		}
		// And the other way: long's /svc-1 takes the entry of route svc-1.
		d, ok = Diff(old, withLong)
		if !ok || !reflect.DeepEqual(d.MapSets, []MapEntry{{Map: oldMap, Key: "/svc-1", Backend: "long-be"}}) ||
			len(d.MapAdds) != 1 || len(d.MapDels) != 0 || len(d.Backends) != 1 {
			t.Fatalf("Diff = %+v, %v", d, ok)
		}
	})
	t.Run("a path moved to another route", func(t *testing.T) {
		changed := append([]route.Backend{}, base[1:]...)
		d, ok := Diff(old, Render(s, append(changed, newRoute("svc-0-next", one, "/svc-0"))))
		if !ok || !reflect.DeepEqual(d.MapSets, []MapEntry{{Map: oldMap, Key: "/svc-0", Backend: "svc-0-next-be"}}) ||
			!reflect.DeepEqual(d.Removed, []string{"svc-0-be"}) || len(d.Backends) != 1 {
			t.Fatalf("Diff = %+v, %v", d, ok)
		}
	})
	t.Run("two routes and a server of an existing one", func(t *testing.T) {
		changed := append([]route.Backend{}, base...)
		changed[2].Instances = append(changed[2].Instances, route.Instance{Address: "10.9.9.9", Port: 81})
		next := Render(s, append(changed, newRoute("a", one, "/a1", "/a2"), newRoute("b", nil, "/b")))
		d, ok := Diff(old, next)
		if !ok || len(d.Backends) != 2 || len(d.MapAdds) != 3 || len(d.Servers) != 1 || d.Servers[0].Backend != "svc-2-be" {
			t.Fatalf("Diff = %+v, %v", d, ok)
		}
	})

	refusedFrom := map[string][]byte{} // the config served, when not old
	refused := map[string][]byte{
		"no spare backends": func() []byte {
			s := s
			s.SpareBackends = 0
			return Render(s, append(append([]route.Backend{}, base...), newRoute("new", one, "/new")))
		}(),
		"a route with options in its backend": func() []byte {
			r := newRoute("new", one, "/new")
			r.Route.TimeoutServer = 5
			return with(r)
		}(),
		"a route with users": func() []byte {
			r := newRoute("new", one, "/new")
			r.Route.Users = []route.User{{Name: "u", Password: "p"}}
			return with(r)
		}(),
		"a route outside the map": func() []byte {
			r := newRoute("new", one, "/new")
			r.Route.ServiceDomain = []string{"new.example.com"}
			return with(r)
		}(),
		"a path the runtime API cannot carry": with(newRoute("semi", one, "/a;b")),
		"an instance by host name":            with(newRoute("new", []route.Instance{{Address: "db", Port: 80}}, "/new")),
		// Its acl lines go: only a reload serves that.
		"a route outside the map removed": func() []byte {
			r := newRoute("new", one, "/new")
			r.Route.ServiceDomain = []string{"new.example.com"}
			o := with(r)
			refusedFrom["a route outside the map removed"] = o
			return old
		}(),
	}
	for name, next := range refused {
		from := old
		if f, ok := refusedFrom[name]; ok {
			from = f
		}
		if d, ok := Diff(from, next); ok {
			t.Errorf("%s: Diff = %+v, want refused", name, d)
		}
	}
}

// A map of path_end, path_dir or path_reg routes is tried in order, and the runtime API adds at
// its end: Diff takes a new route that comes last, or a route removed, and leaves a new route
// that comes between others to a reload, unless (path_end) no request ends with both its paths and
// those of the routes after it.
func TestDiffOrderedMaps(t *testing.T) {
	s := testSettings()
	s.MapsDir, s.SpareBackends = "/run/dfp/maps", 2
	one := []route.Instance{{Address: "10.1.0.1", Port: 8080}}
	for _, pt := range []route.PathType{route.PathEnd, route.PathDir, route.PathReg} {
		t.Run(string(pt), func(t *testing.T) {
			var base []route.Backend
			for i := 1; i <= MinMapRoutes+1; i++ {
				b := newRoute(fmt.Sprintf("e%d", i), one, fmt.Sprintf("/e%d", i))
				b.Route.PathType = pt
				base = append(base, b)
			}
			old := Render(s, base)
			if !strings.Contains(string(old), ",map_"+strings.TrimPrefix(string(pt), "path_")+"(") {
				t.Fatalf("the routes are not routed through a map:\n%s", old)
			}
			with := func(name string, paths ...string) []byte {
				b := newRoute(name, one, paths...)
				b.Route.PathType = pt
				return Render(s, append(slices.Clone(base), b))
			}
			// Paths of one length: the routes come by name.
			if d, ok := Diff(old, with("z", "/zz")); !ok || len(d.MapAdds) != 1 || d.MapAdds[0].Key != "/zz" {
				t.Errorf("a route that comes last: Diff = %+v, %v; want one entry added", d, ok)
			}
			// A route between others: path_end adds its entry at the end, where it shares no
			// request with those it comes before; path_dir and path_reg (not anchored) replace
			// the map, as "/e5" (and "/q5") and "/e6" may match one path.
			between := with("e55", "/q5")
			d, ok := Diff(old, between)
			switch {
			case !ok:
				t.Errorf("a route between others: Diff refused it")
			case pt == route.PathEnd && (len(d.MapAdds) != 1 || len(d.MapReplaces) != 0):
				t.Errorf("a path_end route between others: Diff = %+v; want one entry added", d)
			case pt != route.PathEnd && !replaces(d, "/e1", "/e2", "/e3", "/e4", "/e5", "/q5", "/e6", "/e7", "/e8", "/e9"):
				t.Errorf("a route between others: Diff = %+v; want the map replaced, in order", d)
			}
			// /e6 ends with 6: a request to /e6 must go to e55, which comes first.
			if d, ok := Diff(old, with("e55", "/q5", "6")); !ok || len(d.MapAdds) != 0 || len(d.MapReplaces) != 1 {
				t.Errorf("a route between others that shares requests with a later one: Diff = %+v, %v; want the map replaced", d, ok)
			}
			if d, ok := Diff(old, Render(s, base[1:])); !ok || len(d.MapDels) != 1 || d.MapDels[0].Key != "/e1" {
				t.Errorf("a route removed: Diff = %+v, %v; want its entry removed", d, ok)
			}
		})
	}
}

// replaces reports whether d replaces one map, and nothing else of the maps, with the keys given,
// in order.
func replaces(d Delta, keys ...string) bool {
	if len(d.MapAdds) > 0 || len(d.MapSets) > 0 || len(d.MapDels) > 0 || len(d.MapReplaces) != 1 {
		return false
	}
	var got []string
	for _, e := range d.MapReplaces[0].Entries {
		got = append(got, e.Key)
	}
	return slices.Equal(got, keys)
}

// A path_reg route that comes between others has its entry added at the end of the map where no
// path can match both one of its regular expressions and one of a route after it: both start with
// '^' and text of which neither is a prefix of the other. Otherwise the map is replaced.
func TestDiffOrderedRegexMap(t *testing.T) {
	s := testSettings()
	s.MapsDir, s.SpareBackends = "/run/dfp/maps", 2
	one := []route.Instance{{Address: "10.1.0.1", Port: 8080}}
	reg := func(name string, paths ...string) route.Backend {
		b := newRoute(name, one, paths...)
		b.Route.PathType = route.PathReg
		return b
	}
	var base []route.Backend
	for i := 1; i <= MinMapRoutes+1; i++ {
		base = append(base, reg(fmt.Sprintf("e%d", i), fmt.Sprintf("^/e%d/x", i)))
	}
	old := Render(s, base)
	for _, tc := range []struct {
		path string
		ok   bool // its entry added at the end of the map (or set in place), else the map replaced
	}{
		// Paths of one length: e55 comes after e5, before e6 to e9.
		{"^/q5/x", true},  // no path starts with /q5/x and /e6/x
		{"^/e6/x", true},  // e6's own regex: e55 takes its entry, in its place
		{"^/e6/.", false}, // /e6/x starts with /e6/
		{"^/e?/x", false}, // no certain text beyond '/': it shares paths with all
		{"/q5/xy", false}, // not anchored
		{"^/q|5x", false}, // an alternative need not start with /q
	} {
		d, ok := Diff(old, Render(s, append(slices.Clone(base), reg("e55", tc.path))))
		if added := len(d.MapReplaces) == 0; !ok || added != tc.ok || !added && len(d.MapReplaces) != 1 {
			t.Errorf("a route with %q between others: Diff = %+v, %v; want its entry added: %v, else the map replaced", tc.path, d, ok, tc.ok)
		}
	}
	for re, want := range map[string]string{"^/api/v[0-9]": "/api/v", "^/ab?": "/a", "^/ab*c": "/a", "^/a+b": "/a",
		"^/a{2}": "/", "/api": "", "^/a|/b": "", "^(/a)": "", "^/a.b": "/a", "^/a$": "/a"} {
		if got := anchoredLiteral(re); got != want {
			t.Errorf("anchoredLiteral(%q) = %q, want %q", re, got, want)
		}
	}
}

// A route added to a map is served at once, from a spare backend through the runtime API, with no
// reload and no failed request; later changes of its servers go to the spare too; a change that
// needs more spares than are free is refused and a reload serves it; once no route has been added
// for ConsolidateAfter, a reload gives the routes their own backends.
func TestRoutesAddedWithoutReload(t *testing.T) {
	s, p := runtimeSetup(t, 2, time.Hour)
	routes := map[string]route.Backend{}
	serve := func(name string, bodies ...string) {
		var inst []route.Instance
		for _, b := range bodies {
			inst = append(inst, route.Instance{Address: "127.0.0.1", Port: startBackend(t, b)})
		}
		routes[name] = newRoute(name, inst, "/"+name)
	}
	render := func() []byte { return Render(s, slices.Collect(maps.Values(routes))) }
	for i := 0; i < MinMapRoutes+1; i++ {
		name := fmt.Sprintf("svc-%d", i)
		serve(name, name)
	}
	ctx := ctxFor(t, 60*time.Second)
	startForTest(ctx, t, p, render())
	// Requests to a route of the map all along: none may fail.
	load := startPathLoad(t, s.HTTPPort, "/svc-3/x", "svc-3")
	reloads := showProc(t, p).Reloads

	serve("new", "new-1")
	cfg := render()
	if _, err := p.UpdateServers(ctx, cfg); err != nil {
		t.Fatalf("UpdateServers with a new route: %v", err)
	}
	if got := bodiesOf(t, s.HTTPPort, "/new/a", 1); !reflect.DeepEqual(got, map[string]int{"new-1": 20}) {
		t.Fatalf("/new/a answered %v, want new-1", got)
	}
	if r := showProc(t, p).Reloads; r != reloads {
		t.Fatalf("reloads %d -> %d: adding a route reloaded HAProxy", reloads, r)
	}
	if !bytesEqual(p.Config(), cfg) || !bytesEqual(onDisk(t, p), cfg) {
		t.Fatal("Config() or haproxy.cfg on disk is not the new config")
	}
	for path := range mapsOf(cfg) {
		if _, err := os.Stat(path); err != nil {
			t.Fatalf("the new config's map file is not on disk: %v", err)
		}
	}

	// The new route scales: its second server goes to the spare that serves it.
	nr := routes["new"]
	nr.Instances = append(nr.Instances, route.Instance{Address: "127.0.0.1", Port: startBackend(t, "new-2")})
	routes["new"] = nr
	cfg = render()
	if _, err := p.UpdateServers(ctx, cfg); err != nil {
		t.Fatalf("UpdateServers adding a server to the new route: %v", err)
	}
	if got := bodiesOf(t, s.HTTPPort, "/new", 2); len(got) != 2 {
		t.Fatalf("/new answered %v, want new-1 and new-2", got)
	}

	// One spare is left: two new routes need a reload, which serves them and frees the spares.
	serve("second", "second")
	serve("third", "third")
	cfg = render()
	if _, err := p.UpdateServers(ctx, cfg); !errors.Is(err, ErrNeedsReload) {
		t.Fatalf("UpdateServers with two routes and one spare = %v, want ErrNeedsReload", err)
	}
	if err := p.Apply(ctx, cfg); err != nil {
		t.Fatalf("Apply: %v", err)
	}
	for _, name := range []string{"second", "third"} {
		if got := bodiesOf(t, s.HTTPPort, "/"+name, 1); got[name] != 20 {
			t.Fatalf("/%s answered %v", name, got)
		}
	}
	if got := bodiesOf(t, s.HTTPPort, "/new", 2); len(got) != 2 {
		t.Fatalf("after the reload /new answered %v, want new-1 and new-2", got)
	}
	reloads = showProc(t, p).Reloads

	// Consolidation: a route added now is served from a spare, then by its own backend.
	p.mu.Lock()
	p.consolidateAfter = 300 * time.Millisecond
	p.mu.Unlock()
	serve("fourth", "fourth")
	cfg = render()
	if _, err := p.UpdateServers(ctx, cfg); err != nil {
		t.Fatalf("UpdateServers with a route after the reload: %v", err)
	}
	if !strings.Contains(statServers(t, s.StatsSocket), SparePrefix) {
		t.Fatal("no spare backend serves the new route")
	}
	deadline := time.Now().Add(10 * time.Second)
	for showProc(t, p).Reloads == reloads {
		if time.Now().After(deadline) {
			t.Fatal("no reload gave the added route its own backend")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if got := bodiesOf(t, s.HTTPPort, "/fourth", 1); got["fourth"] != 20 {
		t.Fatalf("after the consolidation /fourth answered %v", got)
	}
	if !bytesEqual(p.Config(), cfg) {
		t.Fatal("the consolidation changed the config served")
	}
	if n := load.stop(); n < 10 {
		t.Fatalf("only %d requests were sent during the test", n)
	}
}

// statServers is HAProxy's stats of every server, which name their backends.
func statServers(t *testing.T, sock string) string {
	t.Helper()
	out, err := Command(ctxFor(t, 5*time.Second), sock, "show stat -1 4 -1 typed")
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func bytesEqual(a, b []byte) bool { return string(a) == string(b) }

// bodiesOf sends 20 requests per body wanted (at most) on new connections to path and counts the
// bodies, failing on any failed request.
func bodiesOf(t *testing.T, port int, path string, want int) map[string]int {
	t.Helper()
	got := map[string]int{}
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	for n := 0; n < 20*want; n++ {
		body, err := get(c, port, path)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		got[body]++
		if want == 1 && n == 19 {
			break
		}
	}
	return got
}

func get(c *http.Client, port int, path string) (string, error) {
	resp, err := c.Get(fmt.Sprintf("http://127.0.0.1:%d%s", port, path))
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("status %d: %s", resp.StatusCode, body)
	}
	return string(body), nil
}

// pathLoad sends requests to one path, two clients (keep-alive and new connections), at most
// 20,000 requests or 60 s, and fails the test on any answer but want.
type pathLoad struct {
	halt chan struct{}
	wg   sync.WaitGroup
	n    atomic.Int64
}

func startPathLoad(t *testing.T, port int, path, want string) *pathLoad {
	l := &pathLoad{halt: make(chan struct{})}
	end := time.Now().Add(60 * time.Second)
	for _, keepAlive := range []bool{true, false} {
		c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: !keepAlive}}
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for i := 0; i < 10000 && time.Now().Before(end); i++ {
				select {
				case <-l.halt:
					return
				default:
				}
				body, err := get(c, port, path)
				if err == nil && body != want {
					err = fmt.Errorf("answered %q", body)
				}
				if err != nil {
					t.Errorf("GET %s during the changes: %v", path, err)
					return
				}
				l.n.Add(1)
				time.Sleep(2 * time.Millisecond)
			}
		}()
	}
	t.Cleanup(l.stopOnce)
	return l
}

func (l *pathLoad) stopOnce() {
	select {
	case <-l.halt:
	default:
		close(l.halt)
	}
	l.wg.Wait()
}

func (l *pathLoad) stop() int64 {
	l.stopOnce()
	return l.n.Load()
}

// BenchmarkDiffAddedRoute diffs the config of 10,000 routes against the same plus one.
func BenchmarkDiffAddedRoute(b *testing.B) {
	s := testSettings()
	s.MapsDir = "/run/dfp/maps"
	base := routes10000()
	old := Render(s, base)
	next := Render(s, append(base, newRoute("new", []route.Instance{{Address: "10.1.0.1", Port: 80}}, "/new")))
	b.SetBytes(int64(len(next)))
	for b.Loop() {
		if _, ok := Diff(old, next); !ok {
			b.Fatal("Diff refuses the added route")
		}
	}
}

// BenchmarkDiffServedParsedAddedRoute is BenchmarkDiffAddedRoute as UpdateServers runs it after
// an update: the served config is parsed already, the new one is parsed and compared.
func BenchmarkDiffServedParsedAddedRoute(b *testing.B) {
	s := testSettings()
	s.MapsDir = "/run/dfp/maps"
	base := routes10000()
	o, ok := parseConfig(Render(s, base))
	if !ok {
		b.Fatal("parseConfig refuses the config")
	}
	next := Render(s, append(base, newRoute("new", []route.Instance{{Address: "10.1.0.1", Port: 80}}, "/new")))
	b.SetBytes(int64(len(next)))
	for b.Loop() {
		n, ok := parseConfig(next)
		if !ok {
			b.Fatal("parseConfig refuses the config")
		}
		if _, ok := diffParsed(&o, &n); !ok {
			b.Fatal("Diff refuses the added route")
		}
	}
}

// A route by domain added to a map by host and path is served at once, through the runtime API
// with no reload, for its host in any case and with a port, and not for other hosts.
func TestRouteByDomainAddedWithoutReload(t *testing.T) {
	s, p := runtimeSetup(t, 2, time.Hour)
	var bs []route.Backend
	byDomain := func(name string) route.Backend {
		b := newRoute(name, []route.Instance{{Address: "127.0.0.1", Port: startBackend(t, name)}}, "/")
		b.Route.ServiceDomain = []string{name + ".example.com"}
		return b
	}
	for i := 0; i < MinMapRoutes; i++ {
		bs = append(bs, byDomain(fmt.Sprintf("svc-%d", i)))
	}
	// A plain route answers every other host.
	bs = append(bs, newRoute("any", []route.Instance{{Address: "127.0.0.1", Port: startBackend(t, "any")}}, "/"))
	first := Render(s, bs)
	if !strings.Contains(string(first), "var(txn.dfp_host_path),map_beg(") {
		t.Fatalf("the routes by domain are not in a map:\n%s", first)
	}
	ctx := ctxFor(t, 60*time.Second)
	startForTest(ctx, t, p, first)
	reloads := showProc(t, p).Reloads
	if _, err := p.UpdateServers(ctx, Render(s, append(bs, byDomain("new")))); err != nil {
		t.Fatalf("UpdateServers with a new route by domain: %v", err)
	}
	for host, want := range map[string]string{
		"new.example.com": "new", "NEW.Example.com:8000": "new", "svc-3.example.com": "svc-3",
		"new.example.com.other": "any", "other.example.com": "any",
	} {
		if code, body := getHost(t, s.HTTPPort, host, "/x"); code != http.StatusOK || body != want {
			t.Errorf("GET /x for %s: %d %q, want %q", host, code, body, want)
		}
	}
	if r := showProc(t, p).Reloads; r != reloads {
		t.Fatalf("reloads %d -> %d: adding a route by domain reloaded HAProxy", reloads, r)
	}
}

// A route of a map removed, a route's path changed and a path moved to another route are served at
// once through the runtime API, with no reload and no failed request to the other routes; the
// reload ConsolidateAfter later drops the backends no longer used.
func TestRoutesRemovedWithoutReload(t *testing.T) {
	s, p := runtimeSetup(t, 2, time.Hour)
	routes := map[string]route.Backend{}
	serve := func(name string, paths ...string) {
		routes[name] = newRoute(name, []route.Instance{{Address: "127.0.0.1", Port: startBackend(t, name)}}, paths...)
	}
	render := func() []byte { return Render(s, slices.Collect(maps.Values(routes))) }
	for i := 0; i < MinMapRoutes+2; i++ {
		name := fmt.Sprintf("svc-%d", i)
		serve(name, "/"+name)
	}
	ctx := ctxFor(t, 60*time.Second)
	startForTest(ctx, t, p, render())
	load := startPathLoad(t, s.HTTPPort, "/svc-3/x", "svc-3")
	reloads := showProc(t, p).Reloads
	// The body of a 200, else the status code.
	status := func(path string) string {
		t.Helper()
		code, body := getHost(t, s.HTTPPort, "", path)
		if code != http.StatusOK {
			return strconv.Itoa(code)
		}
		return body
	}
	update := func(what string) Delta {
		t.Helper()
		d, err := p.UpdateServers(ctx, render())
		if err != nil {
			t.Fatalf("UpdateServers, %s: %v", what, err)
		}
		return d
	}

	delete(routes, "svc-0")
	if d := update("a route removed"); len(d.Removed) != 1 || len(d.MapDels) != 1 {
		t.Fatalf("a route removed: %+v", d)
	}
	if got := status("/svc-0/x"); got != "503" {
		t.Fatalf("/svc-0/x after its route was removed: %s, want 503 (no route)", got)
	}

	r := routes["svc-1"]
	r.Route.ServicePath = []string{"/svc-1-moved"}
	routes["svc-1"] = r
	update("a route's path changed")
	if got := status("/svc-1-moved/x"); got != "svc-1" {
		t.Fatalf("/svc-1-moved/x: %s, want svc-1", got)
	}
	if got := status("/svc-1/x"); got != "503" {
		t.Fatalf("/svc-1/x after its route moved: %s, want 503", got)
	}

	// svc-2's path goes to a new route, whose backend a spare stands in for.
	delete(routes, "svc-2")
	serve("svc-2-next", "/svc-2")
	if d := update("a path moved to another route"); len(d.MapSets) != 1 {
		t.Fatalf("a path moved: %+v", d)
	}
	if got := status("/svc-2/x"); got != "svc-2-next" {
		t.Fatalf("/svc-2/x after its path moved: %s, want svc-2-next", got)
	}
	if r := showProc(t, p).Reloads; r != reloads {
		t.Fatalf("reloads %d -> %d: the changes reloaded HAProxy", reloads, r)
	}
	if p.Settled() {
		t.Fatal("Settled with backends of removed routes still in HAProxy")
	}
	stats := statServers(t, s.StatsSocket)
	if !strings.Contains(stats, "svc-0-be") {
		t.Fatal("the backend of the removed route is gone before the reload")
	}

	// The reload that follows drops the backends no longer used and gives svc-2-next its own.
	p.mu.Lock()
	p.consolidateAfter = 200 * time.Millisecond
	p.mu.Unlock()
	p.consolidateLater()
	deadline := time.Now().Add(10 * time.Second)
	for showProc(t, p).Reloads == reloads || !p.Settled() {
		if time.Now().After(deadline) {
			t.Fatal("no reload dropped the backends of the removed routes")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if stats := statServers(t, s.StatsSocket); strings.Contains(stats, "svc-0-be") || strings.Contains(stats, "svc-2-be") {
		t.Fatalf("after the reload HAProxy still has the backends of removed routes:\n%s", stats)
	}
	if got := status("/svc-2/x"); got != "svc-2-next" {
		t.Fatalf("after the reload /svc-2/x: %s, want svc-2-next", got)
	}
	if n := load.stop(); n < 10 {
		t.Fatalf("only %d requests were sent during the test", n)
	}
}

// Changes through the runtime API that keep coming put the consolidating reload off by at most
// consolidateMaxDelay ConsolidateAfters.
func TestSteadyChangesDoNotPutTheReloadOffForEver(t *testing.T) {
	const after = 400 * time.Millisecond
	s, p := runtimeSetup(t, DefaultSpareBackends, after)
	bs := plainRoutes(MinMapRoutes + 8*consolidateMaxDelay)
	ctx := ctxFor(t, 60*time.Second)
	startForTest(ctx, t, p, Render(s, bs))
	reloads := showProc(t, p).Reloads
	t0 := time.Now()
	// A route is removed every after/4 or so (the change itself takes some time, more under
	// -race on a loaded machine): each removal alone would put the reload off by after.
	var last time.Time
	var longest time.Duration // the longest time between two changes
	for showProc(t, p).Reloads == reloads {
		if time.Since(t0) > 2*consolidateMaxDelay*after || len(bs) == MinMapRoutes {
			t.Fatalf("no reload after %s of changes every %s", time.Since(t0).Round(time.Millisecond), after/4)
		}
		bs = bs[1:]
		if d, err := p.UpdateServers(ctx, Render(s, bs)); err != nil || len(d.Removed) != 1 {
			t.Fatalf("UpdateServers = %+v, %v", d, err)
		}
		if !last.IsZero() {
			longest = max(longest, time.Since(last))
		}
		last = time.Now()
		time.Sleep(after / 4)
	}
	if took := time.Since(t0); took < consolidateMaxDelay*after {
		t.Fatalf("the reload came %s after the first change, before the changes stopped (the longest time between two changes: %s)",
			took, longest.Round(time.Millisecond))
	}
	t.Logf("the reload came %s after the first change", time.Since(t0).Round(time.Millisecond))
}

// Routes of a map (by path, and by domain and path) added, removed, given other paths and taking
// one another's paths, changed through the runtime API where it can (a reload where it cannot),
// route every request as a HAProxy that loads each config afresh does: two real HAProxy processes
// serve the same tables and are compared request by request after every change. So for each path
// type: path_beg, path_beg and path mixed (a map of exact paths and one of prefixes), and path_end,
// path_dir and path_reg, whose maps are tried in order (the runtime API adds an entry at the end
// only: an entry that must come before others replaces the whole map, all at once).
func TestRuntimeChangesRouteAsAReloadDoes(t *testing.T) {
	for _, tc := range []struct {
		name       string
		types      []route.PathType
		minRuntime int // of the 30 changes, those at least that go through the runtime API
	}{
		{"path_beg", []route.PathType{route.PathBeg}, 10},
		{"path_beg and path", []route.PathType{route.PathBeg, route.Path}, 10},
		{"path_end", []route.PathType{route.PathEnd}, 8},
		{"path_dir", []route.PathType{route.PathDir}, 8},
		{"path_reg", []route.PathType{route.PathReg}, 8},
	} {
		t.Run(tc.name, func(t *testing.T) { runtimeChangesRouteAsAReloadDoes(t, tc.types, tc.minRuntime) })
	}
}

func runtimeChangesRouteAsAReloadDoes(t *testing.T, types []route.PathType, minRuntime int) {
	seed := uint64(time.Now().UnixNano())
	if v := os.Getenv("DFP_RUNTIME_SEED"); v != "" { // to replay a failure
		var err error
		if seed, err = strconv.ParseUint(v, 10, 64); err != nil {
			t.Fatalf("DFP_RUNTIME_SEED: %v", err)
		}
	}
	rng := rand.New(rand.NewPCG(seed, 0))
	t.Logf("seed %d (DFP_RUNTIME_SEED replays it)", seed)
	// Paths that are prefixes of one another, so that entries shadow one another.
	vocab := []string{"/a", "/a/b", "/a/b/c", "/ab", "/b", "/b/c", "/c", "/c/d/e", "/d"}
	ports := map[string]int{}
	inst := func(name string) []route.Instance {
		if _, ok := ports[name]; !ok {
			ports[name] = startBackend(t, name)
		}
		return []route.Instance{{Address: "127.0.0.1", Port: ports[name]}}
	}
	table := map[string][]string{}
	hostOf := map[string]string{}         // the route's domain, if it has one
	typeOf := map[string]route.PathType{} // the route's path type
	pathType := func() route.PathType { return types[rng.IntN(len(types))] }
	hosts := []string{"", "a.test", "b.test"}
	for i := 0; i < 24; i++ {
		name := fmt.Sprintf("r%02d", i)
		table[name] = []string{"/" + name}
		if i%3 == 0 {
			table[name] = append(table[name], vocab[rng.IntN(len(vocab))])
		}
		hostOf[name] = hosts[i%2+1]
		if i >= 12 {
			hostOf[name] = ""
		}
		typeOf[name] = pathType()
	}
	type side struct {
		s Settings
		p *Process
	}
	start := func() side {
		s, p := runtimeSetup(t, 4, time.Hour)
		return side{s, p}
	}
	render := func(sd side) []byte {
		var bs []route.Backend
		for name, paths := range table {
			b := newRoute(name, inst(name), paths...)
			b.Route.PathType = typeOf[name]
			if b.Route.PathType == route.PathReg {
				// Regular expressions anchored at the start or not: the runtime API adds an
				// anchored one between others where no path can match it and one after it.
				b.Route.ServicePath = slices.Clone(paths)
				for i, p := range paths {
					if strings.Count(p, "/")%2 == 1 {
						b.Route.ServicePath[i] = "^" + p
					}
				}
			}
			if h := hostOf[name]; h != "" {
				b.Route.ServiceDomain = []string{h}
			}
			bs = append(bs, b)
		}
		return Render(sd.s, bs)
	}
	ctx := ctxFor(t, 3*time.Minute)
	runtime, fresh := start(), start()
	for _, sd := range []side{runtime, fresh} {
		startForTest(ctx, t, sd.p, render(sd))
	}
	var paths []string
	for _, p := range vocab {
		paths = append(paths, p, p+"/x", p+"x")
	}
	answer := func(port int, host, path string) string {
		code, body := getHost(t, port, host, path)
		return fmt.Sprintf("%d %s", code, body)
	}
	names := func() []string {
		var out []string
		for name := range table {
			out = append(out, name)
		}
		slices.Sort(out)
		return out
	}
	byRuntime := 0
	for step := 0; step < 30; step++ {
		ns := names()
		some := ns[rng.IntN(len(ns))]
		var what string
		switch op := rng.IntN(4); {
		case op == 0 || len(ns) <= 2*MinMapRoutes+1:
			// A name anywhere in the order of names, so that a new route often comes between
			// others of a map tried in order.
			name := some
			for table[name] != nil {
				name = fmt.Sprintf("r%02d", rng.IntN(100))
			}
			table[name] = []string{"/" + name, vocab[rng.IntN(len(vocab))]}
			hostOf[name] = hosts[rng.IntN(len(hosts))]
			typeOf[name] = pathType()
			what = "added " + name
		case op == 1:
			delete(table, some)
			what = "removed " + some
		case op == 2:
			table[some] = []string{"/" + some, vocab[rng.IntN(len(vocab))]}
			what = "new paths for " + some
		default:
			// A path of one route moves to another.
			other := ns[rng.IntN(len(ns))]
			if len(table[some]) > 1 && other != some {
				p := table[some][1]
				table[some] = table[some][:1]
				table[other] = append(slices.Clone(table[other][:1]), p)
			}
			what = "a path of " + some + " to " + other
		}
		if _, err := runtime.p.UpdateServers(ctx, render(runtime)); err == nil {
			byRuntime++
		} else if !errors.Is(err, ErrNeedsReload) {
			t.Fatalf("step %d (%s): UpdateServers: %v", step, what, err)
		} else if err := runtime.p.Apply(ctx, render(runtime)); err != nil {
			t.Fatalf("step %d (%s): Apply: %v", step, what, err)
		}
		if err := fresh.p.Reload(ctx, render(fresh)); err != nil {
			t.Fatalf("step %d (%s): Reload: %v", step, what, err)
		}
		asked := slices.Clone(paths)
		for _, name := range names() {
			asked = append(asked, "/"+name, "/"+name+"/x")
		}
		for _, path := range asked {
			for _, host := range []string{"a.test", "B.test:80"} { // and the routes without a domain where none of theirs matches
				if got, want := answer(runtime.s.HTTPPort, host, path), answer(fresh.s.HTTPPort, host, path); got != want {
					t.Fatalf("step %d (%s): %s%s answered %q through the runtime API, %q after a reload (table %v, domains %v)",
						step, what, host, path, got, want, table, hostOf)
				}
			}
		}
	}
	if byRuntime < minRuntime {
		t.Fatalf("only %d of 30 changes went through the runtime API, want %d at least", byRuntime, minRuntime)
	}
	t.Logf("%d of 30 changes went through the runtime API", byRuntime)
}

// runtimeSetup is a Process, not started yet, and the settings of its configs: HAProxy on a free
// port of 127.0.0.1, with a stats socket, maps and spares spare backends.
func runtimeSetup(t *testing.T, spares int, consolidateAfter time.Duration) (Settings, *Process) {
	dir := t.TempDir()
	s := DefaultSettings()
	s.BindAddress, s.HTTPPort = "127.0.0.1", testenv.FreePort(t)
	s.StatsSocket, s.MapsDir, s.SpareBackends = filepath.Join(dir, "haproxy.sock"), filepath.Join(dir, "maps"), spares
	p := NewProcess(Options{Binary: testenv.HAProxyBin(t), Dir: dir, Logger: testLogger(),
		ReloadTimeout: 10 * time.Second, ConsolidateAfter: consolidateAfter})
	return s, p
}

// startRuntime starts p on cfg and stops it when the test ends.
func startForTest(ctx context.Context, t *testing.T, p *Process, cfg []byte) {
	t.Helper()
	if err := p.Start(ctx, cfg); err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := p.Stop(ctx); err != nil {
			t.Errorf("Stop: %v", err)
		}
	})
}

// getHost sends GET path to 127.0.0.1:port on a new connection, with the Host header host unless it
// is empty, and returns the status and the body; it fails the test when no answer comes.
func getHost(t *testing.T, port int, host, path string) (int, string) {
	t.Helper()
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	req, err := http.NewRequest(http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d%s", port, path), nil)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	if host != "" {
		req.Host = host
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("GET %s%s: %v", host, path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s%s: %v", host, path, err)
	}
	return resp.StatusCode, string(body)
}

// A route whose entry must come before others in a map tried in order (path_dir here) is served
// without a reload: the map is replaced, all at once, with entries enough for several payloads of
// the runtime API. The new route wins where it comes first, every other route keeps its requests,
// and requests to routes of the map all along are each answered by their own backend.
func TestOrderedMapReplacedWithoutReload(t *testing.T) {
	s, p := runtimeSetup(t, 2, time.Hour)
	const n = 1200 // some 20 KB of map entries
	filler := []route.Instance{{Address: "127.0.0.1", Port: startBackend(t, "filler")}}
	own := func(name string) []route.Instance {
		return []route.Instance{{Address: "127.0.0.1", Port: startBackend(t, name)}}
	}
	routes := map[string]route.Backend{}
	add := func(name string, inst []route.Instance, path string) {
		b := newRoute(name, inst, path)
		b.Route.PathType = route.PathDir
		routes[name] = b
	}
	for i := 0; i < n; i++ {
		name, inst := fmt.Sprintf("d%04d", i), filler
		if i == 5 || i == 600 || i == n-1 {
			inst = own(name)
		}
		add(name, inst, "/"+name)
	}
	render := func() []byte { return Render(s, slices.Collect(maps.Values(routes))) }
	ctx := ctxFor(t, 90*time.Second)
	cfg := render()
	if !strings.Contains(string(cfg), ",map_dir(") {
		t.Fatal("the routes are not routed through a map_dir map")
	}
	startForTest(ctx, t, p, cfg)
	loads := []*pathLoad{startPathLoad(t, s.HTTPPort, "/d0005/x", "d0005"),
		startPathLoad(t, s.HTTPPort, "/a/d0600/longer", "d0600"), startPathLoad(t, s.HTTPPort, "/d1199", "d1199")}
	reloads := showProc(t, p).Reloads

	// A longer path comes first in routing order: the new route takes /first/of/all/d0600 from d0600.
	add("new", own("new"), "/first/of/all")
	cfg = render()
	d, err := p.UpdateServers(ctx, cfg)
	if err != nil {
		t.Fatalf("UpdateServers with a path_dir route that comes first: %v", err)
	}
	if len(d.MapReplaces) != 1 || len(d.MapReplaces[0].Entries) != n+1 || d.MapReplaces[0].Entries[0].Key != "/first/of/all" {
		t.Fatalf("UpdateServers = %+v; want the map replaced, the new route first", d)
	}
	if r := showProc(t, p).Reloads; r != reloads {
		t.Fatalf("reloads %d -> %d: the route that comes first reloaded HAProxy", reloads, r)
	}
	for path, want := range map[string]string{"/first/of/all/d0600": "new", "/x/first/of/all": "new",
		"/d0600/first/of": "d0600", "/d0005": "d0005", "/d1199/y": "d1199", "/d0001": "filler"} {
		if got := bodiesOf(t, s.HTTPPort, path, 1); got[want] != 20 {
			t.Errorf("%s answered %v, want %s", path, got, want)
		}
	}

	// The route moves to the end of the order (a shorter path, and a name after the others): its
	// entry is removed and added at the end, one by one.
	add("new", routes["new"].Instances, "/n")
	if d, err := p.UpdateServers(ctx, render()); err != nil || len(d.MapReplaces) != 0 || len(d.MapAdds) != 1 {
		t.Fatalf("UpdateServers with the route's path changed = %+v, %v; want one entry added", d, err)
	}
	// Another route moves to the start of the order (a longer path): the map is replaced again.
	add("d0600", routes["d0600"].Instances, "/d0600/longer")
	if d, err := p.UpdateServers(ctx, render()); err != nil || len(d.MapReplaces) != 1 {
		t.Fatalf("UpdateServers with d0600's path changed = %+v, %v; want the map replaced", d, err)
	}
	for path, want := range map[string]string{"/n/d0600/longer": "d0600", "/n/d0600": "new", "/first/of/all/d0001": "filler",
		"/first/of/all/d0005": "d0005"} {
		if got := bodiesOf(t, s.HTTPPort, path, 1); got[want] != 20 {
			t.Errorf("after the path changes %s answered %v, want %s", path, got, want)
		}
	}
	if r := showProc(t, p).Reloads; r != reloads {
		t.Fatalf("reloads %d -> %d", reloads, r)
	}
	// The reload that gives the new route its own backend serves the same.
	if err := p.Apply(ctx, render()); err != nil {
		t.Fatalf("Apply: %v", err)
	}
	if got := bodiesOf(t, s.HTTPPort, "/n/d0600/longer", 1); got["d0600"] != 20 {
		t.Errorf("after the reload /n/d0600/longer answered %v, want d0600", got)
	}
	for _, l := range loads {
		if got := l.stop(); got < 10 {
			t.Fatalf("only %d requests were sent during the test", got)
		}
	}
}

// The reload that gives routes served by spares their own backends loads the config served without
// checking it again; when HAProxy refuses it all the same (here the certificate it names was
// replaced by one that does not parse), the config served keeps serving, spares and all.
func TestRefusedConsolidationKeepsServing(t *testing.T) {
	s, p := runtimeSetup(t, 2, time.Hour)
	s.CertsDir, s.HasCerts, s.HTTPSPort = filepath.Join(t.TempDir(), "certs"), true, testenv.FreePort(t)
	pemFile := filepath.Join(s.CertsDir, "proxy.pem")
	if err := os.MkdirAll(s.CertsDir, 0o755); err != nil {
		t.Fatal(err)
	}
	full, _, _ := testenv.NewCert(t, "127.0.0.1")
	if err := os.WriteFile(pemFile, full, 0o600); err != nil {
		t.Fatal(err)
	}
	routes := map[string]route.Backend{}
	for i := 0; i < MinMapRoutes+1; i++ {
		name := fmt.Sprintf("svc-%d", i)
		routes[name] = newRoute(name, []route.Instance{{Address: "127.0.0.1", Port: startBackend(t, name)}}, "/"+name)
	}
	render := func() []byte { return Render(s, slices.Collect(maps.Values(routes))) }
	ctx := ctxFor(t, 60*time.Second)
	startForTest(ctx, t, p, render())
	routes["new"] = newRoute("new", []route.Instance{{Address: "127.0.0.1", Port: startBackend(t, "new")}}, "/new")
	if _, err := p.UpdateServers(ctx, render()); err != nil {
		t.Fatalf("UpdateServers with a new route: %v", err)
	}
	if err := os.WriteFile(pemFile, []byte("not a certificate\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	p.SetReloadHook(func(_ time.Duration, err error) { done <- err })
	p.mu.Lock()
	p.consolidateAfter = 100 * time.Millisecond
	p.mu.Unlock()
	p.consolidateLater()
	select {
	case err := <-done:
		if !errors.Is(err, ErrReloadFailed) {
			t.Fatalf("the reload with a broken certificate = %v, want ErrReloadFailed", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("no reload was tried")
	}
	for _, name := range []string{"new", "svc-3"} {
		if got := bodiesOf(t, s.HTTPPort, "/"+name+"/x", 1); got[name] != 20 {
			t.Fatalf("after the refused reload /%s/x answered %v, want %s", name, got, name)
		}
	}
	if p.Settled() {
		t.Fatal("Settled after a refused reload: the spare still serves the new route")
	}
}
