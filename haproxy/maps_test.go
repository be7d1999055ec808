package haproxy

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

// Routing through maps chooses, for every request, the backend that acl and use_backend lines
// choose: the same table is served both ways by the real HAProxy and compared request by request.
func TestMapsRouteAsACLLinesDo(t *testing.T) {
	// mapsCase without its aclName route, which matches every request before the others.
	bs := mapsCase()[:len(mapsCase())-1]
	// Requests that each route matches, requests that several match, and requests none matches.
	var paths []string
	for _, b := range bs {
		for _, p := range b.Route.ServicePath {
			paths = append(paths, p, p+"/x", p+"x", strings.TrimSuffix(p, p[len(p)-1:]))
		}
	}
	paths = append(paths, "/", "/zzz", "/dd/di/x", "/dd/dix", "/aaaaaa/s05/deeper", "/pq/long/x",
		"/api/v1/long/deeper/x", "/shop/cart", "/wild-card-path-is-the-longest-one/x")
	// The Host header as clients send it: any case, with a port, names that only start or end
	// like a route's domain.
	hosts := []string{"other.example.com", "a.example.com", "A.Example.COM:8080", "b.example.com",
		"c.example.com", "a.example.com.evil", "www.example.org", "d.example.com:80", "e.example.com", "F.example.com", "example.com"}
	withACLs, withMaps, aclCfg, mapCfg := routeBothWays(t, bs, paths, hosts)
	// Two maps: one by host and path, one by path.
	if strings.Contains(aclCfg, "map_beg") || strings.Count(mapCfg, "map_beg(") != 4 ||
		strings.Count(mapCfg, "var(txn.dfp_host_path),map_beg(") != 2 || strings.Contains(mapCfg, "acl domain_h0") {
		t.Fatalf("the configs do not route as intended:\n%s\n---\n%s", aclCfg, mapCfg)
	}
	distinct := sameAnswers(t, withACLs, withMaps, map[string]string{
		"other.example.com/pq/long/x":                         "x",  // the first match, not the longest
		"b.example.com/shop/cart":                             "h3", // h3's /s comes first on b.example.com
		"c.example.com/shop/cart":                             "h2",
		"A.Example.COM:8080/api/v1/long/deeper/x":             "h1",
		"A.Example.COM:8080/api":                              "h0",
		"a.example.com.evil/api":                              "h4",
		"a.example.com/zzz":                                   "domain",
		"www.example.org/wild-card-path-is-the-longest-one/x": "wild",
		"d.example.com:80/d6":                                 "h6",
	})
	if got := withMaps["example.com/api"]; strings.HasSuffix(got, " h0") {
		t.Errorf("example.com/api through maps: %q, want no route of a.example.com", got)
	}
	if len(distinct) < len(bs)-1 { // y answers none: x shadows every path of it
		t.Fatalf("the requests reached only %d of %d routes: %v", len(distinct), len(bs), distinct)
	}
}

// routeBothWays serves bs through the real HAProxy twice, with acl and use_backend lines and then
// through maps, and sends every path with every Host header to each: the answers ("<code> <body>")
// by host followed by path, and the two configs. Each route has a backend of its own that answers
// its name.
func routeBothWays(t *testing.T, bs []route.Backend, paths, hosts []string) (withACLs, withMaps map[string]string, aclCfg, mapCfg string) {
	t.Helper()
	for i := range bs {
		port := startBackend(t, bs[i].Route.ServiceName)
		bs[i].Instances = []route.Instance{{Address: "127.0.0.1", Port: port}}
	}
	answers := func(maps bool) (map[string]string, string) {
		front := testenv.FreePort(t)
		s := testSettings()
		s.HTTPPort, s.StatsSocket = front, ""
		p := startProcess(t, procConfig(testenv.FreePort(t), startBackend(t, "start"), 0))
		if maps {
			s.MapsDir = filepath.Join(p.dir, "maps")
		}
		cfg := Render(s, bs)
		if err := p.Apply(ctxFor(t, 15*time.Second), cfg); err != nil {
			t.Fatalf("apply: %v", err)
		}
		out := map[string]string{}
		for _, path := range paths {
			for _, host := range hosts {
				code, body := getHost(t, front, host, path)
				out[host+path] = fmt.Sprintf("%d %s", code, body)
			}
		}
		return out, string(cfg)
	}
	withACLs, aclCfg = answers(false)
	withMaps, mapCfg = answers(true)
	return withACLs, withMaps, aclCfg, mapCfg
}

