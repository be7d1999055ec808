package haproxy

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"iter"
	"net"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

// Settings are the proxy-wide parts of haproxy.cfg, fixed at start.
type Settings struct {
	// BindAddress is the address the frontends listen on; empty means every address.
	BindAddress string
	HTTPPort    int
	// HTTPSPort is served only when CertsDir holds certificates (HasCerts).
	HTTPSPort int
	CertsDir  string
	HasCerts  bool
	// StatsSocket is the runtime API socket (level admin), used to change servers without a reload.
	StatsSocket string
	// Threads is HAProxy's nbthread: 0 leaves HAProxy's default, a thread per CPU it may run on.
	Threads int
	// HardStopAfter bounds how long an old worker keeps serving its connections after a reload.
	HardStopAfter  time.Duration
	ConnectTimeout time.Duration
	ClientTimeout  time.Duration
	ServerTimeout  time.Duration
	// Users (USERS) protects every route that lists no users of its own with HTTP basic auth.
	Users []route.User
	// StatsPort, when set, serves HAProxy's stats page on / and its Prometheus exporter on /metrics,
	// both behind StatsUser (there is no default password: the server refuses a port without one).
	StatsPort int
	StatsUser *route.User
	// MapsDir, when set, is the folder of the map files that route the plain routes (path_beg, no
	// aclName; by path, or by host and path when they have domains): one map lookup stands for
	// thousands of acl and use_backend lines, which HAProxy parses on every reload. The maps are
	// written at the end of the config as comments ("#map <file>" and its "#    <key> <backend>"
	// lines), and Process writes the files.
	MapsDir string
	// SpareBackends is how many empty backends a config with maps carries (SparePrefix1, ...): a
	// route added to a map is served at once from one of them, through the runtime API, until the
	// next reload gives it its own backend (Process.UpdateServers). 0 = none.
	SpareBackends int
	// CheckInterval is the time between two health checks of a server (`check inter`), for the
	// routes without skipCheck. 0 is automatic (AutoCheckInterval): HAProxy's default of 2 s,
	// lengthened in steps as the checked instances grow. HAProxy checks every server on its own:
	// at 10,000 routes of three instances, 15,000 connections a second at 2 s.
	CheckInterval time.Duration
	// RetryEmptyResponse has HAProxy send a GET, HEAD or OPTIONS request again, to another
	// instance, when the instance it was sent to closed the connection without answering (an
	// instance stopping). It makes HAProxy copy every request (some 8% of its CPU per request).
	RetryEmptyResponse bool
}

// DefaultCheckInterval is HAProxy's interval between two health checks of a server.
const DefaultCheckInterval = 2 * time.Second

// MaxAutoChecksPerSecond bounds the health checks a second of the automatic interval: on two
// cores, 7,500 checks a second took HAProxy a quarter of one.
const MaxAutoChecksPerSecond = 2000

// AutoCheckInterval is the interval of Settings.CheckInterval 0 for a table of checked instances:
// 2 s (HAProxy's default), doubled until HAProxy checks at most MaxAutoChecksPerSecond a second
// (4 s above 4,000 instances, 8 s above 8,000, 16 s above 16,000, ...). The steps keep it the same
// while a table grows or shrinks a little: a change of interval changes every server line, which
// takes a reload.
func AutoCheckInterval(checked int) time.Duration {
	d := DefaultCheckInterval
	for float64(checked)/d.Seconds() > MaxAutoChecksPerSecond {
		d *= 2
	}
	return d
}

// CheckedInstances is the number of instances of the routes without skipCheck.
func CheckedInstances(backends iter.Seq[route.Backend]) int {
	n := 0
	for b := range backends {
		if !b.Route.SkipCheck {
			n += b.InstanceCount()
		}
	}
	return n
}

// DefaultSpareBackends is how many spare backends a config with maps carries unless told otherwise:
// that many new plain routes in a row are served without waiting for a reload (at 10,000 routes a
// reload takes a second or more). An empty backend costs HAProxy a few kilobytes.
const DefaultSpareBackends = 64

// MaxThreads is the most threads HAProxy 2.6 runs in one thread group (Settings.Threads).
const MaxThreads = 64

// SparePrefix names the spare backends. A route's backend always ends in "-be" or "-be-<suffix>",
// so no route can take one of these names.
const SparePrefix = "dfp-spare-"

// SpareBody is the body of a spare backend, which is also the body of a plain HTTP route's backend:
// only such a route can be served from a spare.
const SpareBody = "    balance roundrobin"

