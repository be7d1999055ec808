package haproxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"regexp"
	"slices"
	"strings"
	"time"
)

// ErrNeedsReload means a config cannot be served through the runtime API: it differs from the one
// served in more than the servers of existing backends, or HAProxy's state is not known well enough.
// Nothing was changed; Apply (a reload) serves it.
var ErrNeedsReload = errors.New("the change needs a reload")

// ErrBeyondRuntime is the ErrNeedsReload of a config that differs from the one served in more than
// Diff allows: the usual case of a change that only a reload serves.
var ErrBeyondRuntime = fmt.Errorf("%w: more than servers and routes of a map changed", ErrNeedsReload)

const (
	// runtimeCmdTimeout bounds one runtime API command.
	runtimeCmdTimeout = 5 * time.Second
	// delRetryFor bounds how long `del server` is retried while a removed server still has
	// connections (in-flight requests finishing, idle connections being released).
	delRetryFor = 3 * time.Second
)

// Server is one `server <Name> <Addr>[ <Check>]` line of a backend.
type Server struct {
	Name string
	Addr string // host:port, "[v6]:port" for IPv6
	// Check is how HAProxy checks the server's health: "" (it does not), "check" or
	// "check inter <duration>" (checkOptions).
	Check string
}

// ServerChange is what changes in one backend: servers to add and servers to remove.
type ServerChange struct {
	Backend     string
	Add, Remove []Server
}

// Delta is how a config differs from the one served when HAProxy can serve it through the runtime
// API: servers added to and removed from existing backends, routes added to existing maps, each
// with a new backend that a spare backend stands in for until the next reload, and entries removed
// from maps (a route removed, or its paths changed), with the backends no longer used, which stay
// in HAProxy, unused, until the next reload.
type Delta struct {
	Servers []ServerChange
	// Backends are the new backends, with their servers, in the order of the config.
	Backends []ServerChange
	// MapAdds are the entries added to maps, named by the file the served config uses.
	MapAdds []MapEntry
	// MapSets are the entries whose key stays in a map with another backend.
	MapSets []MapEntry
	// MapDels are the entries removed from maps, named by the file the served config uses.
	MapDels []MapEntry
	// MapReplaces are the maps whose entries the runtime API replaces all at once (prepare map,
	// add map to the new version, commit map): those that adding, setting and removing entries one
	// by one would not make the new map (entries in another order, or an entry that must come
	// before others in a map tried in order).
	MapReplaces []MapReplace
	// Removed are the backends of the served config that the new one no longer has.
	Removed []string
	// Renamed maps the new config's map files to the served config's ones they extend.
	Renamed map[string]string
}

// MapEntry is one entry of a map, added, changed or removed.
type MapEntry struct {
	Map, Key, Backend string
}

// MapReplace is a map, named by the file the served config uses, and every entry of its new
// version, in order.
type MapReplace struct {
	Map     string
	Entries []MapEntry
}

// Empty reports whether the configs serve the same.
func (d Delta) Empty() bool {
	return len(d.Servers) == 0 && len(d.Backends) == 0 && len(d.MapAdds) == 0 && len(d.MapSets) == 0 &&
		len(d.MapDels) == 0 && len(d.MapReplaces) == 0 && len(d.Removed) == 0
}

// Diff compares two configs as Render writes them. ok is true when new differs from old only in:
//   - the server lines of backends both have (each `server <name> <addr>[ check[ inter <d>]]`), where no server
//     keeps its name with another address or check, and every added server's address is an IP
//     (HAProxy does not apply default-server settings, such as init-addr, to servers added at run time);
//   - new backends whose body is a spare backend's (SpareBody) and whose servers are such lines, when
//     old has spare backends;
//   - entries of maps added, removed or given another backend, whose keys and backends the
//     runtime API can carry: one by one (MapAdds, MapSets, MapDels) when that gives the new map,
//     whose entries both have come in the same order and, for a map whose entries are tried in
//     order (map_end, map_dir, map_reg), whose entries added at its end answer as in their place
//     (inOrder); else every entry of the map at once (MapReplaces);
//   - backends removed, when no line of new uses them (so only the backends of routes of a map),
//     spare backends aside.
//
// Everything else, blank lines aside, must be equal once a map's new file name is read as its old
// one. Render writes backends and map entries in an order that adding a route keeps, so both configs
// are read side by side; a config in another order is refused. The lists follow the order of new;
// the Delta is empty when the configs serve the same. Diff reads each config once: it takes
// milliseconds on the config of 10,000 routes.
func Diff(old, new []byte) (Delta, bool) {
	o, ok1 := parseConfig(old)
	n, ok2 := parseConfig(new)
	if !ok1 || !ok2 {
		return Delta{}, false
	}
	return diffParsed(&o, &n)
}

