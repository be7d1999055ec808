package proxy

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/consul"
	"github.com/docker-flow-proxy/docker-flow-proxy/haproxy"
	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

// fastPathFixture is a controller on real Consul and HAProxy (with its stats socket), serving the
// route books-ms whose instances are HTTP servers that answer their own name.
type fastPathFixture struct {
	p     *Proxy
	hap   *haproxy.Process
	s     haproxy.Settings
	inst  []route.Instance // inst[i] answers "b<i+1>"
	books route.Route
}

func newFastPathFixture(t *testing.T, ctx context.Context, instances int) *fastPathFixture {
	t.Helper()
	f := &fastPathFixture{}
	for i := range instances {
		body := fmt.Sprintf("b%d", i+1)
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			_, _ = io.WriteString(w, body)
		}))
		t.Cleanup(srv.Close)
		f.inst = append(f.inst, route.Instance{Address: "127.0.0.1", Port: srv.Listener.Addr().(*net.TCPAddr).Port})
	}
	c := testenv.StartConsul(t)
	c.RegisterService("books-ms", "b1", "127.0.0.1", f.inst[0].Port)
	client, err := consul.New([]string{c.Addr}, nil)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	f.hap = haproxy.NewProcess(haproxy.Options{Binary: testenv.HAProxyBin(t), Dir: dir})
	f.s = haproxy.DefaultSettings()
	f.s.BindAddress, f.s.HTTPPort = "127.0.0.1", testenv.FreePort(t)
	f.s.StatsSocket = filepath.Join(dir, "haproxy.sock")
	f.p = New(catalogOf(client), consul.NewStore(client, "docker-flow"), f.hap, f.s, nil)
	cfg, err := f.p.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.hap.Start(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.hap.Stop(context.Background()) })
	f.books = route.Route{ServiceName: "books-ms", ServicePath: []string{"/api/v1/books"}, PathType: route.PathBeg}
	if _, err := f.p.Reconfigure(ctx, f.books); err != nil {
		t.Fatal(err)
	}
	return f
}

func (f *fastPathFixture) reloads(t *testing.T, ctx context.Context) int {
	t.Helper()
	info, err := f.hap.ShowProc(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return info.Reloads
}

// answers sends requests on new connections until every instance of want answered (or 5s pass).
func (f *fastPathFixture) answers(t *testing.T, path string, want int) map[string]int {
	t.Helper()
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	got := map[string]int{}
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); {
		resp, err := c.Get(fmt.Sprintf("http://127.0.0.1:%d%s", f.s.HTTPPort, path))
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("GET %s: %d %s", path, resp.StatusCode, body)
		}
		got[string(body)]++
		if len(got) >= want && len(got)*10 <= sum(got) {
			break
		}
	}
	return got
}

func sum(m map[string]int) int {
	n := 0
	for _, v := range m {
		n += v
	}
	return n
}

func (f *fastPathFixture) servesWhatItRenders(t *testing.T) {
	t.Helper()
	if !bytes.Equal(f.hap.Config(), f.p.Config()) {
		t.Fatalf("HAProxy serves\n%s\nthe controller renders\n%s", f.hap.Config(), f.p.Config())
	}
}

// Instance changes of a served route reach HAProxy through the runtime API: no reload. Anything else
// still reloads.
func TestInstanceChangesWithoutReload(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	f := newFastPathFixture(t, ctx, 3)
	r := f.reloads(t, ctx)

	if err := f.p.UpdateInstances(ctx, "books-ms", f.inst); err != nil {
		t.Fatal(err)
	}
	if got := f.answers(t, "/api/v1/books", 3); len(got) != 3 {
		t.Fatalf("with 3 instances the answers came from %v", got)
	}
	if now := f.reloads(t, ctx); now != r {
		t.Fatalf("reloads %d -> %d: adding instances reloaded HAProxy", r, now)
	}
	f.servesWhatItRenders(t)

	if err := f.p.UpdateInstances(ctx, "books-ms", f.inst[:1]); err != nil {
		t.Fatal(err)
	}
	if got := f.answers(t, "/api/v1/books", 1); len(got) != 1 || got["b1"] == 0 {
		t.Fatalf("with instance b1 only the answers came from %v", got)
	}
	if now := f.reloads(t, ctx); now != r {
		t.Fatalf("reloads %d -> %d: removing instances reloaded HAProxy", r, now)
	}
	f.servesWhatItRenders(t)

	changed := f.books
	changed.ServicePath = []string{"/api/v2/books"}
	if _, err := f.p.Reconfigure(ctx, changed); err != nil {
		t.Fatal(err)
	}
	if now := f.reloads(t, ctx); now != r+1 {
		t.Fatalf("reloads %d -> %d: a changed path must reload once", r, now)
	}
	f.servesWhatItRenders(t)
	f.answers(t, "/api/v2/books", 1)
}

