package server

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/haproxy"
)

// Once the plain routes go through a map, a new one is answered as soon as reconfigure returns,
// with no reload: a spare backend serves it. A reload follows by itself and gives it its own
// backend, counted in /metrics, and the route keeps answering throughout.
func TestRouteAddedToAMapIsServedWithoutAReload(t *testing.T) {
	e := newEnv(t)
	p := e.startProxy("docker-flow")
	for i := 0; i < haproxy.MinMapRoutes; i++ {
		name := fmt.Sprintf("svc-%d", i)
		e.backend(name, name)
		p.reconfigure(t, "serviceName="+name+"&servicePath=/"+name)
	}
	if cfg := p.config(t); !strings.Contains(cfg, "map_beg(") || spares(cfg) != haproxy.DefaultSpareBackends {
		t.Fatalf("%d plain routes are not served through a map with %d spare backends:\n%s", haproxy.MinMapRoutes, haproxy.DefaultSpareBackends, cfg)
	}
	e.backend("books-ms", "books-1")
	e.backend("books-ms", "books-2")
	before := p.scrape(t)

	p.reconfigure(t, "serviceName=books-ms&servicePath=/api/v1/books")
	if code, body := get(t, p.http+"/api/v1/books", nil); code != http.StatusOK || !strings.HasPrefix(body, "books-") {
		t.Fatalf("right after reconfigure: %d %q", code, body)
	}
	after := p.scrape(t)
	moved(t, "a route added to the map", before, after, map[string]float64{mReloadsOK: 0, mRuntimeOK: 1, mReconfOK: 1})
	if seen := backendsReached(t, p.http+"/api/v1/books", 8); len(seen) != 2 {
		t.Fatalf("the new route reached %v, want both instances", seen)
	}
	cfg := p.config(t)
	if !strings.Contains(cfg, "backend books-ms-be\n") || !strings.Contains(cfg, "#    /api/v1/books books-ms-be") {
		t.Fatalf("/config does not show the new route's backend and map entry:\n%s", cfg)
	}

	// The reload that gives the route its own backend (2 s after the last route added).
	eventually(t, 15*time.Second, "a reload after the route added", func() bool {
		return p.scrape(t).get(t, mReloadsOK) == after.get(t, mReloadsOK)+1
	})
	if seen := backendsReached(t, p.http+"/api/v1/books", 8); len(seen) != 2 {
		t.Fatalf("after the reload the route reached %v, want both instances", seen)
	}
	if code, _ := get(t, p.http+"/svc-3", nil); code != http.StatusOK {
		t.Fatalf("/svc-3 after the reload: %d", code)
	}
}

// spares counts the spare backends of a config.
func spares(cfg string) int {
	return strings.Count(cfg, "\nbackend "+haproxy.SparePrefix)
}

// The number of spare backends is the number of new routes in a row served without a reload: the
// next one waits for the reload that frees them, which serves it before reconfigure answers. With
// none, every new route is served by a reload.
func TestSpareBackendsSetting(t *testing.T) {
	for _, tc := range []struct {
		name   string
		spares int // Config.SpareBackends
		want   int // spares in the config
	}{
		{"two", 2, 2},
		{"none", -1, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			p := e.startProxyWith("docker-flow", func(c *Config) { c.SpareBackends = tc.spares })
			for i := 0; i < haproxy.MinMapRoutes; i++ {
				name := fmt.Sprintf("svc-%d", i)
				e.backend(name, name)
				p.reconfigure(t, "serviceName="+name+"&servicePath=/"+name)
			}
			if cfg := p.config(t); !strings.Contains(cfg, "map_beg(") || spares(cfg) != tc.want {
				t.Fatalf("the map's config has %d spare backends, want %d:\n%s", spares(cfg), tc.want, cfg)
			}
			for i := 1; i <= tc.want+1; i++ {
				name := fmt.Sprintf("new-%d", i)
				e.backend(name, name)
				before := p.scrape(t)
				p.reconfigure(t, "serviceName="+name+"&servicePath=/"+name)
				if code, body := get(t, p.http+"/"+name, nil); code != http.StatusOK || !strings.HasPrefix(body, name+" ") {
					t.Fatalf("new route %d right after reconfigure: %d %q", i, code, body)
				}
				reloads := 0.0
				if i > tc.want {
					reloads = 1 // no spare left: the reload serves it
				}
				moved(t, fmt.Sprintf("new route %d of %d spares", i, tc.want), before, p.scrape(t),
					map[string]float64{mReloadsOK: reloads, mReconfOK: 1})
			}
		})
	}
}