// diffParsed is Diff of configs parsed.
func diffParsed(o, n *parsedConfig) (Delta, bool) {
	if len(o.mapOrder) != len(n.mapOrder) {
		return Delta{}, false
	}
	var d Delta
	// Backends side by side: those of old in the same order, new ones in between, removed ones
	// left out. The names of each side are only needed where the two differ.
	var oldNames, newNames map[string]bool
	nameOf := func(b backendPart) string { return b.name }
	isNew := make([]bool, len(n.backends))
	pair := make([]int, len(n.backends)) // index in o.backends
	removed := map[int]bool{}            // index in o.backends
	i := 0
	remove := func() bool {
		name := o.backends[i].name
		if strings.HasPrefix(name, SparePrefix) || lazySet(&newNames, n.backends, nameOf)[name] {
			return false // a spare removed, or the order changed
		}
		removed[i] = true
		d.Removed = append(d.Removed, name)
		i++
		return true
	}
	for j := range n.backends {
		if i < len(o.backends) && o.backends[i].name == n.backends[j].name {
			pair[j] = i
			i++
			continue
		}
		if !lazySet(&oldNames, o.backends, nameOf)[n.backends[j].name] {
			isNew[j] = true
			continue
		}
		// Old's backends up to this one are no longer used.
		for i < len(o.backends) && o.backends[i].name != n.backends[j].name {
			if !remove() {
				return Delta{}, false
			}
		}
		if i == len(o.backends) {
			return Delta{}, false // the order changed
		}
		pair[j] = i
		i++
	}
	for i < len(o.backends) {
		if !remove() {
			return Delta{}, false
		}
	}
	added := 0
	for _, nw := range isNew {
		if nw {
			added++
		}
	}
	if added > 0 && !o.hasSpare {
		return Delta{}, false
	}
	// Maps pair up in the order the config uses them; the entries both have must be in the same
	// order, and the entries added must go to backends that new has.
	renames := map[string]string{}
	for k, nm := range n.mapOrder {
		om := o.mapOrder[k]
		adds, sets, dels, ok := diffEntries(om, o.maps[om], n.maps[nm])
		if match := n.ordered[nm]; ok && (match == "" || inOrder(match, o.maps[om], n.maps[nm], adds, sets, dels)) {
			d.MapAdds, d.MapSets, d.MapDels = append(d.MapAdds, adds...), append(d.MapSets, sets...), append(d.MapDels, dels...)
		} else {
			r, ok := replacement(om, n.maps[nm])
			if !ok {
				return Delta{}, false
			}
			d.MapReplaces = append(d.MapReplaces, r)
		}
		if nm != om {
			renames[nm] = om
		}
	}
	if len(d.Removed) > 0 {
		// No entry that new keeps may lead to a backend it no longer has.
		gone := make(map[string]bool, len(d.Removed))
		for _, name := range d.Removed {
			gone[name] = true
		}
		for _, es := range n.maps {
			for _, e := range es {
				if _, be, _ := strings.Cut(e, " "); gone[be] {
					return Delta{}, false
				}
			}
		}
	}
	if len(d.MapAdds) > 0 || len(d.MapSets) > 0 || len(d.MapReplaces) > 0 {
		names := make(map[string]bool, len(n.backends))
		for _, b := range n.backends {
			names[b.name] = true
		}
		all := append(slices.Clone(d.MapAdds), d.MapSets...)
		for _, r := range d.MapReplaces {
			all = append(all, r.Entries...)
		}
		for _, a := range all {
			if !names[a.Backend] {
				return Delta{}, false
			}
		}
	}
	// The rest must be equal, new and removed backends left out and map files renamed.
	j := 0
	skipRemoved := func() {
		for len(removed) > 0 && j < len(o.lines) && o.lines[j].backend >= 0 && removed[o.lines[j].backend] {
			j++
		}
	}
	for _, l := range n.lines {
		if l.backend >= 0 && isNew[l.backend] {
			continue
		}
		text := l.text
		if len(renames) > 0 && strings.Contains(text, ",map_") {
			for nm, om := range renames {
				text = strings.ReplaceAll(text, nm, om)
			}
		}
		skipRemoved()
		if j >= len(o.lines) || o.lines[j].text != text {
			return Delta{}, false
		}
		j++
	}
	skipRemoved()
	if j != len(o.lines) {
		return Delta{}, false
	}
	for k, nb := range n.backends {
		if isNew[k] {
			if body := n.body(nb); len(body) != 1 || body[0] != SpareBody {
				return Delta{}, false
			}
			add, ok := n.servers(nb)
			if !ok {
				return Delta{}, false
			}
			for _, s := range add {
				if !ipAddr(s.Addr) {
					return Delta{}, false
				}
			}
			d.Backends = append(d.Backends, ServerChange{Backend: nb.name, Add: add})
			continue
		}
		ob := o.backends[pair[k]]
		if slices.Equal(o.all[ob.srvFrom:ob.srvTo], n.all[nb.srvFrom:nb.srvTo]) {
			continue
		}
		before, ok1 := o.servers(ob)
		after, ok2 := n.servers(nb)
		if !ok1 || !ok2 {
			return Delta{}, false
		}
		ch := ServerChange{Backend: nb.name}
		for _, s := range before {
			if _, kept := find(after, s.Name); !kept {
				ch.Remove = append(ch.Remove, s)
			}
		}
		for _, s := range after {
			prev, kept := find(before, s.Name)
			if kept {
				if prev != s {
					return Delta{}, false
				}
				continue
			}
			if !ipAddr(s.Addr) {
				return Delta{}, false
			}
			ch.Add = append(ch.Add, s)
		}
		if len(ch.Add) > 0 || len(ch.Remove) > 0 {
			d.Servers = append(d.Servers, ch)
		}
	}
	if len(renames) > 0 {
		d.Renamed = renames
	}
	return d, true
}

