package proxy

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/consul"
	"github.com/docker-flow-proxy/docker-flow-proxy/haproxy"
	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

// failingReload validates with the real HAProxy but fails every reload. This is a fake on purpose:
// a reload that fails after `haproxy -c` passed (a port taken meanwhile, say) cannot be caused
// through the API, and this test is about what the controller does with KV then.
type failingReload struct{ *haproxy.Process }

func (failingReload) Apply(context.Context, []byte) error {
	return errors.New("reload failed (injected)")
}

func TestFailedReloadLeavesKVAsItWas(t *testing.T) {
	c := testenv.StartConsul(t)
	client, err := consul.New([]string{c.Addr}, nil)
	if err != nil {
		t.Fatal(err)
	}
	store := consul.NewStore(client, "docker-flow")
	hap := failingReload{haproxy.NewProcess(haproxy.Options{Binary: testenv.HAProxyBin(t), Dir: t.TempDir()})}
	s := haproxy.DefaultSettings()
	s.BindAddress, s.HTTPPort = "127.0.0.1", testenv.FreePort(t)
	p := New(catalogOf(client), store, hap, s, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	old := route.Route{ServiceName: "books-ms", ServicePath: []string{"/api/v1/books"}, PathType: route.PathBeg}
	if err := store.Put(ctx, old); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Load(ctx); err != nil {
		t.Fatal(err)
	}
	cfgBefore := p.Config()

	changed := old
	changed.ServicePath = []string{"/api/v2/books"}
	if _, err := p.Reconfigure(ctx, changed); !errors.Is(err, ErrApply) {
		t.Fatalf("Reconfigure with a failing reload = %v, want ErrApply", err)
	}
	if got, _, _ := store.Get(ctx, "books-ms"); !got.Equal(old) {
		t.Fatalf("KV after a failed reload holds %+v, want the old route %+v", got, old)
	}
	if _, err := p.Reconfigure(ctx, route.Route{ServiceName: "new", ServicePath: []string{"/new"}, PathType: route.PathBeg}); !errors.Is(err, ErrApply) {
		t.Fatalf("Reconfigure of a new route = %v, want ErrApply", err)
	}
	if _, found, _ := store.Get(ctx, "new"); found {
		t.Fatal("a new route whose reload failed stayed in KV")
	}
	if _, err := p.Remove(ctx, "books-ms"); !errors.Is(err, ErrApply) {
		t.Fatalf("Remove with a failing reload = %v, want ErrApply", err)
	}
	if _, found, _ := store.Get(ctx, "books-ms"); !found {
		t.Fatal("a route whose removal failed to reload is gone from KV")
	}
	if string(p.Config()) != string(cfgBefore) {
		t.Fatal("the controller's route table changed although no reload succeeded")
	}
}

type catalogFunc func(ctx context.Context, service string) ([]route.Instance, error)

func (f catalogFunc) Instances(ctx context.Context, service string) ([]route.Instance, error) {
	return f(ctx, service)
}

func catalogOf(c *consul.Client) Catalog {
	return catalogFunc(func(ctx context.Context, s string) ([]route.Instance, error) {
		return c.Instances(ctx, s, consul.HealthPassing)
	})
}

// A broken certificate dropped into the certificates folder makes every config fail `haproxy -c`:
// a reconfigure must then change nothing, in KV or in what is served.
func TestConfigRejectedByHAProxyChangesNothing(t *testing.T) {
	c := testenv.StartConsul(t)
	client, err := consul.New([]string{c.Addr}, nil)
	if err != nil {
		t.Fatal(err)
	}
	certs := t.TempDir()
	if err := os.WriteFile(filepath.Join(certs, "broken.pem"), []byte("not a certificate\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	s := haproxy.DefaultSettings()
	s.BindAddress, s.HTTPPort, s.HTTPSPort = "127.0.0.1", testenv.FreePort(t), testenv.FreePort(t)
	s.CertsDir, s.HasCerts = certs, true
	store := consul.NewStore(client, "docker-flow")
	hap := haproxy.NewProcess(haproxy.Options{Binary: testenv.HAProxyBin(t), Dir: t.TempDir()})
	p := New(catalogOf(client), store, hap, s, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	before := p.Config()
	_, err = p.Reconfigure(ctx, route.Route{ServiceName: "books-ms", ServicePath: []string{"/api/v1/books"}, PathType: route.PathBeg})
	var ce *haproxy.ConfigError
	if !errors.Is(err, ErrConfig) || errors.Is(err, ErrRejected) || !errors.As(err, &ce) || !strings.Contains(ce.Output, "broken.pem") {
		t.Fatalf("Reconfigure = %v; want ErrConfig carrying HAProxy's complaint about broken.pem", err)
	}
	if _, found, _ := store.Get(ctx, "books-ms"); found {
		t.Fatal("a route whose config failed haproxy -c was written to KV")
	}
	if string(p.Config()) != string(before) {
		t.Fatal("the route table changed although the config was rejected")
	}
}
