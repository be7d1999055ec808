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
	names []string                 // the service names of the last render, in order
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

// RenderTable returns the config of s and the backends of a table keyed by service name, as
// Render(s, backends) does. It keeps the sections of these backends only: those of routes left out
// are forgotten. The order of names is
// kept from one render to the next: a table that differs from the last one in a few routes is not
// sorted again, nor copied into a list unless the frame must be written again.
func (r *Renderer) RenderTable(s Settings, table map[string]route.Backend) []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	if s.CheckInterval == 0 {
		s.CheckInterval = AutoCheckInterval(CheckedInstances(maps.Values(table)))
	}
	r.prepareLocked(s)
	return r.renderLocked(s, table, r.orderLocked(table))
}

// prepareLocked forgets the sections when the server-wide users or the check interval, which they
// depend on, change.
func (r *Renderer) prepareLocked(s Settings) {
	if r.texts == nil || !slices.Equal(s.Users, r.frame.settings.Users) || s.CheckInterval != r.frame.settings.CheckInterval {
		r.texts, r.names = map[string]*sectionsText{}, nil
	}
}

// orderLocked returns the names of table in order: those of the last render that table holds, in
// their order, merged with the others, sorted. The names of the last render are the keys of texts.
func (r *Renderer) orderLocked(table map[string]route.Backend) []string {
	kept := make([]string, 0, len(table))
	for _, name := range r.names {
		if _, ok := table[name]; ok {
			kept = append(kept, name)
		}
	}
	if len(kept) == len(table) {
		return kept
	}
	var added []string
	for name := range table {
		if _, ok := r.texts[name]; !ok {
			added = append(added, name)
		}
	}
	if len(kept)+len(added) != len(table) {
		return slices.Sorted(maps.Keys(table)) // texts and names disagree: never so far
	}
	slices.Sort(added)
	merged := make([]string, 0, len(table))
	for len(kept) > 0 && len(added) > 0 {
		if kept[0] < added[0] {
			merged, kept = append(merged, kept[0]), kept[1:]
		} else {
			merged, added = append(merged, added[0]), added[1:]
		}
	}
	return append(append(merged, kept...), added...)
}

// renderLocked renders the backends of table in the order of names.
func (r *Renderer) renderLocked(s Settings, table map[string]route.Backend, names []string) []byte {
	n := len(names)
	f := r.frame
	frameHolds := f.valid && reflect.DeepEqual(s, f.settings) && n == len(f.routes)
	r.gen++
	texts, frontends := make([]*sectionsText, n), make([]string, n)
	size := 0
	for i, name := range names {
		be := table[name]
		// The frame holds while every route and frontend template is the one it was written for.
		frameHolds = frameHolds && be.FrontendSnippet == f.frontends[i] && be.Route.Equal(f.routes[i].be.Route)
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
	if len(r.texts) > n {
		for name, t := range r.texts {
			if t.gen != r.gen {
				delete(r.texts, name)
			}
		}
	}
	if !frameHolds {
		bs := make([]route.Backend, n)
		for i, name := range names {
			bs[i] = table[name]
		}
		f.head, f.tail = renderFrame(s, bs)
	}

	cfg := make([]byte, 0, size+len(f.head)+len(f.tail))
	cfg = append(cfg, f.head...)
	for _, t := range texts {
		cfg = append(cfg, t.text...)
	}
	cfg = append(cfg, f.tail...)
	r.frame = frame{settings: cloneSettings(s), routes: texts, frontends: frontends, head: f.head, tail: f.tail, valid: true}
	r.names = names
	return cfg
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