// diffEntries compares the entries ("<key> <backend>") of a map served, named m, with those of its
// new version: the entries added, those whose key stays with another backend (sets), and those
// removed. ok is false when the entries both have are in another order, or when a key cannot be
// sent through the runtime API.
func diffEntries(m string, oe, ne []string) (adds, sets, dels []MapEntry, ok bool) {
	var inOld, inNew map[string]bool // only needed where the two differ
	itself := func(e string) string { return e }
	entry := func(e string) (MapEntry, bool) {
		key, be, ok := strings.Cut(e, " ")
		return MapEntry{Map: m, Key: key, Backend: be}, ok && runtimeKey(key) && !strings.Contains(be, " ")
	}
	i := 0
	for _, e := range ne {
		for i < len(oe) && oe[i] != e && !lazySet(&inNew, ne, itself)[oe[i]] {
			del, ok := entry(oe[i])
			if !ok {
				return nil, nil, nil, false
			}
			dels = append(dels, del)
			i++
		}
		if i < len(oe) && oe[i] == e {
			i++
			continue
		}
		if lazySet(&inOld, oe, itself)[e] {
			return nil, nil, nil, false // the order changed
		}
		add, ok := entry(e)
		if !ok {
			return nil, nil, nil, false
		}
		adds = append(adds, add)
	}
	for ; i < len(oe); i++ {
		if lazySet(&inNew, ne, itself)[oe[i]] {
			return nil, nil, nil, false
		}
		del, ok := entry(oe[i])
		if !ok {
			return nil, nil, nil, false
		}
		dels = append(dels, del)
	}
	if len(adds) > 0 && len(dels) > 0 {
		// A key both removed and added keeps its place in the map with another backend.
		moved := make(map[string]bool, len(dels))
		for _, e := range dels {
			moved[e.Key] = true
		}
		kept := adds[:0:0]
		for _, a := range adds {
			if moved[a.Key] {
				sets = append(sets, a)
				continue
			}
			kept = append(kept, a)
		}
		if len(sets) > 0 {
			set := make(map[string]bool, len(sets))
			for _, e := range sets {
				set[e.Key] = true
			}
			dels = slices.DeleteFunc(dels, func(e MapEntry) bool { return set[e.Key] })
		}
		adds = kept
	}
	return adds, sets, dels, true
}

// replacement is the MapReplace of the map served as m whose new entries are ne; ok is false when
// a key or backend cannot be sent through the runtime API.
func replacement(m string, ne []string) (r MapReplace, ok bool) {
	r = MapReplace{Map: m, Entries: make([]MapEntry, 0, len(ne))}
	for _, e := range ne {
		key, be, ok := strings.Cut(e, " ")
		if !ok || !runtimeKey(key) || !runtimeKey(be) {
			return MapReplace{}, false
		}
		r.Entries = append(r.Entries, MapEntry{Map: m, Key: key, Backend: be})
	}
	return r, true
}

// inOrder reports whether the entries of a map whose entries are tried in order (oe, served) answer
// as ne does once the runtime API has removed dels, set sets in place and added adds at the end,
// as it does: when that makes ne itself, or, for map_end and map_reg, when each entry added that ne
// puts before others shares no request with them (sharesRequests), so that its place among them
// does not matter.
func inOrder(match string, oe, ne []string, adds, sets, dels []MapEntry) bool {
	del := make(map[string]bool, len(dels))
	for _, e := range dels {
		del[e.Key] = true
	}
	set := make(map[string]string, len(sets))
	for _, e := range sets {
		set[e.Key] = e.Backend
	}
	got := make([]string, 0, len(ne))
	for _, e := range oe {
		key, be, _ := strings.Cut(e, " ")
		if del[key] {
			continue
		}
		if b, ok := set[key]; ok {
			be = b
		}
		got = append(got, key+" "+be)
	}
	kept := len(got)
	for _, e := range adds {
		got = append(got, e.Key+" "+e.Backend)
	}
	if slices.Equal(got, ne) {
		return true
	}
	if match != "map_end" && match != "map_reg" || len(got) != len(ne) {
		return false
	}
	added := make(map[string]bool, len(adds))
	for _, e := range got[kept:] {
		added[e] = true
	}
	// The entries kept and the entries added each in the same order in got and ne.
	var keptNE, addedNE []string
	for _, e := range ne {
		if added[e] {
			addedNE = append(addedNE, e)
		} else {
			keptNE = append(keptNE, e)
		}
	}
	if !slices.Equal(keptNE, got[:kept]) || !slices.Equal(addedNE, got[kept:]) {
		return false
	}
	for i, a := range ne {
		if !added[a] {
			continue
		}
		ak, _, _ := strings.Cut(a, " ")
		for _, e := range ne[i+1:] {
			if ek, _, _ := strings.Cut(e, " "); !added[e] && sharesRequests(match, ak, ek) {
				return false
			}
		}
	}
	return true
}

// sharesRequests reports whether a request may match both keys of a map_end or map_reg map: for
// map_end, when one key ends with the other; for map_reg, unless both regular expressions start
// with '^' and literal text of which neither is a prefix of the other (anchoredLiteral), which no
// path can start with at once. Other regular expressions may share requests, as far as it knows.
func sharesRequests(match, a, b string) bool {
	if match == "map_end" {
		return strings.HasSuffix(a, b) || strings.HasSuffix(b, a)
	}
	la, lb := anchoredLiteral(a), anchoredLiteral(b)
	return la == "" || lb == "" || strings.HasPrefix(la, lb) || strings.HasPrefix(lb, la)
}

