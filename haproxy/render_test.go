package haproxy

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
	"github.com/docker-flow-proxy/docker-flow-proxy/route"
	"github.com/docker-flow-proxy/docker-flow-proxy/route/routetest"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

func testSettings() Settings {
	s := DefaultSettings()
	s.BindAddress = "127.0.0.1"
	s.HTTPPort = 8000
	s.StatsSocket = "/run/dfp/haproxy.sock"
	return s
}

// caseSettings returns the settings a golden case is rendered with: the server-wide users (USERS)
// for the case "server-users", s for the others.
func caseSettings(name string, s Settings) Settings {
	switch name {
	case "server-users":
		s.Users = []route.User{{Name: "admin", Password: "clear-text"}, {Name: "ops", Password: routetest.Hash}}
	case "stats":
		s.StatsPort, s.StatsUser = 9100, &route.User{Name: "admin", Password: "stats-secret"}
		s.Threads = 2
	case "maps", "path-types":
		if s.MapsDir == "" {
			s.MapsDir = "/run/dfp/maps"
		}
		s.SpareBackends = 3
	}
	return s
}

func renderCases() map[string][]route.Backend {
	books := route.Route{ServiceName: "books-ms", ServicePath: []string{"/api/v1/books"}, PathType: route.PathBeg}
	three := []route.Instance{{Address: "10.0.0.3", Port: 32768}, {Address: "10.0.0.1", Port: 32770}, {Address: "10.0.0.2", Port: 32769}}
	many := make([]string, 70)
	for i := range many {
		many[i] = "/p" + strings.Repeat("x", i%3) + string(rune('a'+i%26)) + "/" + string(rune('a'+i/26))
	}
	local := []route.Instance{{Address: "127.0.0.1", Port: 9000}}
	everything := route.Route{
		ServiceName: "everything", ServicePath: []string{"/vote", "/http"}, PathType: route.PathBeg,
		ServiceDomain: []string{"a.example.com", "b.example.com"}, ServiceDomainMatchAll: true,
		ACLName: "10-everything", HTTPSOnly: true,
		Users: []route.User{{Name: "alice", Password: routetest.Hash}, {Name: "bob", Password: routetest.Hash}}, UsersPassEncrypted: true,
		ReqPathSearch: `^/vote/(.*)$`, ReqPathReplace: `/ballot%20box/\1`, OutboundHostname: "internal.example.com",
		XForwardedProto: true,
		AddHeader:       []route.Header{{Name: "X-Added", Value: "one two"}, {Name: "X-Added", Value: "three"}},
		SetHeader:       []route.Header{{Name: "X-Set", Value: "a=b;c"}},
		TimeoutServer:   5, TimeoutTunnel: 3600,
	}
	return map[string][]route.Backend{
		"empty":    nil,
		"books-ms": {{Route: books, Instances: three}},
		"options": {
			{Route: everything, Instances: local},
			{Route: route.Route{ServiceName: "first", ServicePath: []string{"/"}, PathType: route.PathBeg, ACLName: "05-first",
				RedirectWhenHTTPProto: true, Users: []route.User{{Name: "carol", Password: "pa:ss%1"}}}, Instances: local},
			{Route: books, Instances: three},
		},
		// With USERS (caseSettings): every route without users of its own asks for those.
		"server-users": {
			{Route: books, Instances: three},
			{Route: route.Route{ServiceName: "own", ServicePath: []string{"/own"}, PathType: route.PathBeg,
				Users: []route.User{{Name: "dave", Password: "x"}}}, Instances: local},
		},
		"several": {
			{Route: route.Route{ServiceName: "api", ServicePath: []string{"/api"}, PathType: route.PathBeg},
				Instances: []route.Instance{{Address: "127.0.0.1", Port: 9000}, {Address: "127.0.0.1", Port: 9000}}},
			{Route: books, Instances: three},
			{Route: route.Route{ServiceName: "go-demo", ServiceColor: "blue", ServicePath: []string{"/demo", "/other"},
				ServiceDomain: []string{"demo.example.com", "www.example.com"}, PathType: route.PathDir, SkipCheck: true},
				Instances: []route.Instance{{Address: "::1", Port: 8080}, {Address: "backend.internal", Port: 80}}},
			{Route: route.Route{ServiceName: "no-instances", ServicePath: []string{`^/v[0-9]+/items$`}, PathType: route.PathReg}},
		},
		"stats": {{Route: books, Instances: three}},
		// One service with several destinations: its own HTTP path, a path to another of its
		// ports, a TCP port and two SNI names sharing a port with another service's.
		"destinations": {
			{Route: route.Route{ServiceName: "books-ms", ServicePath: []string{"/api/v1/books"}, PathType: route.PathBeg,
				Dests: []route.Dest{
					{Index: 1, ServicePath: []string{"/admin"}, PathType: route.PathBeg, Port: 9000},
					{Index: 2, ReqMode: route.ModeTCP, SrcPort: 6379, Port: 6379, PathType: route.PathBeg},
				}},
				Instances:     three,
				PortInstances: map[int][]route.Instance{9000: {{Address: "10.0.0.1", Port: 32800}}, 6379: {{Address: "10.0.0.1", Port: 32801}}}},
			{Route: route.Route{ServiceName: "tls-a", ReqMode: route.ModeSNI, SrcPort: 8443, PathType: route.PathBeg,
				ServiceDomain: []string{"a.example.com"}, ServiceDomainMatchAll: true}, Instances: local},
			{Route: route.Route{ServiceName: "tls-b", ReqMode: route.ModeSNI, SrcPort: 8443, PathType: route.PathBeg,
				ServiceDomain: []string{"b.example.com"}, TimeoutTunnel: 600}, Instances: []route.Instance{{Address: "127.0.0.1", Port: 9001}}},
		},
		// Maps: runs of at least MinMapRoutes plain routes, in routing order, become one map each;
		// the other routes keep their acl lines between them.
		"maps": mapsCase(),
		// Maps of every path type: a map each for path_reg, path_end and path_dir; for path and
		// path_beg a map of exact paths before one of prefixes, by path and by host and path.
		"path-types": pathTypesCase(),
		// Custom templates, rendered: they stand for the route's frontend lines and its backend.
		"templates": {
			{Route: books, Instances: three},
			{Route: route.Route{ServiceName: "custom", ServicePath: []string{"/custom"}, PathType: route.PathBeg,
				TemplateFePath: "custom-fe.tmpl", TemplateBePath: "custom-be.tmpl"},
				Instances:       local,
				FrontendSnippet: "\n    acl url_custom path_beg /custom\n\n    use_backend custom-be if url_custom\n",
				BackendSnippet:  "backend custom-be\n    balance leastconn\n\n    server one 127.0.0.1:9000 check\n"},
		},
		"many-paths": {{Route: route.Route{ServiceName: "wide", ServicePath: many, PathType: route.Path}}},
	}
}