// When the runtime API refuses a change, the controller reloads instead and ends up serving it.
func TestFastPathFailureFallsBackToReload(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	f := newFastPathFixture(t, ctx, 2)
	r := f.reloads(t, ctx)

	// A server named as the one to add already exists (added behind the controller's back).
	name := haproxy.ServerName(f.inst[1])
	if out, err := haproxy.Command(ctx, f.s.StatsSocket, "add server books-ms-be/"+name+" 127.0.0.1:1"); err != nil {
		t.Fatal(err, out)
	}
	if err := f.p.UpdateInstances(ctx, "books-ms", f.inst); err != nil {
		t.Fatalf("UpdateInstances after a failed fast path: %v", err)
	}
	if now := f.reloads(t, ctx); now != r+1 {
		t.Fatalf("reloads %d -> %d: the failed fast path must fall back to one reload", r, now)
	}
	f.servesWhatItRenders(t)
	if got := f.answers(t, "/api/v1/books", 2); len(got) != 2 {
		t.Fatalf("after the fallback reload the answers came from %v", got)
	}
	// The next instance change takes the fast path again.
	if err := f.p.UpdateInstances(ctx, "books-ms", f.inst[:1]); err != nil {
		t.Fatal(err)
	}
	if now := f.reloads(t, ctx); now != r+1 {
		t.Fatalf("reloads %d -> %d: the fast path did not resume after the fallback", r+1, now)
	}
	f.servesWhatItRenders(t)
}

// Switching the instances back and forth through the runtime API under load loses no request:
// removed servers finish their requests before they are deleted.
func TestFastPathUnderLoadLosesNoRequest(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	f := newFastPathFixture(t, ctx, 3)
	r := f.reloads(t, ctx)

	var ok, failed atomic.Int64
	var firstErr atomic.Value
	stop := make(chan struct{})
	var wg sync.WaitGroup
	url := fmt.Sprintf("http://127.0.0.1:%d/api/v1/books", f.s.HTTPPort)
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 1}}
			defer c.CloseIdleConnections()
			for {
				select {
				case <-stop:
					return
				default:
				}
				resp, err := c.Get(url)
				if err == nil {
					_, err = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if err == nil && resp.StatusCode != http.StatusOK {
						err = fmt.Errorf("status %d", resp.StatusCode)
					}
				}
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
					continue
				}
				ok.Add(1)
			}
		}()
	}
	deadline := time.Now().Add(10 * time.Second)
	switches := 0
	for i := 0; i < 10 && time.Now().Before(deadline); i++ {
		for _, inst := range [][]route.Instance{f.inst, f.inst[:1]} {
			time.Sleep(50 * time.Millisecond)
			if err := f.p.UpdateInstances(ctx, "books-ms", inst); err != nil {
				t.Errorf("UpdateInstances: %v", err)
			}
			switches++
		}
	}
	time.Sleep(100 * time.Millisecond)
	close(stop)
	wg.Wait()
	t.Logf("%d switches, %d requests, %d failed", switches, ok.Load(), failed.Load())
	if failed.Load() > 0 {
		t.Fatalf("%d of %d requests failed; first: %v", failed.Load(), ok.Load()+failed.Load(), firstErr.Load())
	}
	if ok.Load() == 0 {
		t.Fatal("no request succeeded")
	}
	if now := f.reloads(t, ctx); now != r {
		t.Errorf("reloads %d -> %d: the instance switches under load did not all take the fast path", r, now)
	}
	f.servesWhatItRenders(t)
}