// anchoredLiteral is the text that every match of a regular expression starts with, when it starts
// with '^': the characters after it up to the first that is syntax or that a quantifier follows
// ("^/api/v[0-9]" -> "/api/v", "^/ab?" -> "/a"). It is empty for an expression that does not start
// with '^' or holds a '|' (whose alternatives need not start with it).
func anchoredLiteral(re string) string {
	rest, ok := strings.CutPrefix(re, "^")
	if !ok || strings.Contains(re, "|") {
		return ""
	}
	const syntax = `\.^$|?*+()[]{}`
	n := 0
	for n < len(rest) && !strings.ContainsRune(syntax, rune(rest[n])) {
		n++
	}
	if n < len(rest) && strings.ContainsRune("?*{", rune(rest[n])) {
		n-- // the quantifier makes the character before it optional
	}
	return rest[:max(n, 0)]
}

// lazySet returns the set of the keys of es, built into *s on the first call.
func lazySet[E any](s *map[string]bool, es []E, key func(E) string) map[string]bool {
	if *s == nil {
		*s = make(map[string]bool, len(es))
		for _, e := range es {
			(*s)[key(e)] = true
		}
	}
	return *s
}

// runtimeKey reports whether a map key can be sent as one word of a runtime API command: no
// spaces, no ';' (which separates commands), no '\' (which escapes) and no '#'.
func runtimeKey(k string) bool {
	return k != "" && !strings.ContainsAny(k, " \t;\\#")
}

func ipAddr(hostport string) bool {
	host, _, err := net.SplitHostPort(hostport)
	return err == nil && net.ParseIP(host) != nil
}

func find(ss []Server, name string) (Server, bool) {
	for _, s := range ss {
		if s.Name == name {
			return s, true
		}
	}
	return Server{}, false
}

// parsedServed is the config served, parsed by the update that made it served: the next update
// compares its config with it without parsing the served one again (at 10,000 routes some 7 ms).
type parsedServed struct {
	cfg []byte // what pc was parsed from; never changed once set
	pc  parsedConfig
}

// of returns the parse of cfg, if cfg is what it was parsed from.
func (ps parsedServed) of(cfg []byte) (parsedConfig, bool) {
	if ps.cfg == nil || !bytes.Equal(ps.cfg, cfg) {
		return parsedConfig{}, false
	}
	return ps.pc, true
}

// parsedConfig is a config split into its lines, its backends (servers and other lines) and its maps.
type parsedConfig struct {
	all      []string            // every line of the config before the map trailer
	lines    []cfgLine           // every non-blank line but the server lines of backends
	backends []backendPart       // in order
	hasSpare bool                // a backend is a spare one
	maps     map[string][]string // map file to its lines
	mapOrder []string            // map files in the order the config uses them
	ordered  map[string]string   // the maps whose entries are tried in order, to their converter (map_end, map_dir, map_reg)
}

type cfgLine struct {
	text    string
	backend int // index in backends of the backend the line is in; -1 outside backends
}

// backendPart is a backend: its header is all[at], its other lines follow, then its server lines
// all[srvFrom:srvTo] (Render writes them last).
type backendPart struct {
	name           string
	at             int
	srvFrom, srvTo int
}

// body is the lines of a backend between its header and its servers, blank ones left out.
func (pc *parsedConfig) body(b backendPart) []string {
	end := b.srvFrom
	if b.srvFrom == b.srvTo {
		end = len(pc.all)
		for i := b.at + 1; i < len(pc.all); i++ {
			if l := pc.all[i]; l != "" && l[0] != ' ' && l[0] != '\t' {
				end = i
				break
			}
		}
	}
	var out []string
	for _, l := range pc.all[b.at+1 : end] {
		if strings.TrimSpace(l) != "" {
			out = append(out, l)
		}
	}
	return out
}

// servers parses the server lines of a backend. ok is false when one is not
// `server <name> <addr>[ check[ inter <d>]]` as Render writes it, or a name repeats.
func (pc *parsedConfig) servers(b backendPart) (out []Server, ok bool) {
	for _, l := range pc.all[b.srvFrom:b.srvTo] {
		name, rest, ok1 := strings.Cut(l[len(serverPrefix):], " ")
		addr, opt, hasOpt := strings.Cut(rest, " ")
		if !ok1 || name == "" || addr == "" || hasOpt && !checkWords.MatchString(opt) || strings.ContainsAny(l, "\t\r") {
			return nil, false
		}
		s := Server{Name: name, Addr: addr, Check: opt}
		if _, dup := find(out, s.Name); dup {
			return nil, false
		}
		out = append(out, s)
	}
	return out, true
}

// checkWords matches what checkOptions writes.
var checkWords = regexp.MustCompile(`^check( inter [1-9][0-9]*(ms|s))?$`)

// serverPrefix starts every server line Render writes.
const serverPrefix = "    server "

// mapUse finds the maps a frontend line looks up, and how: map_beg and map_str look a key up in a
// tree, where an entry's place does not matter; map_end, map_dir and map_reg try the entries in
// order, and the runtime API adds an entry at the end.
var mapUse = regexp.MustCompile(`,(map_(?:beg|str|end|dir|reg))\(([^)]+)\)`)