// DefaultSettings are the settings the server starts with before flags override them.
func DefaultSettings() Settings {
	return Settings{
		HTTPPort:       80,
		HTTPSPort:      443,
		HardStopAfter:  60 * time.Second,
		ConnectTimeout: 5 * time.Second,
		ClientTimeout:  30 * time.Second,
		ServerTimeout:  30 * time.Second,
		SpareBackends:  DefaultSpareBackends,
	}
}

// Render turns the routes and their instances into haproxy.cfg. It is deterministic: the same input
// gives the same bytes, whatever the order of backends and instances. Every route must have passed
// route.Validate; instance addresses must be IPs or host names (the catalog client checks them).
func Render(s Settings, backends []route.Backend) []byte {
	if s.CheckInterval == 0 {
		s.CheckInterval = AutoCheckInterval(CheckedInstances(slices.Values(backends)))
	}
	bs := sortedBackends(backends)
	head, tail := renderFrame(s, bs)
	var b bytes.Buffer
	b.Grow(len(head) + len(tail) + 200*len(bs))
	b.Write(head)
	w := writer(&b)
	for _, be := range bs {
		writeSections(w, s, be)
	}
	b.Write(tail)
	return b.Bytes()
}

// writer returns the function the renderer writes lines with: a format and its arguments, or a
// line without arguments as it is (no line of the renderer's holds '%' then).
func writer(b *bytes.Buffer) func(string, ...any) {
	return func(format string, args ...any) {
		if len(args) == 0 {
			b.WriteString(format)
		} else {
			fmt.Fprintf(b, format, args...)
		}
		b.WriteByte('\n')
	}
}

// renderFrame writes what comes before and after the routes' sections (writeSections): head is the
// global and defaults sections and the frontends, tail the spare backends and the maps. Both depend
// on s, the routes (bs in the order of names) and their frontend templates only, not on instances.
func renderFrame(s Settings, bs []route.Backend) (head, tail []byte) {
	var b bytes.Buffer
	b.Grow(4096 + 64*len(bs))
	w := writer(&b)

	w("# Generated by docker-flow-proxy: every reconfigure rewrites this file.")
	w("global")
	// No Lua and no feature of HAProxy's own HTTP client is used: without this, HAProxy loads the
	// system's CA store at every start, `haproxy -c` and reload (some 20 ms each).
	w("    httpclient.ssl.verify none")
	if s.StatsSocket != "" {
		w("    stats socket %s mode 600 level admin expose-fd listeners", s.StatsSocket)
	}
	if s.HardStopAfter > 0 {
		w("    hard-stop-after %s", duration(s.HardStopAfter))
	}
	if s.Threads > 0 {
		w("    nbthread %d", s.Threads)
	}
	w("")
	w("defaults")
	w("    mode http")
	w("    option idle-close-on-response")
	w("    option forwardfor")
	w("    option dontlognull")
	w("    timeout connect %s", duration(s.ConnectTimeout))
	w("    timeout client %s", duration(s.ClientTimeout))
	w("    timeout server %s", duration(s.ServerTimeout))
	w("    timeout http-request 10s")
	w("    timeout http-keep-alive 15s")
	w("    timeout queue 30s")
	// A connection an instance refuses (it stopped, and the catalog does not say so yet; HAProxy's
	// checks have not seen it) is tried again at once on another instance: the request is not lost.
	// Requests sent on a connection that the instance then closed unanswered are retried only with
	// RetryEmptyResponse (idempotent methods only): it copies every request.
	w("    retries 3")
	w("    option redispatch 1")
	if s.RetryEmptyResponse {
		w("    retry-on conn-failure empty-response")
	}
	// An instance registered by host name that does not resolve yet must not fail the whole config.
	w("    default-server init-addr last,libc,none")
	w("")
	if s.StatsPort > 0 && s.StatsUser != nil {
		// Names with ':' cannot clash with a service's userlist or backend.
		w("userlist dfp:stats")
		w("    user %s insecure-password '%s'", s.StatsUser.Name, s.StatsUser.Password)
		w("")
		w("frontend stats")
		w("    bind %s", bindAddr(s.BindAddress, s.StatsPort))
		w("    http-request auth realm stats if !{ http_auth(dfp:stats) }")
		w("    http-request use-service prometheus-exporter if { path /metrics }")
		w("    stats enable")
		w("    stats uri /")
		w("    stats refresh 10s")
		w("")
	}
	w("frontend services")
	w("    bind %s", bindAddr(s.BindAddress, s.HTTPPort))
	if s.HasCerts && s.CertsDir != "" {
		w("    bind %s ssl crt %s", bindAddr(s.BindAddress, s.HTTPSPort), s.CertsDir)
	}
	if s.RetryEmptyResponse {
		// A request that may have changed something before the instance closed its connection is
		// never sent twice (METH_GET is GET and HEAD).
		w("    http-request disable-l7-retry if !METH_GET !METH_OPTIONS")
	}
	order := routingOrder(bs)
	mapped := mappedDests(s, order) // by position in order
	if slices.Contains(mapped, byHostPath) {
		// The key of a map by host and path: the Host header without its port, in lower case (the
		// acl lines match it case-insensitively), then the path.
		w("    http-request set-var(txn.%s) path", pathVar)
		w("    http-request set-var(txn.%s) req.hdr(host),field(1,:),lower,concat(,txn.%s)", hostPathVar, pathVar)
	}
	// The destinations that keep acl lines: few where maps route the plain routes.
	withACLs := map[destKey]bool{}
	for i, rd := range order {
		if mapped[i] == notMapped && rd.be.FrontendSnippet == "" {
			withACLs[destKey{rd.be.Route.ServiceName, rd.dest.Index}] = true
		}
	}
	for _, be := range bs {
		if be.FrontendSnippet != "" {
			continue // the route's template stands for its ACLs and use_backend lines
		}
		for _, d := range be.Route.Destinations() {
			if d.Mode() == route.ModeHTTP && withACLs[destKey{be.Route.ServiceName, d.Index}] {
				writeACLs(w, be.Route, d)
			}
		}
	}
	var maps []mapFile
	for i := 0; i < len(order); i++ {
		rd := order[i]
		if rd.be.FrontendSnippet != "" {
			writeSnippet(w, rd.be.FrontendSnippet, "    ")
			continue
		}
		if kind := mapped[i]; kind != notMapped {
			// A run of routes in routing order becomes one map or two, which answer what its
			// use_backend lines would (newMapFiles).
			j := i
			for j < len(order) && mapped[j] == kind {
				j++
			}
			key := "path"
			if kind == byHostPath {
				key = "var(txn." + hostPathVar + ")"
			}
			for _, m := range newMapFiles(s.MapsDir, kind, order[i:j]) {
				maps = append(maps, m)
				w("    use_backend %%[%s,%s(%s)] if { %s,%s(%s) -m found }", key, m.match, m.path, key, m.match, m.path)
			}
			i = j - 1
			continue
		}
		writeUseBackends(w, order[i:i+1])
	}
	writeTCPFrontends(w, s, bs)
	head = bytes.Clone(b.Bytes())
	b.Reset()
	if len(maps) > 0 && s.StatsSocket != "" {
		for i := 1; i <= s.SpareBackends; i++ {
			w("")
			w("backend %s%d", SparePrefix, i)
			w("%s", SpareBody)
		}
	}
	for _, m := range maps {
		w("")
		w("%s %s", MapMarker, m.path)
		for _, e := range m.entries {
			b.WriteString(MapEntryPrefix + e[0] + " " + e[1] + "\n")
		}
	}
	return head, b.Bytes()
}