// sameAnswers fails t where the answers through maps differ from those through acl lines, or from
// want (host and path to the route that must answer); it returns the distinct answers.
func sameAnswers(t *testing.T, withACLs, withMaps, want map[string]string) map[string]bool {
	t.Helper()
	distinct := map[string]bool{}
	for k, a := range withACLs {
		distinct[a] = true
		if got := withMaps[k]; got != a {
			t.Errorf("%s: through maps %q, through acl lines %q", k, got, a)
		}
	}
	for k, route := range want {
		if got := withMaps[k]; got != "200 "+route {
			t.Errorf("%s through maps: %q, want route %s", k, got, route)
		}
	}
	return distinct
}

// pathTypesCase is runs of at least MinMapRoutes routes of each path type, and of routes with an
// aclName, whose patterns overlap,
// so that a request matches several routes and the first one in routing order must answer. The
// routes of a run share the length of their longest path (a padding path no request matches),
// so that each run comes together, its routes by name.
func pathTypesCase() []route.Backend {
	var bs []route.Backend
	add := func(name string, t route.PathType, domains []string, band int, paths ...string) {
		pad := "/zz-" + name + "-" + strings.Repeat("z", band-len(name)-5)
		if t == route.PathReg {
			pad = "^" + pad[:len(pad)-1]
		}
		bs = append(bs, route.Backend{Route: route.Route{ServiceName: name, PathType: t, ServiceDomain: domains,
			ServicePath: append(paths, pad)}})
	}
	// aclName routes come first, in aclName order, whatever their paths' lengths: k0's /k/a before
	// k1's shorter /k/, and k2's /k/a/b never answers (k0's /k/a matches every request it does).
	for i, p := range []string{"/k/a", "/k/", "/k/a/b", "/kk", "/k/b", "/kk/", "/kkk/x", "/k/c", "/kz"} {
		name := fmt.Sprintf("k%d", i)
		bs = append(bs, route.Backend{Route: route.Route{ServiceName: name, PathType: route.PathBeg, ACLName: name,
			ServicePath: []string{p}}})
	}
	// path_reg: r0 answers /r/1, r1 /r/1x; r2 matches any path holding /r/, r3 any ending in x.
	for i, re := range []string{"^/r/[0-9]+$", "^/r/1", "/r/", "x$", "^/rr/[a-c]", "^/rr/a", "^/rr/(b|c)/d$", "^/q/[0-9]{2}", "[?]"} {
		add(fmt.Sprintf("r%d", i), route.PathReg, nil, 60, re)
	}
	// path_end: e0 ".json" comes before e1 and e3, and answers for them.
	for i, end := range []string{".json", "items.json", "/x.js", "s.json", ".js", "ml", "/end", "d", "/a/b/c"} {
		add(fmt.Sprintf("e%d", i), route.PathEnd, nil, 55, end)
	}
	// path_dir: d0 answers /api/v1/items, d3 /v2/items (before d4 and d5).
	for i, dir := range []string{"/api", "/api/v1", "/v1", "/items", "/v2", "/v2/items", "/aa/", "/b/c", "/c.d(e)+"} {
		add(fmt.Sprintf("d%d", i), route.PathDir, nil, 50, dir)
	}
	// path and path_beg without domains, by the lengths of their paths: b-exact /a/b comes before
	// b-prefix /a/; b-multi's /q (it sorts first by its long path) shadows b-exact2's /q/r; two
	// routes have the exact path /dup, the first by name answers.
	bs = append(bs,
		route.Backend{Route: route.Route{ServiceName: "b-multi", PathType: route.PathBeg, ServicePath: []string{"/q", "/very-long-path-that-sorts-first"}}},
		route.Backend{Route: route.Route{ServiceName: "b-exact2", PathType: route.Path, ServicePath: []string{"/q/r"}}},
		route.Backend{Route: route.Route{ServiceName: "b-exact", PathType: route.Path, ServicePath: []string{"/a/b"}}},
		route.Backend{Route: route.Route{ServiceName: "b-prefix", PathType: route.PathBeg, ServicePath: []string{"/a/"}}},
		route.Backend{Route: route.Route{ServiceName: "b-dup1", PathType: route.Path, ServicePath: []string{"/dup"}}},
		route.Backend{Route: route.Route{ServiceName: "b-dup2", PathType: route.Path, ServicePath: []string{"/dup"}}},
		route.Backend{Route: route.Route{ServiceName: "b-ex", PathType: route.Path, ServicePath: []string{"/z/exact", "/x-very-long-exact-path"}}},
		route.Backend{Route: route.Route{ServiceName: "b-z", PathType: route.PathBeg, ServicePath: []string{"/z/ex"}}},
		route.Backend{Route: route.Route{ServiceName: "b-root", PathType: route.PathBeg, ServicePath: []string{"/"}}},
	)
	// path and path_beg with domains: h-exact's /exact before h-prefix's /ex on a.example.com; the
	// path_end route with a domain keeps its acl lines, first of the routes with domains.
	hosts := func(name string, t route.PathType, domain string, paths ...string) route.Backend {
		return route.Backend{Route: route.Route{ServiceName: name, PathType: t, ServiceDomain: []string{domain}, ServicePath: paths}}
	}
	bs = append(bs,
		hosts("h-end", route.PathEnd, "a.example.com", ".html", "/a-long-ending-that-sorts-first"),
		hosts("h-exact", route.Path, "a.example.com", "/exact"),
		hosts("h-prefix", route.PathBeg, "a.example.com", "/ex"),
		hosts("h-b", route.Path, "B.example.com", "/exact"),
		hosts("h-c", route.PathBeg, "c.example.com", "/c"),
		hosts("h-d", route.Path, "d.example.com", "/d"),
		hosts("h-e", route.PathBeg, "e.example.com", "/e"),
		hosts("h-f", route.Path, "f.example.com", "/f"),
		hosts("h-g", route.PathBeg, "g.example.com", "/"),
	)
	return bs
}