// parseConfig splits cfg. ok is false when a backend's server lines are not together at its end or
// a backend repeats (servers reads the server lines of the backends that differ). Lines are
// substrings of one copy of cfg.
func parseConfig(cfg []byte) (parsedConfig, bool) {
	pc := parsedConfig{maps: map[string][]string{}}
	text := string(cfg)
	if i := strings.Index(text, "\n"+MapMarker+" "); i >= 0 {
		var cur string
		for _, line := range lines(text[i+1:]) {
			switch {
			case strings.HasPrefix(line, MapMarker+" "):
				cur = line[len(MapMarker)+1:]
				if _, dup := pc.maps[cur]; dup {
					return parsedConfig{}, false
				}
				pc.maps[cur] = []string{}
			case cur != "" && strings.HasPrefix(line, MapEntryPrefix):
				pc.maps[cur] = append(pc.maps[cur], line[len(MapEntryPrefix):])
			default:
				cur = ""
			}
		}
		text = text[:i+1]
	}
	pc.all = lines(text)
	backend := -1
	names := make(map[string]bool, len(pc.all)/4)
	seenMap := map[string]bool{}
	for at, line := range pc.all {
		if line == "" || strings.TrimSpace(line) == "" {
			continue
		}
		indented := line[0] == ' ' || line[0] == '\t'
		switch {
		case !indented:
			backend = -1
			if name, ok := strings.CutPrefix(line, "backend "); ok && !strings.ContainsAny(name, " \t") {
				if names[name] {
					return parsedConfig{}, false
				}
				names[name] = true
				backend = len(pc.backends)
				pc.backends = append(pc.backends, backendPart{name: name, at: at, srvFrom: at + 1, srvTo: at + 1})
				pc.hasSpare = pc.hasSpare || strings.HasPrefix(name, SparePrefix)
			}
		case backend >= 0 && strings.HasPrefix(strings.TrimLeft(line, " \t"), "server "):
			be := &pc.backends[backend]
			if !strings.HasPrefix(line, serverPrefix) {
				return parsedConfig{}, false
			}
			if be.srvTo == be.srvFrom {
				be.srvFrom, be.srvTo = at, at
			}
			if be.srvTo != at {
				return parsedConfig{}, false // not together at the end
			}
			be.srvTo = at + 1
			continue
		case backend >= 0 && pc.backends[backend].srvTo > pc.backends[backend].srvFrom:
			return parsedConfig{}, false // a line after the servers
		}
		if strings.Contains(line, ",map_") {
			for _, m := range mapUse.FindAllStringSubmatch(line, -1) {
				if !seenMap[m[2]] {
					seenMap[m[2]] = true
					pc.mapOrder = append(pc.mapOrder, m[2])
					if m[1] != "map_beg" && m[1] != "map_str" {
						if pc.ordered == nil {
							pc.ordered = map[string]string{}
						}
						pc.ordered[m[2]] = m[1]
					}
				}
			}
		}
		pc.lines = append(pc.lines, cfgLine{text: line, backend: backend})
	}
	return pc, true
}

// lines splits text at newlines (without them).
func lines(text string) []string {
	out := make([]string, 0, strings.Count(text, "\n")+1)
	for len(text) > 0 {
		i := strings.IndexByte(text, '\n')
		if i < 0 {
			out = append(out, text)
			break
		}
		out = append(out, text[:i])
		text = text[i+1:]
	}
	return out
}

// statsSocket returns the path of the config's `stats socket` in its global section ("" if none).
func statsSocket(cfg []byte) string {
	section := ""
	for _, line := range strings.Split(string(cfg), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || strings.HasPrefix(f[0], "#") {
			continue
		}
		if line[0] != ' ' && line[0] != '\t' {
			section = f[0]
			continue
		}
		if section == "global" && len(f) >= 3 && f[0] == "stats" && f[1] == "socket" {
			return strings.TrimPrefix(f[2], "unix@")
		}
	}
	return ""
}