// writeSections writes what a route adds to the config after the frontends: its userlist, if it
// has users, and its backends, each after a blank line. What it writes depends on the route, its
// instances, its backend template, s.Users and s.CheckInterval only (Renderer relies on that).
func writeSections(w func(string, ...any), s Settings, be route.Backend) {
	users := usersOf(s, be.Route)
	if len(users) > 0 {
		w("")
		writeUserlist(w, be.Route, users)
	}
	written := map[string]bool{}
	for _, d := range be.Route.Destinations() {
		name := backendName(be.Route, d)
		if written[name] {
			continue
		}
		written[name] = true
		w("")
		if name == be.Route.BackendName() && be.BackendSnippet != "" {
			writeSnippet(w, be.BackendSnippet, "")
			continue
		}
		writeBackend(w, s, be, d, len(users) > 0)
	}
}

// MinMapRoutes is the shortest run of routes of one kind that maps stand for: a few routes stay
// acl and use_backend lines, which users read more easily in /config.
const MinMapRoutes = 8

func writeUseBackends(w func(string, ...any), rds []routedDest) {
	for _, rd := range rds {
		r, d := rd.be.Route, rd.dest
		cond := "url_" + aclID(r, d)
		if len(d.ServiceDomain) > 0 {
			cond += " domain_" + aclID(r, d)
		}
		w("    use_backend %s if %s", backendName(r, d), cond)
	}
}

// The map files of a config, written at its end as comments: a MapMarker line names a file, and
// the MapEntryPrefix lines after it are its lines.
const (
	MapMarker      = "#map"
	MapEntryPrefix = "#    "
)

type mapFile struct {
	path    string
	match   string      // the converter that looks the key up: map_beg, map_str, map_end, map_dir or map_reg
	entries [][2]string // key (a path pattern, or a domain and a path), backend
}

