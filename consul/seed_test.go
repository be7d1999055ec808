package consul

import (
	"fmt"
	"reflect"
	"slices"
	"testing"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

// seededWorld is a route and a service with one instance, read as a new replica reads them at
// start, through a recording front.
type seededWorld struct {
	agent    *testenv.Consul
	direct   *Client // to the agent, for the test's own writes
	front    *testenv.ConsulFront
	c        *Client // through the front
	store    *Store  // through the front
	table    route.KVTable
	read     *CatalogRead
	reported map[string][]route.Instance
}

func newSeededWorld(t *testing.T) *seededWorld {
	t.Helper()
	w := &seededWorld{agent: testenv.StartConsul(t)}
	w.direct, _ = newClient(t, w.agent.Addr)
	ctx := testContext(t)
	books := route.Route{ServiceName: "books", ServicePath: []string{"/books"}, PathType: route.PathBeg}
	if err := NewStore(w.direct, "").Put(ctx, books); err != nil {
		t.Fatal(err)
	}
	w.agent.RegisterService("books", "books-1", "10.0.0.1", 8080)
	waitInstances(t, w.direct, "books", HealthAny, 1)

	w.front = testenv.StartConsulFront(t, w.agent)
	w.c, _ = newClient(t, w.front.Addr)
	w.store = NewStore(w.c, "")
	w.readSeed(t)
	return w
}

// readSeed reads the route table and the catalog as a new replica's load does, and forgets the
// front's record of the reads.
func (w *seededWorld) readSeed(t *testing.T) {
	t.Helper()
	ctx := testContext(t)
	var err error
	if w.table, err = w.store.Table(ctx); err != nil {
		t.Fatal(err)
	}
	if w.table.Index == 0 || len(w.table.Versions) != 1 {
		t.Fatalf("Table read versions %v at index %d, want books' at a non-zero index", w.table.Versions, w.table.Index)
	}
	if w.read, err = w.c.ReadCatalog(ctx); err != nil {
		t.Fatal(err)
	}
	if w.reported, err = w.read.Instances([]string{"books"}, HealthPassing); err != nil {
		t.Fatal(err)
	}
	if want := []route.Instance{inst("10.0.0.1", 8080)}; !reflect.DeepEqual(w.reported["books"], want) {
		t.Fatalf("the catalog read lists %v for books, want %v", w.reported["books"], want)
	}
	w.front.Take()
}

func (w *seededWorld) seed(t *testing.T) func(*Watcher) {
	return func(wt *Watcher) {
		if err := wt.SeedRoutes(w.table.Versions, w.table.Index); err != nil {
			t.Error(err)
		}
		if err := wt.SeedCatalog(w.read, w.reported); err != nil {
			t.Error(err)
		}
	}
}

// A watcher that starts from what a new replica has just read (the route table, the catalog) does
// not read them again: each of its queries blocks from the index of a read of the seed, and it
// reports nothing until Consul changes; then it reports the change.
func TestWatcherSeeded(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		limit int // of node watches
		nodes string
	}{
		{"a watch per node", DefaultNodeWatchLimit, "/v1/catalog/node-services/"},
		// One watch follows every node (see startPoolLocked): it starts from the seed too.
		{"one watch of every node", 0, "/v1/catalog/services"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			w := newSeededWorld(t)
			// A short wait: queries that end without news are sent again, from the same index.
			r := startWatcher(t, w.c, w.store, HealthPassing, nil, func(wt *Watcher) {
				wt.timing.wait = 300 * time.Millisecond
				wt.SetNodeWatchLimit(tc.limit)
				w.seed(t)(wt)
			})
			r.expectNone(t, 1500*time.Millisecond, "nothing changed since the seed's reads")
			reads := w.front.Take()
			for _, read := range reads {
				if !read.Under("/v1/status/") && !read.Blocking() {
					t.Errorf("the seeded watcher read %s without an index (the whole of it again)", read)
				}
			}
			for _, path := range []string{"/v1/kv/docker-flow/", "/v1/catalog/nodes", tc.nodes, "/v1/health/state/any"} {
				if !slices.ContainsFunc(reads, func(r testenv.ConsulRead) bool { return r.Under(path) && r.Blocking() }) {
					t.Errorf("no blocking query on %s; reads: %v", path, reads)
				}
			}

			// The changes are reported: an instance, a route written by another replica.
			w.agent.RegisterService("books", "books-2", "10.0.0.2", 8080)
			r.waitFor(t, 5*time.Second, "with the new instance", instancesOf("books", inst("10.0.0.1", 8080), inst("10.0.0.2", 8080)))
			goDemo := route.Route{ServiceName: "go-demo", ServicePath: []string{"/demo"}, PathType: route.PathBeg}
			if err := NewStore(w.direct, "").Put(testContext(t), goDemo); err != nil {
				t.Fatal(err)
			}
			r.waitFor(t, 5*time.Second, "with the new route", routesNamed("books", "go-demo"))
		})
	}
}