// Routes of every path type route through maps as they do through acl lines: by path for each
// type, by host and path for path and path_beg.
func TestMapsOfEveryPathTypeRouteAsACLLinesDo(t *testing.T) {
	bs := pathTypesCase()
	for _, b := range bs {
		if err := b.Route.Validate(); err != nil {
			t.Fatalf("the case's route %s is not valid: %v", b.Route.ServiceName, err)
		}
	}
	paths := []string{"/k", "/k/", "/k/a", "/k/a/b", "/k/a/bc", "/kk", "/kk/", "/kkk/x", "/k/b/c", "/kz", "/r/1", "/r/12", "/r/1x", "/x/r/y", "/ax", "/rr/a", "/rr/ab", "/rr/b/d", "/rr/b/dd",
		"/q/12", "/q/1", "/q/r", "/q/rs", "/items.json", "/a/items.json", "/x.js", "/y/x.js", "/xs.json", "/s.js",
		"/a.html", "/end", "/the/end", "/d", "/a/b/c", "/x/a/b/c", "/api", "/api/", "/api/v1/items", "/apiv1",
		"/v1", "/x/v1/y", "/items", "/v2/items", "/v2/y", "/aa/b", "/v2/itemsx", "/a", "/a/", "/a/b", "/a/bc", "/a/b/", "/b/c",
		"/b/cd", "/c", "/c/", "/dup", "/dupx", "/z/exact", "/z/exactly", "/z/ex", "/x-very-long-exact-path",
		"/x-very-long-exact-path/", "/exact", "/exactly", "/ex", "/e", "/f", "/fx", "/g", "/page.html",
		"/x/api", "/api.", "/apix", "//api//", "/x/api/v1/", "/aa", "/aa/", "/x/aa", "/aaa", "/x/b/c/y", "/b/cx",
		"/v2/items/", "/V1", "/c.d(e)+", "/x/c.d(e)+/y", "/cxd(e)+", "/c.d(e)", "/c.d(e)+x", "/c.d(e)+/"}
	hosts := []string{"other.example.com", "a.example.com", "A.EXAMPLE.com:8080", "b.example.com", "c.example.com",
		"d.example.com", "e.example.com", "f.example.com", "g.example.com"}
	withACLs, withMaps, aclCfg, mapCfg := routeBothWays(t, bs, paths, hosts)
	for use, n := range map[string]int{"path,map_reg(": 1, "path,map_end(": 1, "path,map_dir(": 1, "path,map_str(": 1,
		"path,map_beg(": 2, "var(txn.dfp_host_path),map_str(": 1, "var(txn.dfp_host_path),map_beg(": 1} {
		if strings.Count(mapCfg, "use_backend %["+use) != n {
			t.Fatalf("the config does not look routes up with %s %d times:\n%s", use, n, mapCfg)
		}
	}
	if strings.Contains(aclCfg, ",map_") || !strings.Contains(mapCfg, "acl domain_h-end") || strings.Contains(mapCfg, "acl url_r0") {
		t.Fatalf("the configs do not route as intended:\n%s\n---\n%s", aclCfg, mapCfg)
	}
	distinct := sameAnswers(t, withACLs, withMaps, map[string]string{
		"other.example.com/k/a/b":        "k0",
		"other.example.com/k/b/c":        "k1",
		"other.example.com/kk/":          "k3",
		"other.example.com/kkk/x":        "k3",
		"other.example.com/r/1":          "r0",
		"other.example.com/r/1x":         "r1",
		"other.example.com/x/r/y":        "r2",
		"other.example.com/ax":           "r3",
		"other.example.com/a/items.json": "e0",
		"other.example.com/y/x.js":       "e2",
		"other.example.com/api/v1/items": "d0",
		"other.example.com/v2/items":     "d3",
		"other.example.com/v2/y":         "d4",
		"other.example.com/x/aa":         "d6",
		"other.example.com/x/c.d(e)+/y":  "d8",
		"other.example.com/a/b":          "b-exact",
		"other.example.com/a/bc":         "b-prefix",
		"other.example.com/q/r":          "b-multi",
		"other.example.com/dup":          "b-dup1",
		"other.example.com/z/exact":      "b-ex",
		"other.example.com/z/exactly":    "b-z",
		"a.example.com/a.html":           "h-end",
		"A.EXAMPLE.com:8080/exact":       "h-exact",
		"a.example.com/exactly":          "h-prefix",
		"b.example.com/exact":            "h-b",
		"b.example.com/exactly":          "b-root", // no route of b.example.com matches: routes by path answer
		"d.example.com/d":                "h-d",
		"g.example.com/fx":               "h-g",
	})
	if len(distinct) < 30 {
		t.Fatalf("the requests reached only %d routes: %v", len(distinct), distinct)
	}
}