// newMapFiles makes the maps of a run of routes of one kind, each route's paths in routing order
// (by host and path: each of its domains in lower case followed by each path). The frontend looks
// the request up in them in the order returned; they answer the backend that the run's use_backend
// lines would, the first route that matches:
//   - path_end, path_dir and path_reg (byPathEnd, byPathDir, byPathReg): HAProxy looks the entries of
//     such a map up in the order of the file and answers the first that matches, so one map holds
//     the run in routing order. A path that an earlier route has already is left out, so that each
//     key is once in the map (the runtime API changes entries by key).
//   - path_beg and path (byPath, byHostPath): a map of exact paths (map_str) and, after it, one of
//     prefixes (map_beg), both trees. map_beg answers the longest entry that is a prefix of the key;
//     the use_backend lines, the first route that matches. The two agree once every prefix that an
//     earlier prefix is a prefix of is left out: such an entry never wins as a use_backend line
//     either (every request it matches, the earlier one matches first), and of the entries left,
//     those that match one request are prefixes of one another, the longest first. An exact path
//     is left out when an earlier prefix is a prefix of it or an earlier route has it: so a request
//     that an exact entry kept matches is matched by no earlier entry, and one that a left-out
//     exact path would match is answered by the map of prefixes (the earlier prefix that shadows
//     it), or by the earlier exact entry.
//
// A domain holds no '/' and a path starts with one, so a host-and-path entry is a prefix of a
// request's key only when the hosts are equal and the entry's path is a prefix of the request's,
// and equals it only when both are equal. A map's name holds a hash of its converter and content:
// a map that changes is a new file, and so a new config.
func newMapFiles(dir string, kind mapKind, run []routedDest) []mapFile {
	tree := kind == byPath || kind == byHostPath
	var exact, other mapFile
	exact.match, other.match = "map_str", mapMatch[kind]
	prefixes, keys := map[string]bool{}, map[string]bool{} // keys: the exact paths of a tree, else every key
	for _, rd := range run {
		be := backendName(rd.be.Route, rd.dest)
		isExact := tree && rd.dest.PathType == route.Path
		add := func(key string) {
			switch {
			case tree && shadowed(prefixes, key): // an earlier prefix matches first
			case !isExact && tree:
				prefixes[key] = true
				other.entries = append(other.entries, [2]string{key, be})
			case keys[key]: // an earlier route has the key
			case isExact:
				keys[key] = true
				exact.entries = append(exact.entries, [2]string{key, be})
			default:
				keys[key] = true
				other.entries = append(other.entries, [2]string{key, be})
			}
		}
		for _, p := range rd.dest.ServicePath {
			if kind != byHostPath {
				add(p)
				continue
			}
			for _, d := range rd.dest.ServiceDomain {
				add(strings.ToLower(d) + p)
			}
		}
	}
	var out []mapFile
	for _, m := range []*mapFile{&exact, &other} {
		if len(m.entries) == 0 {
			continue
		}
		h := sha256.New()
		h.Write([]byte(m.match + "\n"))
		for _, e := range m.entries {
			h.Write([]byte(e[0] + " " + e[1] + "\n"))
		}
		m.path = filepath.Join(dir, "routes-"+hex.EncodeToString(h.Sum(nil))[:16]+".map")
		out = append(out, *m)
	}
	return out
}

// shadowed reports whether one of the paths is a prefix of p (or p itself).
func shadowed(paths map[string]bool, p string) bool {
	for i := 1; i <= len(p); i++ {
		if paths[p[:i]] {
			return true
		}
	}
	return false
}

// destKey names a destination of a route.
type destKey struct {
	service string
	index   int
}

// mapKind tells whether and how a destination is routed through a map.
type mapKind uint8

const (
	notMapped  mapKind = iota
	byPath             // path_beg and path without domains: the keys are paths
	byHostPath         // path_beg and path with domains: the keys are a domain followed by a path
	byPathEnd          // path_end without domains: the keys are path endings
	byPathDir          // path_dir without domains: the keys are directories
	byPathReg          // path_reg without domains: the keys are regular expressions
)

// mapMatch is the converter of each kind's map (byPath and byHostPath also have one of exact paths).
var mapMatch = map[mapKind]string{byPath: "map_beg", byHostPath: "map_beg", byPathEnd: "map_end",
	byPathDir: "map_dir", byPathReg: "map_reg"}

// The variables of the services frontend that hold the key of the maps by host and path.
const (
	pathVar     = "dfp_path"
	hostPathVar = "dfp_host_path"
)