// UpdateServers makes HAProxy serve cfg without a reload, through the runtime API of the stats
// socket that cfg declares (level admin), when cfg differs from the config served as Diff allows:
//   - servers are added, enabled (and their health checks with `check`), and removed (maintenance,
//     then deleted once their connections are gone);
//   - a new route of a map is served from a free spare backend: its servers are added there, then
//     its map entry, pointing to the spare, is added to the map HAProxy loaded. The next reload gives
//     it its own backend; one follows by itself once no route has been added for ConsolidateAfter,
//     and a change that needs more spares than are free is refused (ErrNeedsReload);
//   - a route of a map removed, or its paths changed: its entries are removed from the map (after
//     the entries added), and a backend no longer used stays in HAProxy, unused, until the reload
//     that follows ConsolidateAfter later. A route still served by a spare is removed by a reload.
//
// Otherwise it returns an error wrapping ErrNeedsReload and changes nothing. cfg is validated with
// `haproxy -c` first (a *ConfigError), unless it is the config Vouch was just given. On success
// cfg and its map files are on disk and Config returns it; the reload count does not change. On any
// other error HAProxy may be partly updated: the caller must Apply cfg (a reload), which repairs it.
// A cfg equal to the one served returns nil at once. The Delta says what changed.
func (p *Process) UpdateServers(ctx context.Context, cfg []byte) (Delta, error) {
	if err := acquire(ctx, p.applySem); err != nil {
		return Delta{}, fmt.Errorf("haproxy update servers: %w", err)
	}
	defer release(p.applySem)

	p.mu.Lock()
	old, uncertain, started, in := p.cfg, p.uncertain, p.started, p.cur
	p.mu.Unlock()
	switch {
	case !started:
		return Delta{}, fmt.Errorf("haproxy update servers: %w", errNotStarted)
	case uncertain:
		return Delta{}, fmt.Errorf("haproxy update servers: %w: the config served is not known", ErrNeedsReload)
	case bytes.Equal(old, cfg):
		return Delta{}, nil
	case in == nil || in.exited():
		return Delta{}, fmt.Errorf("haproxy update servers: %w: haproxy is restarting", ErrNeedsReload)
	}
	// The config served was parsed by the update that made it served, if one did.
	p.mu.Lock()
	o, oOK := p.parsed.of(old)
	p.mu.Unlock()
	if !oOK {
		o, oOK = parseConfig(old)
	}
	n, nOK := parseConfig(cfg)
	if !oOK || !nOK {
		return Delta{}, fmt.Errorf("haproxy update servers: %w", ErrBeyondRuntime)
	}
	delta, ok := diffParsed(&o, &n)
	if !ok {
		return Delta{}, fmt.Errorf("haproxy update servers: %w", ErrBeyondRuntime)
	}
	sock := statsSocket(cfg)
	if sock == "" {
		return Delta{}, fmt.Errorf("haproxy update servers: %w: no stats socket", ErrNeedsReload)
	}
	p.mu.Lock()
	free := len(p.ov.free)
	p.mu.Unlock()
	if len(delta.Backends) > free {
		return Delta{}, fmt.Errorf("haproxy update servers: %w: %d new backends, %d spare backends free", ErrNeedsReload, len(delta.Backends), free)
	}
	p.mu.Lock()
	onSpare := slices.ContainsFunc(delta.Removed, func(name string) bool { _, ok := p.ov.backends[name]; return ok })
	p.mu.Unlock()
	if onSpare {
		return Delta{}, fmt.Errorf("haproxy update servers: %w: a route removed is served by a spare backend", ErrNeedsReload)
	}
	if !p.justValidated(cfg) {
		if err := p.Validate(ctx, cfg); err != nil {
			return Delta{}, fmt.Errorf("haproxy update servers: %w", err)
		}
	}

	if err := acquire(ctx, p.runSem); err != nil {
		return Delta{}, fmt.Errorf("haproxy update servers: %w", err)
	}
	defer release(p.runSem)
	p.mu.Lock()
	ov := p.ov.clone() // runSem keeps a restart, which resets it, away
	p.mu.Unlock()
	if in.exited() || len(delta.Backends) > len(ov.free) {
		return Delta{}, fmt.Errorf("haproxy update servers: %w: haproxy exited", ErrNeedsReload)
	}
	t0 := time.Now()
	changes := delta.Servers
	for _, be := range delta.Backends {
		spare := ov.free[0]
		ov.free = ov.free[1:]
		ov.backends[be.Backend] = spare
		changes = append(changes, be)
	}
	for i := range changes {
		changes[i].Backend = ov.backend(changes[i].Backend)
	}
	added, removed, err := p.changeServers(ctx, sock, changes)
	if err == nil {
		err = p.changeMaps(ctx, sock, ov, "add map", delta.MapAdds)
	}
	if err == nil {
		err = p.changeMaps(ctx, sock, ov, "set map", delta.MapSets)
	}
	if err == nil {
		err = p.changeMaps(ctx, sock, ov, "del map", delta.MapDels)
	}
	if err == nil {
		err = replaceMaps(ctx, sock, ov, delta.MapReplaces)
	}
	if err == nil {
		for newName, oldName := range delta.Renamed {
			ov.maps[newName] = ov.mapFile(oldName)
		}
		err = p.writeFile(p.cfgPath, cfg)
	}
	if err != nil {
		// HAProxy may serve neither config: never skip the next Apply as "already served".
		p.mu.Lock()
		p.uncertain = true
		p.mu.Unlock()
		return Delta{}, fmt.Errorf("haproxy update servers: %w", err)
	}
	ov.unused += len(delta.Removed)
	if ov.inUse() && ov.since.IsZero() {
		ov.since = time.Now()
	}
	p.mu.Lock()
	p.cfg = bytes.Clone(cfg)
	p.ov = ov
	p.parsed = parsedServed{cfg: p.cfg, pc: n}
	p.mu.Unlock()
	p.log.Info("haproxy changed without a reload", "servers_added", added, "servers_removed", removed,
		"routes_added", len(delta.MapAdds), "map_entries_changed", len(delta.MapSets), "map_entries_removed", len(delta.MapDels),
		"maps_replaced", len(delta.MapReplaces),
		"backends_unused", ov.unused, "spares_free", len(ov.free), "duration", time.Since(t0).Round(time.Millisecond))
	if len(delta.Backends) > 0 || len(delta.Removed) > 0 {
		p.consolidateLater()
	}
	return delta, nil
}

