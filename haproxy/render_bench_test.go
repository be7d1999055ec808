package haproxy

import (
	"slices"
	"strings"
	"testing"

	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

// BenchmarkRender10000 renders the config of 10,000 plain routes of three instances each.
func BenchmarkRender10000(b *testing.B) {
	s := testSettings()
	s.MapsDir = "/run/dfp/maps"
	bs := plainRoutes(10000)
	for i := range bs {
		bs[i].Instances = []route.Instance{{Address: "10.0.0.1", Port: 1000 + i}, {Address: "10.0.0.2", Port: 1000 + i}, {Address: "10.0.0.3", Port: 1000 + i}}
	}
	// In the order of names, as the controller hands them over.
	slices.SortFunc(bs, func(a, b route.Backend) int { return strings.Compare(a.Route.ServiceName, b.Route.ServiceName) })
	for b.Loop() {
		Render(s, bs)
	}
}
