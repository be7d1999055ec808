package haproxy

import (
	"bytes"
	"maps"
	"reflect"
	"slices"
	"sync"

	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

// Renderer renders configs as Render does, byte for byte, and writes again only what changed
// since its last render:
//   - each route's sections (its userlist and backends, writeSections: at 10,000 routes of three
//     instances, 50,000 of the config's 60,000 lines) are kept from one render to the next and
//     written again only for the routes whose route, instances or backend template changed;
//   - the frame (the global, defaults and frontend sections, the spare backends and the maps) is
//     kept while the settings, every route and the frontend templates stay the same: a change of
//     instances only, the usual change, writes one route's sections and copies the rest.
//
// A Renderer is safe for concurrent use; its zero value is ready.
type Renderer struct {
	mu    sync.Mutex
	texts map[string]*sectionsText // by service name
	gen   uint64                   // the number of the render
	frame frame
}

// sectionsText is what writeSections wrote for a route, and a copy of what it wrote it from. It
// does not change once made, but for gen: the last render that used it.
type sectionsText struct {
	be   route.Backend
	text []byte
	gen  uint64
}

// frame is what renderFrame wrote, and what it wrote it from.
type frame struct {
	settings   Settings
	routes     []*sectionsText // in the order of names: their routes are the copies the frame was written from
	frontends  []string        // the routes' frontend templates, rendered
	head, tail []byte
	valid      bool
}

// Render returns the config of s and backends, as Render(s, backends). It keeps the sections of
// these backends only: those of routes left out are forgotten.
func (r *Renderer) Render(s Settings, backends []route.Backend) []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	bs := sortedBackends(backends)
	settingsSame := r.frame.valid && reflect.DeepEqual(s, r.frame.settings)
	if r.texts == nil || !slices.Equal(s.Users, r.frame.settings.Users) {
		r.texts = map[string]*sectionsText{} // the sections depend on the server-wide users
	}
	f := r.frame
	if !settingsSame || !f.holds(bs) {
		f.head, f.tail = renderFrame(s, bs)
	}

	r.gen++
	texts, frontends := make([]*sectionsText, len(bs)), make([]string, len(bs))
	size := len(f.head) + len(f.tail)
	for i, be := range bs {
		name := be.Route.ServiceName
		t, ok := r.texts[name]
		if !ok || !sameSections(t.be, be) {
			var sb bytes.Buffer
			writeSections(writer(&sb), s, be)
			t = &sectionsText{be: cloneBackend(be), text: sb.Bytes()}
			r.texts[name] = t
		}
		t.gen = r.gen
		texts[i], frontends[i] = t, be.FrontendSnippet
		size += len(t.text)
	}
	if len(r.texts) > len(bs) {
		for name, t := range r.texts {
			if t.gen != r.gen {
				delete(r.texts, name)
			}
		}
	}

	cfg := make([]byte, 0, size)
	cfg = append(cfg, f.head...)
	for _, t := range texts {
		cfg = append(cfg, t.text...)
	}
	cfg = append(cfg, f.tail...)
	r.frame = frame{settings: cloneSettings(s), routes: texts, frontends: frontends, head: f.head, tail: f.tail, valid: true}
	return cfg
}

// holds reports whether the frame was written for the routes of bs (in the order of names) and
// their frontend templates.
func (f frame) holds(bs []route.Backend) bool {
	if len(bs) != len(f.routes) {
		return false
	}
	for i := range bs {
		if bs[i].FrontendSnippet != f.frontends[i] || !bs[i].Route.Equal(f.routes[i].be.Route) {
			return false
		}
	}
	return true
}

// sameSections reports whether writeSections writes the same for a and b (with the same users).
func sameSections(a, b route.Backend) bool {
	return a.BackendSnippet == b.BackendSnippet && slices.Equal(a.Instances, b.Instances) &&
		maps.EqualFunc(a.PortInstances, b.PortInstances, slices.Equal) && a.Route.Equal(b.Route)
}

// cloneBackend copies a backend down to its slices: the copy a Renderer keeps cannot change if the
// caller changes what it handed over.
func cloneBackend(be route.Backend) route.Backend {
	be.Route = be.Route.Clone()
	be.Instances = slices.Clone(be.Instances)
	if be.PortInstances != nil {
		pi := make(map[int][]route.Instance, len(be.PortInstances))
		for port, in := range be.PortInstances {
			pi[port] = slices.Clone(in)
		}
		be.PortInstances = pi
	}
	be.FrontendSnippet = "" // not part of the sections
	return be
}

// cloneSettings copies settings down to their slices and pointers.
func cloneSettings(s Settings) Settings {
	s.Users = slices.Clone(s.Users)
	if s.StatsUser != nil {
		u := *s.StatsUser
		s.StatsUser = &u
	}
	return s
}