// changeMaps sends verb ("add map", "set map" or "del map") for each entry to the map HAProxy
// loaded under the entry's map name: the entry's key, and for add and set the backend that serves
// its route now.
func (p *Process) changeMaps(ctx context.Context, sock string, ov overlay, verb string, es []MapEntry) error {
	for _, e := range es {
		cmd := verb + " " + ov.mapFile(e.Map) + " " + e.Key
		if verb != "del map" {
			cmd += " " + ov.backend(e.Backend)
		}
		if err := runtimeCmd(ctx, sock, cmd, ""); err != nil {
			return err
		}
	}
	return nil
}

// mapPayloadMax bounds the entries sent in one `add map` command: HAProxy reads a command and its
// payload into one buffer (tune.bufsize, 16 KB by default) and drops the connection when they do
// not fit.
const mapPayloadMax = 8 << 10

// versionCreated is HAProxy's answer to `prepare map`.
var versionCreated = regexp.MustCompile(`^New version created: (\d+)$`)

// replaceMaps replaces every entry of each map, atomically for the requests: `prepare map` makes a
// new version of the map that no lookup sees, `add map @<version>` fills it in order, a payload
// of entries at a time, and `commit map` makes it the one that lookups see, in one step (the
// entries of the older version go at once, and HAProxy's cache of lookups is dropped).
func replaceMaps(ctx context.Context, sock string, ov overlay, rs []MapReplace) error {
	for _, r := range rs {
		file := ov.mapFile(r.Map)
		out, err := runtimeAnswer(ctx, sock, "prepare map "+file)
		if err != nil {
			return err
		}
		m := versionCreated.FindStringSubmatch(out)
		if m == nil {
			return fmt.Errorf("haproxy cli %q: %s", "prepare map "+file, out)
		}
		head := "add map @" + m[1] + " " + file + " <<\n"
		var b strings.Builder
		send := func() error {
			if b.Len() == 0 {
				return nil
			}
			// The line break that query adds ends the payload with an empty line.
			cctx, cancel := context.WithTimeout(ctx, runtimeCmdTimeout)
			defer cancel()
			out, err := query(cctx, sock, head+b.String(), dialRetry)
			switch {
			case err != nil:
			case out == "": // not even the empty line that ends every answer
				err = errors.New("HAProxy closed the connection without an answer (a payload larger than tune.bufsize?)")
			case strings.TrimSpace(out) != "":
				err = errors.New(strings.TrimSpace(out))
			}
			if err != nil {
				return fmt.Errorf("haproxy cli \"add map @%s %s\" (%d bytes of entries) on %s: %w", m[1], file, b.Len(), sock, err)
			}
			b.Reset()
			return nil
		}
		for _, e := range r.Entries {
			line := e.Key + " " + ov.backend(e.Backend) + "\n"
			if len(head)+b.Len()+len(line) >= mapPayloadMax {
				if err := send(); err != nil {
					return err
				}
			}
			b.WriteString(line)
		}
		if err := send(); err != nil {
			return err
		}
		if err := runtimeCmd(ctx, sock, "commit map @"+m[1]+" "+file, ""); err != nil {
			return err
		}
	}
	return nil
}

// overlay is how the HAProxy running differs from the config served after routes were added or
// removed through the runtime API: a map file of the config may be one HAProxy loaded under an older
// name, a backend may be served by a spare, and HAProxy may hold backends the config no longer has.
// A reload or restart loads the config, and so starts a new overlay.
type overlay struct {
	maps     map[string]string // map file of the config -> the one HAProxy loaded
	backends map[string]string // backend of the config -> the spare that serves it
	free     []string          // spares that serve nothing
	unused   int               // backends HAProxy holds that the config no longer has
	since    time.Time         // when HAProxy first ran other than the config as written
}

// newOverlay is the overlay of a config HAProxy just loaded: every spare is free.
func newOverlay(cfg []byte) overlay {
	ov := overlay{maps: map[string]string{}, backends: map[string]string{}}
	for _, line := range strings.Split(string(cfg), "\n") {
		if name, ok := strings.CutPrefix(line, "backend "+SparePrefix); ok {
			ov.free = append(ov.free, SparePrefix+strings.TrimSpace(name))
		}
	}
	return ov
}

func (ov overlay) clone() overlay {
	c := overlay{maps: maps.Clone(ov.maps), backends: maps.Clone(ov.backends), free: slices.Clone(ov.free),
		unused: ov.unused, since: ov.since}
	if c.maps == nil {
		c.maps = map[string]string{}
	}
	if c.backends == nil {
		c.backends = map[string]string{}
	}
	return c
}

// inUse reports whether HAProxy runs other than the config as written: a spare serves a route, or
// it holds backends the config no longer has.
func (ov overlay) inUse() bool { return len(ov.backends) > 0 || ov.unused > 0 }

func (ov overlay) backend(name string) string {
	if s, ok := ov.backends[name]; ok {
		return s
	}
	return name
}

func (ov overlay) mapFile(name string) string {
	if m, ok := ov.maps[name]; ok {
		return m
	}
	return name
}

// SetReloadHook sets a function told of the reloads the Process does on its own (the one that
// follows routes added through the runtime API): how long each took and how it went.
func (p *Process) SetReloadHook(f func(time.Duration, error)) {
	p.mu.Lock()
	p.reloadHook = f
	p.mu.Unlock()
}