// What changed between the seed's reads and the watcher's start (a replica starts HAProxy in
// between) is reported at once; what did not change is not.
func TestWatcherSeededChangeBeforeRun(t *testing.T) {
	t.Parallel()
	w := newSeededWorld(t)
	w.agent.RegisterService("books", "books-2", "10.0.0.2", 8080)
	waitInstances(t, w.direct, "books", HealthAny, 2)
	goDemo := route.Route{ServiceName: "go-demo", ServicePath: []string{"/demo"}, PathType: route.PathBeg}
	if err := NewStore(w.direct, "").Put(testContext(t), goDemo); err != nil {
		t.Fatal(err)
	}
	r := startWatcher(t, w.c, w.store, HealthPassing, nil, w.seed(t))
	r.waitAll(t, 5*time.Second, map[string]func(Update) bool{
		"instances": instancesOf("books", inst("10.0.0.1", 8080), inst("10.0.0.2", 8080)),
		"routes":    routesNamed("books", "go-demo"),
	})
	r.expectNone(t, time.Second, "after the changes were reported")
}

// A Consul that lost its data between the load and the watcher's start (a dev agent restarted)
// has lower indexes than the seed's reads: a query from the seed's index would wait for the whole
// wait (5 minutes) before Consul answers. The first query of a seeded watch waits less, and its
// answer, at a lower index, starts the watch over: what Consul holds now is reported.
func TestWatcherSeededConsulLostItsData(t *testing.T) {
	t.Parallel()
	w := newSeededWorld(t)
	// Writes before the seed's reads take Consul's index well above what the restarted agent's
	// few writes reach.
	for i := range 100 {
		w.agent.Put(fmt.Sprintf("/v1/kv/elsewhere/%d", i), "x")
	}
	w.readSeed(t)
	w.agent.Stop()
	w.agent.Start()
	w.agent.RegisterService("books", "books-3", "10.0.0.3", 8080)
	goDemo := route.Route{ServiceName: "go-demo", ServicePath: []string{"/demo"}, PathType: route.PathBeg}
	if err := NewStore(w.direct, "").Put(testContext(t), goDemo); err != nil {
		t.Fatal(err)
	}
	r := startWatcher(t, w.c, w.store, HealthPassing, nil, func(wt *Watcher) {
		wt.timing.wait, wt.timing.seedWait = time.Minute, time.Second
		w.seed(t)(wt)
	})
	r.waitAll(t, 10*time.Second, map[string]func(Update) bool{
		"instances": instancesOf("books", inst("10.0.0.3", 8080)),
		"routes":    routesNamed("go-demo"),
	})
}

// A seed comes before Run.
func TestWatcherSeedAfterRun(t *testing.T) {
	t.Parallel()
	w := newSeededWorld(t)
	r := startWatcher(t, w.c, w.store, HealthPassing, []string{"books"}, nil)
	r.waitAll(t, 5*time.Second, map[string]func(Update) bool{
		"instances": instancesOf("books", inst("10.0.0.1", 8080)),
		"routes":    routesNamed("books"),
	})
	if err := r.w.SeedRoutes(w.table.Versions, w.table.Index); err == nil {
		t.Error("SeedRoutes after Run: no error")
	}
	if err := r.w.SeedCatalog(w.read, w.reported); err == nil {
		t.Error("SeedCatalog after Run: no error")
	}
}