// mapsCase is 20 plain routes of paths of lengths 2 to 7, and between them, by length, a route
// with a domain (matched first), a path_dir route and an aclName route.
func mapsCase() []route.Backend {
	var bs []route.Backend
	inst := []route.Instance{{Address: "127.0.0.1", Port: 9000}}
	for i := 0; i < 20; i++ {
		name := fmt.Sprintf("s%02d", i)
		path := "/" + strings.Repeat(string(rune('a'+i%5)), 1+i%6)
		bs = append(bs, route.Backend{Route: route.Route{ServiceName: name, ServicePath: []string{path + "/" + name}, PathType: route.PathBeg}, Instances: inst})
	}
	// x is matched before y (its longest path is longer), so /pq/long/x goes to x through its
	// short /p: the map must answer its first match, not its longest.
	bs = append(bs,
		route.Backend{Route: route.Route{ServiceName: "x", ServicePath: []string{"/p", "/zzzzzzzzzzzz"}, PathType: route.PathBeg}, Instances: inst},
		route.Backend{Route: route.Route{ServiceName: "y", ServicePath: []string{"/pq/long"}, PathType: route.PathBeg}, Instances: inst},
	)
	// Routes by domain: a run of them becomes a map by host and path. h3's short /s on
	// b.example.com comes first and shadows h2's /shop there, not on c.example.com; wild matches
	// every subdomain (serviceDomainMatchAll), keeps its acl lines and comes first (its path is the
	// longest).
	hosts := func(name string, domains []string, paths ...string) route.Backend {
		return route.Backend{Route: route.Route{ServiceName: name, ServicePath: paths, PathType: route.PathBeg, ServiceDomain: domains}, Instances: inst}
	}
	bs = append(bs,
		hosts("h0", []string{"a.example.com"}, "/api"),
		hosts("h1", []string{"a.example.com"}, "/api/v1/long/deeper"),
		hosts("h2", []string{"B.Example.com", "c.example.com"}, "/shop"),
		hosts("h3", []string{"b.example.com"}, "/s", "/zzzzzzzzzzzzzzzzzzzz"),
		hosts("h4", []string{"a.example.com.evil"}, "/"),
		hosts("h5", []string{"d.example.com"}, "/"),
		hosts("h6", []string{"d.example.com"}, "/d6"),
		hosts("h7", []string{"e.example.com"}, "/e"),
		hosts("h8", []string{"f.example.com"}, "/f"),
	)
	wild := hosts("wild", []string{"example.org"}, "/wild-card-path-is-the-longest-one")
	wild.Route.ServiceDomainMatchAll = true
	bs = append(bs, wild,
		route.Backend{Route: route.Route{ServiceName: "domain", ServicePath: []string{"/"}, PathType: route.PathBeg, ServiceDomain: []string{"a.example.com"}}, Instances: inst},
		route.Backend{Route: route.Route{ServiceName: "dir", ServicePath: []string{"/dd/di"}, PathType: route.PathDir}, Instances: inst},
		route.Backend{Route: route.Route{ServiceName: "first", ServicePath: []string{"/"}, PathType: route.PathBeg, ACLName: "01"}, Instances: inst},
	)
	return bs
}