// Settled reports whether HAProxy runs its config as written: no route added through the runtime
// API is served by a spare backend, waiting for the reload that gives it its own, and no backend
// of a route removed through it waits for the reload that drops it.
func (p *Process) Settled() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return !p.ov.inUse()
}

// consolidateLater schedules the reload that serves the config as written (the routes served by
// spares get their own backends, the backends of removed routes go) ConsolidateAfter after the
// last route added or removed, and no later than consolidateMaxDelay ConsolidateAfters after the
// first: a steady stream of changes does not put it off for ever.
func (p *Process) consolidateLater() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stopped {
		return
	}
	delay := p.consolidateAfter
	if !p.ov.since.IsZero() {
		latest := p.ov.since.Add(consolidateMaxDelay * p.consolidateAfter)
		delay = max(min(delay, time.Until(latest)), 0)
	}
	if p.consolidate == nil {
		p.consolidate = time.AfterFunc(delay, p.consolidateNow)
		return
	}
	p.consolidate.Reset(delay)
}

func (p *Process) consolidateNow() {
	ctx, cancel := context.WithTimeout(p.life, 2*p.reloadTimeout)
	defer cancel()
	if err := acquire(ctx, p.applySem); err != nil {
		return
	}
	defer release(p.applySem)
	p.mu.Lock()
	due := p.started && !p.stopped && !p.uncertain && p.ov.inUse()
	cfg := p.cfg
	p.mu.Unlock()
	if !due {
		return
	}
	t0 := time.Now()
	// The config serves already (each change that made it was checked before HAProxy served it):
	// no `haproxy -c` again, which at 10,000 routes would keep changes waiting 0.1–0.5 s longer.
	// HAProxy's master parses it all the same, and a config it refused would leave the one served
	// serving, spares and all.
	err := p.applyHeld(ctx, cfg, true, true)
	p.mu.Lock()
	hook := p.reloadHook
	p.mu.Unlock()
	if hook != nil && p.life.Err() == nil {
		hook(time.Since(t0), err)
	}
	if err != nil {
		if p.life.Err() == nil {
			// The spares keep serving their routes; the next reload tries again.
			p.log.Error("haproxy: the reload that serves the config as written (routes added and removed through the runtime API) failed", "error", err)
		}
		return
	}
	p.log.Info("haproxy reloaded: the routes added through the runtime API have their own backends, and those removed are gone")
}

// changeServers adds every new server first (so a backend whose servers are replaced never goes
// empty), then puts the removed ones in maintenance (no new requests; in-flight ones finish) and
// deletes them once their connections are gone.
func (p *Process) changeServers(ctx context.Context, sock string, changes []ServerChange) (added, removed int, err error) {
	waits := 0
	for _, ch := range changes {
		for _, s := range ch.Add {
			id := ch.Backend + "/" + s.Name
			cmd := "add server " + id + " " + s.Addr
			if s.Check != "" {
				cmd += " " + s.Check
			}
			if err := runtimeCmd(ctx, sock, cmd, "New server registered."); err != nil {
				return added, removed, err
			}
			added++
			if s.Check != "" {
				if err := runtimeCmd(ctx, sock, "enable health "+id, ""); err != nil {
					return added, removed, err
				}
				// Consul already reports the instance healthy: serve it now rather than after
				// HAProxy's first check (up to its interval later). A failing check still takes it out.
				if err := runtimeCmd(ctx, sock, "set server "+id+" health up", ""); err != nil {
					return added, removed, err
				}
			}
			if err := runtimeCmd(ctx, sock, "enable server "+id, ""); err != nil {
				return added, removed, err
			}
		}
	}
	for _, ch := range changes {
		for _, s := range ch.Remove {
			if err := runtimeCmd(ctx, sock, "set server "+ch.Backend+"/"+s.Name+" state maint", ""); err != nil {
				return added, removed, err
			}
		}
	}
	giveUp := time.Now().Add(delRetryFor)
	for _, ch := range changes {
		for _, s := range ch.Remove {
			cmd := "del server " + ch.Backend + "/" + s.Name
			pause := 10 * time.Millisecond
			for {
				err := runtimeCmd(ctx, sock, cmd, "Server deleted.")
				if err == nil {
					break
				}
				if !strings.Contains(err.Error(), "still has connections") || time.Now().After(giveUp) {
					return added, removed, err
				}
				waits++
				if err := sleepCtx(ctx, pause); err != nil {
					return added, removed, err
				}
				pause = min(2*pause, 200*time.Millisecond)
			}
			removed++
		}
	}
	if waits > 0 {
		p.log.Info("haproxy: removed servers finished their connections", "waits", waits)
	}
	return added, removed, nil
}

// runtimeCmd sends cmd to the runtime API and checks that HAProxy answers want.
func runtimeCmd(ctx context.Context, sock, cmd, want string) error {
	got, err := runtimeAnswer(ctx, sock, cmd)
	if err == nil && got != want {
		err = fmt.Errorf("haproxy cli %q: %s", cmd, got)
	}
	return err
}

// runtimeAnswer sends cmd to the runtime API, within runtimeCmdTimeout, and returns HAProxy's
// answer without the blank lines around it.
func runtimeAnswer(ctx context.Context, sock, cmd string) (string, error) {
	cctx, cancel := context.WithTimeout(ctx, runtimeCmdTimeout)
	defer cancel()
	out, err := Command(cctx, sock, cmd)
	return strings.TrimSpace(out), err
}