// mappedDests tells, by position in order, the destinations routed through maps: those in runs of
// at least MinMapRoutes routes of one kind in routing order.
func mappedDests(s Settings, order []routedDest) []mapKind {
	out := make([]mapKind, len(order))
	for i := 0; i < len(order); {
		kind := mapKindOf(s, order[i])
		j := i
		for kind != notMapped && j < len(order) && mapKindOf(s, order[j]) == kind {
			j++
		}
		if j-i >= MinMapRoutes {
			for k := i; k < j; k++ {
				out[k] = kind
			}
		}
		i = max(j, i+1)
	}
	return out
}

// mapKindOf tells how a destination is routed through a map, when maps are on and it is an HTTP
// route without a frontend template: by path (any path type) without domains; by host and path
// (path_beg and path) with domains matched exactly (not with serviceDomainMatchAll). Other routes
// with domains keep their acl lines.
func mapKindOf(s Settings, rd routedDest) mapKind {
	r, d := rd.be.Route, rd.dest
	if s.MapsDir == "" || rd.be.FrontendSnippet != "" || d.Mode() != route.ModeHTTP {
		return notMapped
	}
	switch d.PathType {
	case route.PathBeg, route.Path:
		switch {
		case len(d.ServiceDomain) == 0:
			return byPath
		case r.ServiceDomainMatchAll:
			return notMapped
		}
		return byHostPath
	}
	if len(d.ServiceDomain) > 0 {
		return notMapped
	}
	switch d.PathType {
	case route.PathEnd:
		return byPathEnd
	case route.PathDir:
		return byPathDir
	case route.PathReg:
		return byPathReg
	}
	return notMapped
}

// writeSnippet writes a rendered custom template, line by line, without the blank lines at its ends.
func writeSnippet(w func(string, ...any), snippet, indent string) {
	for _, line := range strings.Split(strings.Trim(snippet, "\n"), "\n") {
		line = strings.TrimRight(line, " \t\r")
		if strings.TrimSpace(line) == "" {
			continue
		}
		if indent != "" {
			line = indent + strings.TrimLeft(line, " \t")
		}
		w("%s", line)
	}
}

// backendName names the HAProxy backend of a destination: <service>-be for HTTP destinations of the
// service itself, <service>-be-<port> for HTTP destinations of one of its ports, and
// <service>-be-<mode>-<index> for TCP and SNI destinations.
func backendName(r route.Route, d route.Dest) string {
	switch {
	case d.Mode() != route.ModeHTTP:
		return r.BackendName() + "-" + string(d.Mode()) + "-" + strconv.Itoa(d.Index)
	case d.Port != 0:
		return r.BackendName() + "-" + strconv.Itoa(d.Port)
	}
	return r.BackendName()
}

// tcpDest is a TCP or SNI destination with its route, for the frontend of its source port.
type tcpDest struct {
	be   route.Backend
	dest route.Dest
}

// TCPPorts returns the TCP and SNI destinations by source port, routes in name order.
func tcpPorts(bs []route.Backend) (ports []int, dests map[int][]tcpDest) {
	dests = map[int][]tcpDest{}
	for _, be := range bs {
		for _, d := range be.Route.Destinations() {
			if d.Mode() == route.ModeHTTP {
				continue
			}
			if _, ok := dests[d.SrcPort]; !ok {
				ports = append(ports, d.SrcPort)
			}
			dests[d.SrcPort] = append(dests[d.SrcPort], tcpDest{be, d})
		}
	}
	sort.Ints(ports)
	return ports, dests
}

// CheckPorts reports a TCP or SNI destination whose source port HAProxy cannot give it: a port the
// proxy serves HTTP, HTTPS or stats on, a TCP port that another destination takes too, or an SNI port
// shared with a TCP destination. Two SNI destinations may share a port when their names differ. The
// error is a *route.ParamError naming the later destination's srcPort.
func CheckPorts(s Settings, backends []route.Backend) error {
	// Only routes with a TCP or SNI destination take ports: the others are not sorted.
	var withPorts []route.Backend
	for _, b := range backends {
		if slices.ContainsFunc(b.Route.Destinations(), func(d route.Dest) bool { return d.Mode() != route.ModeHTTP }) {
			withPorts = append(withPorts, b)
		}
	}
	bs := sortedBackends(withPorts)
	reserved := map[int]string{s.HTTPPort: "the proxy's HTTP port", s.HTTPSPort: "the proxy's HTTPS port"}
	if s.StatsPort > 0 {
		reserved[s.StatsPort] = "the proxy's stats port"
	}
	ports, dests := tcpPorts(bs)
	for _, p := range ports {
		list := dests[p]
		for i, td := range list {
			param := route.ParamSrcPort
			if td.dest.Index > 0 {
				param += "." + strconv.Itoa(td.dest.Index)
			}
			if what, ok := reserved[p]; ok && p != 0 {
				return &route.ParamError{Param: param, Reason: fmt.Sprintf("%d is %s", p, what)}
			}
			if i == 0 {
				continue
			}
			first := list[0]
			if td.dest.Mode() == route.ModeTCP || first.dest.Mode() == route.ModeTCP {
				return &route.ParamError{Param: param, Reason: fmt.Sprintf("port %d is taken by service %s (reqMode %s)",
					p, first.be.Route.ServiceName, first.dest.Mode())}
			}
			for _, other := range list[:i] {
				for _, name := range td.dest.ServiceDomain {
					if slices.Contains(other.dest.ServiceDomain, name) {
						return &route.ParamError{Param: param, Reason: fmt.Sprintf("name %s on port %d is taken by service %s",
							name, p, other.be.Route.ServiceName)}
					}
				}
			}
		}
	}
	return nil
}

