package haproxy

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

// routes10000 are 10,000 plain routes of three instances each, in the order of names, as the
// controller hands them over.
func routes10000() []route.Backend {
	bs := plainRoutes(10000)
	for i := range bs {
		bs[i].Instances = []route.Instance{{Address: "10.0.0.1", Port: 1000 + i}, {Address: "10.0.0.2", Port: 1000 + i}, {Address: "10.0.0.3", Port: 1000 + i}}
	}
	slices.SortFunc(bs, func(a, b route.Backend) int { return strings.Compare(a.Route.ServiceName, b.Route.ServiceName) })
	return bs
}

// BenchmarkRender10000 renders the config of 10,000 plain routes of three instances each, whole.
func BenchmarkRender10000(b *testing.B) {
	s := testSettings()
	s.MapsDir = "/run/dfp/maps"
	bs := routes10000()
	for b.Loop() {
		Render(s, bs)
	}
}

// BenchmarkRendererTableChange10000 renders a table of 10,000 routes through a Renderer after a
// change of one route's instances, as the controller does after each change: only that route's
// backend is written again.
func BenchmarkRendererTableChange10000(b *testing.B) {
	s, table, r := rendered10000()
	i := 0
	for b.Loop() {
		name := fmt.Sprintf("svc-%d", i%len(table))
		be := table[name]
		be.Instances = append(slices.Clone(be.Instances[:2]), route.Instance{Address: "10.0.0.4", Port: i})
		table[name] = be
		r.RenderTable(s, table)
		i++
	}
}

// BenchmarkRendererTableNewRoute10000 renders through a Renderer a table of 10,000 routes to which
// each render adds a route (the one before is left out): the frontend and the maps are written
// again, the backends of the other routes are not.
func BenchmarkRendererTableNewRoute10000(b *testing.B) {
	s, table, r := rendered10000()
	i := 0
	for b.Loop() {
		name := fmt.Sprintf("new-%d", i)
		table[name] = newRoute(name, []route.Instance{{Address: "10.0.1.1", Port: 80}}, "/"+name)
		r.RenderTable(s, table)
		delete(table, name)
		i++
	}
}

// rendered10000 is routes10000 as a table, rendered once through a Renderer.
func rendered10000() (Settings, map[string]route.Backend, *Renderer) {
	s := testSettings()
	s.MapsDir = "/run/dfp/maps"
	table := map[string]route.Backend{}
	for _, be := range routes10000() {
		table[be.Route.ServiceName] = be
	}
	r := &Renderer{}
	r.RenderTable(s, table)
	return s, table, r
}
