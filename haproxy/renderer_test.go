package haproxy

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

// A Renderer writes what Render writes, whatever the renders before it: the golden cases one after
// the other (settings change between them: server-wide users, maps), then each case again with one
// route changed at a time in every way a route's sections can change.
func TestRendererWritesWhatRenderWrites(t *testing.T) {
	var r Renderer
	step := 0
	check := func(s Settings, bs []route.Backend, what string) {
		t.Helper()
		step++
		got, want := r.RenderTable(s, tableOf(bs)), Render(s, bs)
		if string(got) != string(want) {
			t.Fatalf("step %d (%s): the Renderer wrote\n%s\nwhere Render writes\n%s", step, what, got, want)
		}
	}
	cases := renderCases()
	names := slices.Sorted(func(yield func(string) bool) {
		for name := range cases {
			if !yield(name) {
				return
			}
		}
	})
	for _, name := range names {
		check(caseSettings(name, testSettings()), cases[name], name)
	}
	for _, name := range names {
		s := caseSettings(name, testSettings())
		bs := slices.Clone(cases[name])
		check(s, bs, name)
		for i := range bs {
			orig := bs[i]
			for what, edit := range routeEdits() {
				bs[i] = cloneBackend(orig)
				bs[i].FrontendSnippet = orig.FrontendSnippet
				edit(&bs[i])
				check(s, bs, name+": "+orig.Route.ServiceName+": "+what)
				bs[i] = orig
				check(s, bs, name+": "+orig.Route.ServiceName+" back")
			}
			// Left out, then back.
			check(s, slices.Delete(slices.Clone(bs), i, i+1), name+": without "+orig.Route.ServiceName)
			check(s, bs, name+": "+orig.Route.ServiceName+" back")
		}
		// The server-wide users change, the routes stay.
		s.Users = []route.User{{Name: "eve", Password: "x"}}
		check(s, bs, name+": other server-wide users")
	}
}

// routeEdits are the ways a route's userlist or backends can change.
func routeEdits() map[string]func(*route.Backend) {
	return map[string]func(*route.Backend){
		"an instance more": func(b *route.Backend) {
			b.Instances = append(b.Instances, route.Instance{Address: "10.9.9.9", Port: 9999})
		},
		"no instances": func(b *route.Backend) { b.Instances = nil },
		"a port's instance": func(b *route.Backend) {
			b.PortInstances = map[int][]route.Instance{9000: {{Address: "10.8.8.8", Port: 8888}}}
		},
		"skip check":     func(b *route.Backend) { b.Route.SkipCheck = !b.Route.SkipCheck },
		"timeout server": func(b *route.Backend) { b.Route.TimeoutServer++ },
		"a header": func(b *route.Backend) {
			b.Route.AddHeader = append(b.Route.AddHeader, route.Header{Name: "X-New", Value: "v"})
		},
		"own users":  func(b *route.Backend) { b.Route.Users = []route.User{{Name: "zed", Password: "pw"}} },
		"https only": func(b *route.Backend) { b.Route.HTTPSOnly = !b.Route.HTTPSOnly },
		"backend template": func(b *route.Backend) {
			b.BackendSnippet = "backend " + b.Route.BackendName() + "\n    balance first\n"
		},
	}
}

// The Renderer keeps copies: a caller that changes in place what it handed over does not change
// what the next render writes for it.
func TestRendererKeepsCopies(t *testing.T) {
	var r Renderer
	s := testSettings()
	bs := plainRoutes(3)
	r.RenderTable(s, tableOf(bs))
	bs[1].Instances[0].Port = 81
	bs[2].Route.ServicePath[0] = "/moved"
	if got, want := r.RenderTable(s, tableOf(bs)), Render(s, bs); string(got) != string(want) {
		t.Fatalf("after a change in place the Renderer wrote\n%s\nwhere Render writes\n%s", got, want)
	}
}

// Random tables of random routes, each render after a few changes: add, remove, change instances.
func TestRendererFollowsRandomChanges(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 7))
	s := testSettings()
	s.MapsDir = "/run/dfp/maps"
	s.SpareBackends = 2
	var r Renderer
	table := map[string]route.Backend{}
	for step := 0; step < 300; step++ {
		for range 1 + rng.IntN(4) {
			name := fmt.Sprintf("svc-%d", rng.IntN(40))
			switch rng.IntN(3) {
			case 0:
				delete(table, name)
			case 1:
				b := newRoute(name, nil, fmt.Sprintf("/%s/%d", name, rng.IntN(3)))
				b.Route.PathType = []route.PathType{route.PathBeg, route.PathBeg, route.PathDir}[rng.IntN(3)]
				table[name] = b
			default:
				if b, ok := table[name]; ok {
					b.Instances = nil
					for i := range rng.IntN(4) {
						b.Instances = append(b.Instances, route.Instance{Address: fmt.Sprintf("10.0.%d.%d", i, rng.IntN(3)), Port: 80})
					}
					table[name] = b
				}
			}
		}
		var bs []route.Backend
		for _, b := range table {
			bs = append(bs, b)
		}
		if got, want := r.RenderTable(s, table), Render(s, bs); string(got) != string(want) {
			t.Fatalf("step %d: the Renderer wrote\n%s\nwhere Render writes\n%s", step, got, want)
		}
	}
}

// tableOf keys backends by service name, as the controller's table.
func tableOf(bs []route.Backend) map[string]route.Backend {
	table := make(map[string]route.Backend, len(bs))
	for _, b := range bs {
		table[b.Route.ServiceName] = b
	}
	return table
}