// writeTCPFrontends writes one frontend per source port of the TCP and SNI destinations. A TCP port
// passes every connection to its one destination; an SNI port reads the TLS hello (it does not
// decrypt) and passes the connection to the destination that lists the name the client asks for.
func writeTCPFrontends(w func(string, ...any), s Settings, bs []route.Backend) {
	ports, dests := tcpPorts(bs)
	for _, p := range ports {
		list := dests[p]
		w("")
		w("frontend tcp_%d", p)
		w("    mode tcp")
		w("    option tcplog")
		w("    bind %s", bindAddr(s.BindAddress, p))
		first := list[0]
		if first.dest.Mode() == route.ModeTCP {
			w("    default_backend %s", backendName(first.be.Route, first.dest))
			continue
		}
		w("    tcp-request inspect-delay 5s")
		w("    tcp-request content accept if { req.ssl_hello_type 1 }")
		for _, td := range list {
			if td.dest.Mode() != route.ModeSNI {
				continue // CheckPorts refuses a TCP destination on an SNI port
			}
			r, d := td.be.Route, td.dest
			id := "sni_" + aclID(r, d)
			for _, chunk := range chunks(d.ServiceDomain, maxPatternsPerLine) {
				w("    acl %s req.ssl_sni -i -- %s", id, strings.Join(chunk, " "))
			}
			if r.ServiceDomainMatchAll {
				for _, chunk := range chunks(dotted(d.ServiceDomain), maxPatternsPerLine) {
					w("    acl %s req.ssl_sni -i -m end -- %s", id, strings.Join(chunk, " "))
				}
			}
			w("    use_backend %s if %s", backendName(r, d), id)
		}
	}
}

func dotted(domains []string) []string {
	out := make([]string, len(domains))
	for i, d := range domains {
		out[i] = "." + d
	}
	return out
}

func sortedBackends(backends []route.Backend) []route.Backend {
	byName := func(a, b route.Backend) int { return strings.Compare(a.Route.ServiceName, b.Route.ServiceName) }
	if slices.IsSortedFunc(backends, byName) {
		return backends // the controller's order: Render does not change its input
	}
	idx := make([]int, len(backends))
	for i := range idx {
		idx[i] = i
	}
	sort.Slice(idx, func(i, j int) bool {
		return backends[idx[i]].Route.ServiceName < backends[idx[j]].Route.ServiceName
	})
	bs := make([]route.Backend, len(backends))
	for i, k := range idx {
		bs[i] = backends[k]
	}
	return bs
}

// aclID names a route's ACLs: the service name, and the aclName after a ':' (a character no
// service name has, so two routes never share an ACL).
// Destinations after the first add their index after a '.'.
func aclID(r route.Route, d route.Dest) string {
	id := r.ServiceName
	if r.ACLName != "" {
		id += ":" + r.ACLName
	}
	if d.Index > 0 {
		id += "." + strconv.Itoa(d.Index)
	}
	return id
}

// usersOf returns the users who may use a route: its own, or else the server-wide ones.
func usersOf(s Settings, r route.Route) []route.User {
	if len(r.Users) > 0 {
		return r.Users
	}
	return s.Users
}

func userlistName(r route.Route) string { return r.ServiceName + "-users" }

// writeUserlist writes the route's users. Passwords are single-quoted: HAProxy reads nothing inside
// single quotes, and a crypt hash is full of '$'.
func writeUserlist(w func(string, ...any), r route.Route, users []route.User) {
	w("userlist %s", userlistName(r))
	for _, u := range users {
		kind := "insecure-password"
		if u.Hashed() {
			kind = "password"
		}
		w("    user %s %s '%s'", u.Name, kind, u.Password)
	}
}

