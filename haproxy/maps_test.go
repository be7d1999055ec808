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
	// Each route gets a backend of its own that answers its name.
	for i := range bs {
		port := startBackend(t, bs[i].Route.ServiceName)
		bs[i].Instances = []route.Instance{{Address: "127.0.0.1", Port: port}}
	}
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
	answers := func(mapsDir string) (map[string]string, string) {
		front := testenv.FreePort(t)
		s := testSettings()
		s.HTTPPort, s.StatsSocket = front, ""
		p := startProcess(t, procConfig(testenv.FreePort(t), startBackend(t, "start"), 0))
		s.MapsDir = filepath.Join(p.dir, "maps")
		if mapsDir == "" {
			s.MapsDir = ""
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
	withACLs, aclCfg := answers("")
	withMaps, mapCfg := answers("maps")
	// Two maps: one by host and path, one by path.
	if strings.Contains(aclCfg, "map_beg") || strings.Count(mapCfg, "map_beg(") != 4 ||
		strings.Count(mapCfg, "var(txn.dfp_host_path),map_beg(") != 2 || strings.Contains(mapCfg, "acl domain_h0") {
		t.Fatalf("the configs do not route as intended:\n%s\n---\n%s", aclCfg, mapCfg)
	}
	distinct := map[string]bool{}
	for k, want := range withACLs {
		distinct[want] = true
		if got := withMaps[k]; got != want {
			t.Errorf("%s: through maps %q, through acl lines %q", k, got, want)
		}
	}
	for k, want := range map[string]string{
		"other.example.com/pq/long/x":                         "x",  // the first match, not the longest
		"b.example.com/shop/cart":                             "h3", // h3's /s comes first on b.example.com
		"c.example.com/shop/cart":                             "h2",
		"A.Example.COM:8080/api/v1/long/deeper/x":             "h1",
		"A.Example.COM:8080/api":                              "h0",
		"a.example.com.evil/api":                              "h4",
		"a.example.com/zzz":                                   "domain",
		"www.example.org/wild-card-path-is-the-longest-one/x": "wild",
		"d.example.com:80/d6":                                 "h6",
	} {
		if got := withMaps[k]; got != "200 "+want {
			t.Errorf("%s through maps: %q, want route %s", k, got, want)
		}
	}
	if got := withMaps["example.com/api"]; strings.HasSuffix(got, " h0") {
		t.Errorf("example.com/api through maps: %q, want no route of a.example.com", got)
	}
	if len(distinct) < len(bs)-1 { // y answers none: x shadows every path of it
		t.Fatalf("the requests reached only %d of %d routes: %v", len(distinct), len(bs), distinct)
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
