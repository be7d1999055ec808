package haproxy

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
	"github.com/docker-flow-proxy/docker-flow-proxy/route"
	"github.com/docker-flow-proxy/docker-flow-proxy/route/routetest"
)

// FuzzReconfigureQuery feeds any query to the reconfigure parser and the renderer. Either the
// request is refused with a ParamError, or the config it yields passes `haproxy -c` and holds only
// lines of the renderer's own shapes: nothing a request sends can add a section, a directive, a
// comment or an environment variable. scripts/test.sh runs it briefly; run it longer with
//
//	go test ./haproxy -run '^$' -fuzz FuzzReconfigureQuery -fuzztime 10m
func FuzzReconfigureQuery(f *testing.F) {
	seeds := []string{
		"serviceName=books-ms&servicePath=/api/v1/books",
		"serviceName=go-demo&serviceColor=blue&servicePath=/demo,/other&serviceDomain=a.example.com&pathType=path_dir&skipCheck=true",
		"serviceName=r&servicePath=" + url.QueryEscape("^/v[0-9]+/items$") + "&pathType=path_reg",
		"serviceName=e&servicePath=.json&pathType=path_end",
		"serviceName=books-ms&servicePath=/api&port=8080&servicePath.1=/admin&port.1=9000&reqMode.2=tcp&srcPort.2=6379",
		"serviceName=tls&reqMode=sni&srcPort=9443&serviceDomain=a.test,b.test&serviceDomainMatchAll=true",
		"serviceName=t&templateFePath=fe.tmpl&templateBePath=be.tmpl&servicePath=/t",
	}
	for _, bq := range routetest.BadQueries() {
		seeds = append(seeds, bq.Query)
	}
	for _, s := range seeds {
		f.Add(s)
	}
	bin := testenv.HAProxyBin(f)
	dir := f.TempDir()
	p := NewProcess(Options{Binary: bin, Dir: dir})
	s := DefaultSettings()
	s.BindAddress, s.HTTPPort, s.StatsSocket = "127.0.0.1", 8000, filepath.Join(dir, "s.sock")
	s.MapsDir = filepath.Join(dir, "maps")

	f.Fuzz(func(t *testing.T, raw string) {
		q, err := url.ParseQuery(raw)
		if err != nil {
			return
		}
		r, err := route.FromQuery(q)
		if err != nil {
			var pe *route.ParamError
			if !errors.As(err, &pe) {
				t.Fatalf("FromQuery(%q) failed without naming a parameter: %v", raw, err)
			}
			return
		}
		bs := []route.Backend{{Route: r, Instances: []route.Instance{{Address: "127.0.0.1", Port: 9000}}}}
		if len(r.Dests) == 0 && r.Mode() == route.ModeHTTP {
			// Copies under other names, so that a plain route is routed through a map too.
			for i := 0; i < MinMapRoutes; i++ {
				c := r
				c.ServiceName = fmt.Sprintf("%s-copy%d", r.ServiceName, i)
				if len(c.ServiceName) <= route.MaxNameLength {
					bs = append(bs, route.Backend{Route: c, Instances: bs[0].Instances})
				}
			}
		}
		if err := CheckPorts(s, bs); err != nil {
			var pe *route.ParamError
			if !errors.As(err, &pe) {
				t.Fatalf("CheckPorts(%q) failed without naming a parameter: %v", raw, err)
			}
			return
		}
		cfg := Render(s, bs)
		if err := shapeError(string(cfg)); err != nil {
			t.Fatalf("query %q: %v\n%s", raw, err, cfg)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := p.Validate(ctx, cfg); err != nil {
			// HAProxy's regex library (PCRE2) refuses some patterns that Go's accepts ("^*"): the
			// server then answers 400 with HAProxy's message, and nothing changes (see
			// TestRegexThatHAProxyRefusesIsABadRequest). Any other refusal is a bug.
			if !strings.Contains(err.Error(), "regex '") {
				t.Fatalf("query %q was accepted but its config fails haproxy -c: %v\n%s", raw, err, cfg)
			}
		}
	})
}

// Directives each section may hold: what the renderer writes, nothing else.
var allowed = map[string][]string{
	"global":   {"stats", "hard-stop-after", "httpclient.ssl.verify", "nbthread"},
	"defaults": {"mode", "option", "timeout", "default-server", "retries", "retry-on"},
	"frontend": {"bind", "acl", "use_backend", "http-request", "stats", "mode", "option", "tcp-request", "default_backend"},
	"backend":  {"balance", "server", "http-request", "timeout", "mode"},
	"userlist": {"user"},
}

var (
	mapHeader = regexp.MustCompile(`^#map /[A-Za-z0-9_./-]+/routes-[0-9a-f]{16}\.map$`)
	// A path (a map by host and path: a domain in lower case and a path), a path's end, or a regular
	// expression that may end with '$'.
	mapEntry         = regexp.MustCompile(`^#    ([a-z0-9-]+(\.[a-z0-9-]+)*)?/[A-Za-z0-9\-._~!&()*+;=:@%/]* [A-Za-z0-9_.-]+-be(-[0-9]+)?$|^#    [A-Za-z0-9\-._~!&()*+;=:@%/]+ [A-Za-z0-9_.-]+-be(-[0-9]+)?$|^#    [A-Za-z0-9\-._~!&()*+;=:@%/^\[\]{}|?<>]+\$? [A-Za-z0-9_.-]+-be(-[0-9]+)?$`)
	tcpFrontend      = regexp.MustCompile(`^frontend tcp_[0-9]+$`)
	backendNameShape = regexp.MustCompile(`-be(-[0-9]+|-(tcp|sni)-[0-9]+)?$|^dfp-spare-[0-9]+$`)
)

// shapeError says which line of a config the renderer could not have written.
func shapeError(cfg string) error {
	fail := func(line, why string) error { return fmt.Errorf("the line %q %s", line, why) }
	section := ""
	inMap := false
	for i, line := range strings.Split(strings.TrimSuffix(cfg, "\n"), "\n") {
		if i == 0 && strings.HasPrefix(line, "# Generated by docker-flow-proxy") {
			continue
		}
		if line == "" {
			inMap = false
			continue
		}
		// The map files at the end: a "#map <file>" line, then "#    <path> <backend>" lines.
		if mapHeader.MatchString(line) {
			inMap = true
			continue
		}
		if inMap {
			if !mapEntry.MatchString(line) {
				return fail(line, "is not a map entry of the renderer's")
			}
			continue
		}
		if c, ok := unquotedSpecial(line); ok {
			return fail(line, "holds "+c+" outside single quotes")
		}
		fields := strings.Fields(line)
		if !strings.HasPrefix(line, "    ") {
			section = fields[0]
			if _, ok := allowed[section]; !ok {
				return fail(line, "starts a section the renderer never writes")
			}
			if (section == "global" || section == "defaults") && len(fields) != 1 ||
				section == "frontend" && line != "frontend services" && line != "frontend stats" && !tcpFrontend.MatchString(line) ||
				section == "backend" && (len(fields) != 2 || !backendNameShape.MatchString(fields[1])) {
				return fail(line, "is not a section header of the renderer's")
			}
			continue
		}
		ok := false
		for _, d := range allowed[section] {
			ok = ok || fields[0] == d
		}
		if !ok {
			return fail(line, "is not a directive of its section "+section)
		}
		if len(fields) > 60 {
			return fail(line, "has more words than HAProxy takes on one line")
		}
	}
	return nil
}

func TestShapeCheckCatchesInjectedLines(t *testing.T) {
	good := string(Render(testSettings(), renderCases()["several"]))
	if err := shapeError(good); err != nil {
		t.Fatalf("the renderer's own config: %v", err)
	}
	for _, injected := range []string{
		"    acl url_x path_beg -- /api#comment",
		"    acl url_x path_beg -- /$HOME",
		"    acl url_x path_beg -- \"/x\"",
		"backend evil",
		"listen stats",
		"    stats enable",
		"    acl url_x path_reg -- '^/a$",
	} {
		if shapeError(good+injected+"\n") == nil {
			t.Errorf("the check let %q through", injected)
		}
	}
}

// unquotedSpecial finds a character that HAProxy interprets outside single quotes.
func unquotedSpecial(line string) (string, bool) {
	quoted := false
	for _, c := range line {
		switch {
		case c == '\'':
			quoted = !quoted
		case quoted:
		case c == '#' || c == '"' || c == '\\' || c == '$':
			return string(c), true
		case c < 0x20 || c == 0x7f:
			return "a control character", true
		}
	}
	if quoted {
		return "an unclosed quote", true
	}
	return "", false
}