// maxPatternsPerLine keeps each acl line far below HAProxy's 64 words per line.
const maxPatternsPerLine = 32

func writeACLs(w func(string, ...any), r route.Route, d route.Dest) {
	// Lines with the same ACL name are ORed. "--" ends the flags: a pattern cannot be read as one.
	id := aclID(r, d)
	paths := d.ServicePath
	if d.PathType == route.PathReg {
		// Regexes may end with '$'; single quotes keep HAProxy from reading it.
		paths = make([]string, len(d.ServicePath))
		for i, p := range d.ServicePath {
			paths[i] = "'" + p + "'"
		}
	}
	for _, chunk := range chunks(paths, maxPatternsPerLine) {
		w("    acl url_%s %s -- %s", id, d.PathType, strings.Join(chunk, " "))
	}
	// The Host header without its port, matched exactly and case-insensitively; with
	// ServiceDomainMatchAll also every name that ends with "."+domain.
	for _, chunk := range chunks(d.ServiceDomain, maxPatternsPerLine) {
		w("    acl domain_%s req.hdr(host),field(1,:) -i -- %s", id, strings.Join(chunk, " "))
	}
	if r.ServiceDomainMatchAll {
		for _, chunk := range chunks(dotted(d.ServiceDomain), maxPatternsPerLine) {
			w("    acl domain_%s req.hdr(host),field(1,:) -i -m end -- %s", id, strings.Join(chunk, " "))
		}
	}
}

// routedDest is an HTTP destination of a route, in the frontend's routing order.
type routedDest struct {
	be   *route.Backend
	dest route.Dest
}

// routingOrder puts the HTTP destinations in the order HAProxy tries them (it uses the first
// use_backend that matches): routes with an aclName first, in aclName order; then the most specific:
// destinations restricted to domains before the others, then longer paths before shorter ones (so
// /api does not shadow /api/v1/books); then by name and index. A route with a frontend template
// comes once, where its first destination would.
func routingOrder(bs []route.Backend) []routedDest {
	// The sort moves small keys; the destinations follow their pos.
	type key struct {
		acl, name    string
		longest, idx int
		domain       bool
		pos          int
	}
	var all []routedDest
	keys := make([]key, 0, len(bs))
	for i := range bs {
		be := &bs[i]
		for _, d := range be.Route.Destinations() {
			if d.Mode() != route.ModeHTTP {
				continue
			}
			n := 0
			for _, p := range d.ServicePath {
				n = max(n, len(p))
			}
			keys = append(keys, key{acl: be.Route.ACLName, name: be.Route.ServiceName, longest: n, idx: d.Index,
				domain: len(d.ServiceDomain) > 0, pos: len(all)})
			all = append(all, routedDest{be, d})
		}
	}
	// Names and indexes tell every two destinations apart: the order is total.
	slices.SortFunc(keys, func(a, b key) int {
		if (a.acl != "") != (b.acl != "") {
			if a.acl != "" {
				return -1
			}
			return 1
		}
		if c := strings.Compare(a.acl, b.acl); c != 0 {
			return c
		}
		if a.domain != b.domain {
			if a.domain {
				return -1
			}
			return 1
		}
		if a.longest != b.longest {
			return b.longest - a.longest
		}
		if c := strings.Compare(a.name, b.name); c != 0 {
			return c
		}
		return a.idx - b.idx
	})
	out := make([]routedDest, len(keys))
	for i, k := range keys {
		out[i] = all[k.pos]
	}
	seen := map[string]bool{}
	kept := out[:0]
	for _, rd := range out {
		if rd.be.FrontendSnippet != "" {
			if seen[rd.be.Route.ServiceName] {
				continue
			}
			seen[rd.be.Route.ServiceName] = true
		}
		kept = append(kept, rd)
	}
	return kept
}