func TestRenderGolden(t *testing.T) {
	for name, backends := range renderCases() {
		t.Run(name, func(t *testing.T) {
			for _, b := range backends {
				if err := b.Route.Validate(); err != nil {
					t.Fatalf("the case's route %s is not valid: %v", b.Route.ServiceName, err)
				}
			}
			got := Render(caseSettings(name, testSettings()), backends)
			golden := filepath.Join("testdata", name+".cfg")
			if *update {
				if err := os.WriteFile(golden, got, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run go test ./haproxy -run TestRenderGolden -update)", err)
			}
			if string(got) != string(want) {
				t.Errorf("rendered config differs from %s:\n%s", golden, got)
			}
			if err := shapeError(string(got)); err != nil {
				t.Errorf("%s: %v", golden, err)
			}
		})
	}
}

func TestRenderIsStableWhateverTheInputOrder(t *testing.T) {
	bs := renderCases()["several"]
	reversed := make([]route.Backend, len(bs))
	for i, b := range bs {
		inst := make([]route.Instance, len(b.Instances))
		for j, in := range b.Instances {
			inst[len(inst)-1-j] = in
		}
		b.Instances = inst
		reversed[len(bs)-1-i] = b
	}
	if a, b := Render(testSettings(), bs), Render(testSettings(), reversed); string(a) != string(b) {
		t.Fatalf("order of input changed the config:\n%s\n---\n%s", a, b)
	}
}

// Every golden config must be one that the real HAProxy accepts.
func TestRenderedConfigsPassHAProxyCheck(t *testing.T) {
	bin := testenv.HAProxyBin(t)
	dir := t.TempDir()
	s := testSettings()
	s.StatsSocket = filepath.Join(dir, "s.sock")
	s.HTTPPort = testenv.FreePort(t)
	s.MapsDir = filepath.Join(dir, "maps")
	p := NewProcess(Options{Binary: bin, Dir: dir})
	for name, backends := range renderCases() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		if err := p.Validate(ctx, Render(caseSettings(name, s), backends)); err != nil {
			t.Errorf("%s: haproxy -c rejects the rendered config: %v", name, err)
		}
		cancel()
	}
}