func TestMapFilesAreWrittenAndPruned(t *testing.T) {
	p := startProcess(t, procConfig(testenv.FreePort(t), startBackend(t, "start"), 0))
	s := testSettings()
	s.HTTPPort, s.StatsSocket, s.MapsDir = testenv.FreePort(t), "", filepath.Join(p.dir, "maps")
	bs := mapsCase()
	first := Render(s, bs)
	if err := p.Apply(ctxFor(t, 15*time.Second), first); err != nil {
		t.Fatal(err)
	}
	files := func() []string {
		m, _ := filepath.Glob(filepath.Join(s.MapsDir, "*.map"))
		return m
	}
	before := files()
	if len(before) != 2 { // one by host and path, one by path
		t.Fatalf("map files after the first apply: %v", before)
	}
	bs[0].Route.ServicePath = []string{"/changed"}
	if err := p.Apply(ctxFor(t, 15*time.Second), Render(s, bs)); err != nil {
		t.Fatal(err)
	}
	after := files()
	kept := 0
	for _, f := range after {
		if slices.Contains(before, f) {
			kept++
		}
	}
	if len(after) != 2 || kept != 1 {
		t.Fatalf("map files after a change of one map: %v (before %v); want that one new, the other kept", after, before)
	}
	// A config that names a map outside Dir/maps is refused before HAProxy reads it.
	s.MapsDir = t.TempDir()
	if err := p.Validate(ctxFor(t, 10*time.Second), Render(s, bs)); err == nil {
		t.Fatal("a map outside Dir/maps was accepted")
	}
	if entries, _ := os.ReadDir(s.MapsDir); len(entries) != 0 {
		t.Fatalf("files written outside Dir/maps: %v", entries)
	}
}