func writeBackend(w func(string, ...any), s Settings, be route.Backend, d route.Dest, auth bool) {
	r := be.Route
	w("backend %s", backendName(r, d))
	if d.Mode() != route.ModeHTTP {
		w("    mode tcp")
	}
	w("    balance roundrobin")
	if r.TimeoutServer > 0 {
		w("    timeout server %ds", r.TimeoutServer)
	}
	if r.TimeoutTunnel > 0 {
		w("    timeout tunnel %ds", r.TimeoutTunnel)
	}
	if d.Mode() != route.ModeHTTP {
		writeServers(w, s, r, be.InstancesFor(d))
		return
	}
	// Redirects first: credentials are asked for only over https. Behind a TLS-terminating load
	// balancer every connection is plain, so X-Forwarded-Proto decides instead of the connection.
	switch {
	case r.RedirectWhenHTTPProto:
		w("    http-request redirect scheme https code 301 if { req.hdr(x-forwarded-proto) -i http }")
	case r.HTTPSOnly:
		w("    http-request redirect scheme https code 301 if !{ ssl_fc }")
	}
	if auth {
		w("    http-request auth realm %s if !{ http_auth(%s) }", r.ServiceName, userlistName(r))
	}
	if r.XForwardedProto {
		w("    http-request set-header X-Forwarded-Proto https if { ssl_fc }")
		w("    http-request set-header X-Forwarded-Proto http if !{ ssl_fc }")
	}
	// Header values are log-format strings: validation keeps '%' out, single quotes keep the rest literal.
	for _, h := range r.AddHeader {
		w("    http-request add-header %s '%s'", h.Name, h.Value)
	}
	for _, h := range r.SetHeader {
		w("    http-request set-header %s '%s'", h.Name, h.Value)
	}
	if r.OutboundHostname != "" {
		w("    http-request set-header Host '%s'", r.OutboundHostname)
	}
	if r.ReqPathSearch != "" {
		regex, format := pathRewrite(r.ReqPathSearch, r.ReqPathReplace)
		w("    http-request replace-path '%s' '%s'", regex, format)
	}
	writeServers(w, s, r, be.InstancesFor(d))
}

func writeServers(w func(string, ...any), s Settings, r route.Route, instances []route.Instance) {
	check := ""
	if !r.SkipCheck {
		check = " " + checkOptions(s)
	}
	for _, inst := range SortedInstances(instances) {
		w("    server " + ServerName(inst) + " " + inst.HostPort() + check)
	}
}

// pathRewrite turns a substitution (the first match of search becomes replace, as the original's
// regsub) into replace-path's terms, which replace the whole path: the regex captures what comes
// before the match (\1), the match (\2, so search's own groups move up by 2) and what comes after
// (the last group). The format is a log-format string: a literal '%' is written '%%'.
func pathRewrite(search, replace string) (regex, format string) {
	groups := 0
	if re, err := regexp.Compile(search); err == nil {
		groups = re.NumSubexp()
	}
	shifted := backReference.ReplaceAllStringFunc(replace, func(ref string) string {
		return `\` + strconv.Itoa(int(ref[1]-'0')+2)
	})
	regex = "^(.*?)(" + search + ")(.*)$"
	format = `\1` + strings.ReplaceAll(shifted, "%", "%%") + `\` + strconv.Itoa(groups+3)
	return regex, format
}

var backReference = regexp.MustCompile(`\\[0-9]`)

// SortedInstances orders instances by address and port and drops duplicates.
func SortedInstances(in []route.Instance) []route.Instance {
	out := make([]route.Instance, 0, len(in))
	out = append(out, in...)
	sort.Slice(out, func(i, j int) bool {
		if out[i].Address != out[j].Address {
			return out[i].Address < out[j].Address
		}
		return out[i].Port < out[j].Port
	})
	dedup := out[:0]
	for i, inst := range out {
		if i == 0 || inst != out[i-1] {
			dedup = append(dedup, inst)
		}
	}
	return dedup
}

// ServerName names an instance's server line after its address and port, so that the name stays
// the same across reloads and can be addressed through the runtime API.
func ServerName(i route.Instance) string {
	var b strings.Builder
	for _, c := range i.Address {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '.', c == '-':
			b.WriteRune(c)
		default:
			b.WriteByte('_')
		}
	}
	b.WriteByte(':')
	b.WriteString(strconv.Itoa(i.Port))
	return b.String()
}

func chunks(items []string, n int) [][]string {
	var out [][]string
	for len(items) > n {
		out = append(out, items[:n])
		items = items[n:]
	}
	if len(items) > 0 {
		out = append(out, items)
	}
	return out
}

func bindAddr(addr string, port int) string {
	if addr == "" {
		return ":" + strconv.Itoa(port)
	}
	return net.JoinHostPort(addr, strconv.Itoa(port))
}

// checkOptions is what follows a server's address when HAProxy checks its health: `check`, and
// the interval when s sets one. The runtime API adds a server with the same words.
func checkOptions(s Settings) string {
	if s.CheckInterval > 0 && s.CheckInterval != DefaultCheckInterval {
		return "check inter " + duration(s.CheckInterval)
	}
	return "check"
}

// duration writes a duration in HAProxy's units, in milliseconds when it is not whole seconds.
func duration(d time.Duration) string {
	if d%time.Second == 0 {
		return strconv.FormatInt(int64(d/time.Second), 10) + "s"
	}
	return strconv.FormatInt(d.Milliseconds(), 10) + "ms"
}