func TestCheckPortsRefusesClashes(t *testing.T) {
	s := testSettings()
	s.HTTPSPort, s.StatsPort = 8443, 9100
	tcp := func(name string, port int) route.Backend {
		return route.Backend{Route: route.Route{ServiceName: name, ReqMode: route.ModeTCP, SrcPort: port}}
	}
	sni := func(name string, port int, domains ...string) route.Backend {
		return route.Backend{Route: route.Route{ServiceName: name, ReqMode: route.ModeSNI, SrcPort: port, ServiceDomain: domains}}
	}
	indexed := route.Backend{Route: route.Route{ServiceName: "z", ServicePath: []string{"/z"}, PathType: route.PathBeg,
		Dests: []route.Dest{{Index: 3, ReqMode: route.ModeTCP, SrcPort: 6379}}}}
	for _, tc := range []struct {
		name     string
		backends []route.Backend
		param    string // "" when the ports are fine
	}{
		{"distinct ports", []route.Backend{tcp("a", 6379), tcp("b", 6380), sni("c", 9443, "c.test")}, ""},
		{"two SNI names on one port", []route.Backend{sni("a", 9443, "a.test"), sni("b", 9443, "b.test")}, ""},
		{"the HTTP port", []route.Backend{tcp("a", s.HTTPPort)}, "srcPort"},
		{"the HTTPS port", []route.Backend{sni("a", 8443, "a.test")}, "srcPort"},
		{"the stats port", []route.Backend{tcp("a", 9100)}, "srcPort"},
		{"two TCP routes on one port", []route.Backend{tcp("a", 6379), tcp("b", 6379)}, "srcPort"},
		{"TCP and SNI on one port", []route.Backend{sni("a", 6379, "a.test"), tcp("b", 6379)}, "srcPort"},
		{"one SNI name twice", []route.Backend{sni("a", 9443, "a.test"), sni("b", 9443, "x.test", "a.test")}, "srcPort"},
		{"an indexed destination", []route.Backend{tcp("a", 6379), indexed}, "srcPort.3"},
	} {
		err := CheckPorts(s, tc.backends)
		var pe *route.ParamError
		switch {
		case tc.param == "" && err != nil:
			t.Errorf("%s: CheckPorts = %v, want nil", tc.name, err)
		case tc.param != "" && (!errors.As(err, &pe) || pe.Param != tc.param):
			t.Errorf("%s: CheckPorts = %v, want a ParamError naming %s", tc.name, err, tc.param)
		}
	}
}

// replacePath applies replace-path as HAProxy does: when regex matches the path, the whole path
// becomes the format, with \N replaced by group N and %% by %.
func replacePath(regex, format, path string) string {
	m := regexp.MustCompile(regex).FindStringSubmatch(path)
	if m == nil {
		return path
	}
	out := regexp.MustCompile(`\\[0-9]`).ReplaceAllStringFunc(format, func(ref string) string { return m[ref[1]-'0'] })
	return strings.ReplaceAll(out, "%%", "%")
}

// substitute is the original's regsub: the first match of search becomes replace.
func substitute(search, replace, path string) string {
	re := regexp.MustCompile(search)
	loc := re.FindStringSubmatchIndex(path)
	if loc == nil {
		return path
	}
	tmpl := regexp.MustCompile(`\\([0-9])`).ReplaceAllString(replace, "$${$1}")
	return path[:loc[0]] + string(re.ExpandString(nil, tmpl, path, loc)) + path[loc[1]:]
}

func TestPathRewriteSubstitutesTheFirstMatch(t *testing.T) {
	tests := []struct{ search, replace, path, want string }{
		{"/http/", "/renamed/", "/http/x/y", "/renamed/x/y"},
		{"^/vote/", "/", "/vote/a/b", "/a/b"},
		{"^/vote/", "/", "/other/vote/", "/other/vote/"},
		{"/vote/", "/", "/other/vote/x", "/other/x"},
		{"a", "b", "/aaa", "/baa"},
		{`^/items/([0-9]+)$`, `/item%20\1`, "/items/42", "/item%2042"},
		{`^/items/([0-9]+)$`, `/item%20\1`, "/items/42/x", "/items/42/x"},
		{`/(v[0-9])/(.*)\.json$`, `/\2/\1\0`, "/api/v2/books.json", "/api/books/v2/v2/books.json"},
		{`(a)(b)(c)(d)(e)(f)`, `\6\5\4\3\2\1`, "/xabcdefy", "/xfedcbay"},
		{`x*`, "/pre", "/path", "/pre/path"},
	}
	for _, tc := range tests {
		regex, format := pathRewrite(tc.search, tc.replace)
		got := replacePath(regex, format, tc.path)
		if got != tc.want || got != substitute(tc.search, tc.replace, tc.path) {
			t.Errorf("%s -> %s on %s: replace-path %q %q gives %s, want %s", tc.search, tc.replace, tc.path, regex, format, got, tc.want)
		}
	}
}
