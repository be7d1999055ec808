package haproxy

import (
	"context"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

func testSettings() Settings {
	s := DefaultSettings()
	s.BindAddress = "127.0.0.1"
	s.HTTPPort = 8000
	s.StatsSocket = "/run/dfp/haproxy.sock"
	return s
}

func renderCases() map[string][]route.Backend {
	books := route.Route{ServiceName: "books-ms", ServicePath: []string{"/api/v1/books"}, PathType: route.PathBeg}
	three := []route.Instance{{Address: "10.0.0.3", Port: 32768}, {Address: "10.0.0.1", Port: 32770}, {Address: "10.0.0.2", Port: 32769}}
	many := make([]string, 70)
	for i := range many {
		many[i] = "/p" + strings.Repeat("x", i%3) + string(rune('a'+i%26)) + "/" + string(rune('a'+i/26))
	}
	return map[string][]route.Backend{
		"empty":    nil,
		"books-ms": {{Route: books, Instances: three}},
		"several": {
			{Route: route.Route{ServiceName: "api", ServicePath: []string{"/api"}, PathType: route.PathBeg},
				Instances: []route.Instance{{Address: "127.0.0.1", Port: 9000}, {Address: "127.0.0.1", Port: 9000}}},
			{Route: books, Instances: three},
			{Route: route.Route{ServiceName: "go-demo", ServiceColor: "blue", ServicePath: []string{"/demo", "/other"},
				ServiceDomain: []string{"demo.example.com", "www.example.com"}, PathType: route.PathDir, SkipCheck: true},
				Instances: []route.Instance{{Address: "::1", Port: 8080}, {Address: "backend.internal", Port: 80}}},
			{Route: route.Route{ServiceName: "no-instances", ServicePath: []string{`^/v[0-9]+/items$`}, PathType: route.PathReg}},
		},
		"many-paths": {{Route: route.Route{ServiceName: "wide", ServicePath: many, PathType: route.Path}}},
	}
}

func TestRenderGolden(t *testing.T) {
	for name, backends := range renderCases() {
		t.Run(name, func(t *testing.T) {
			got := Render(testSettings(), backends)
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
	p := NewProcess(Options{Binary: bin, Dir: dir})
	for name, backends := range renderCases() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		if err := p.Validate(ctx, Render(s, backends)); err != nil {
			t.Errorf("%s: haproxy -c rejects the rendered config: %v", name, err)
		}
		cancel()
	}
}
