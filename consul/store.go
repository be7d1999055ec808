package consul

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"

	"github.com/hashicorp/consul/api"

	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

// DefaultPrefix is the KV prefix when PROXY_INSTANCE_NAME is unset, as in the original product.
const DefaultPrefix = "docker-flow"

// Store keeps the route table in Consul KV, one folder per route: <prefix>/<service>/<key>, with
// the keys of route.Route.KV. Several proxies share one Consul with different prefixes.
// A Store is safe for concurrent use.
type Store struct {
	c      *Client
	prefix string
}

// NewStore returns the store of the routes under prefix (PROXY_INSTANCE_NAME); an empty prefix is
// DefaultPrefix. Leading and trailing slashes are dropped.
func NewStore(c *Client, prefix string) *Store {
	return &Store{c: c, prefix: normalizePrefix(prefix)}
}

// normalizePrefix drops spaces and slashes around a KV prefix; empty is DefaultPrefix.
func normalizePrefix(prefix string) string {
	prefix = strings.Trim(strings.TrimSpace(prefix), "/")
	if prefix == "" {
		return DefaultPrefix
	}
	return prefix
}

// Prefix is the KV prefix of the store's routes.
func (s *Store) Prefix() string { return s.prefix }

func (s *Store) folder(service string) string { return s.prefix + "/" + service + "/" }

// List reads every route under the prefix with one KV call, sorted by name. A folder whose keys do
// not make a valid route is left out and reported in the second result, sorted by name; it never
// fails the whole list. Keys directly under the prefix and deeper folders are ignored.
func (s *Store) List(ctx context.Context) ([]route.Route, []error, error) {
	t, err := s.Table(ctx)
	return t.Routes, t.Invalid, err
}

// Table reads the whole route table with one KV call: the routes, as List returns them, the
// version of every folder, and Consul's index of the read.
func (s *Store) Table(ctx context.Context) (route.KVTable, error) {
	pairs, index, err := s.list(ctx, s.prefix+"/")
	if err != nil {
		return route.KVTable{}, fmt.Errorf("consul kv list %s/: %w", s.prefix, err)
	}
	t := s.tableOf(pairs)
	t.Index = index
	return t, nil
}

// maxTxnOps is the number of operations Consul takes in one transaction.
const maxTxnOps = 64

// Folders reads the folders of some routes, as Table reads the whole table: a read transaction
// per 64 folders, so that a few folders cost a few requests whatever the size of the table. A
// folder without keys is in none of the results.
func (s *Store) Folders(ctx context.Context, services []string) (route.KVTable, error) {
	var pairs []kvEntry
	for chunk := range slices.Chunk(services, maxTxnOps) {
		ops := make(api.TxnOps, 0, len(chunk))
		for _, name := range chunk {
			if err := checkServiceName(name); err != nil {
				return route.KVTable{}, err
			}
			ops = append(ops, &api.TxnOp{KV: &api.KVTxnOp{Verb: api.KVGetTree, Key: s.folder(name)}})
		}
		resp, err := s.txn(ctx, ops)
		if err != nil {
			return route.KVTable{}, fmt.Errorf("consul kv read %d folders under %s/: %w", len(chunk), s.prefix, err)
		}
		for _, res := range resp.Results {
			if res != nil && res.KV != nil {
				pairs = append(pairs, kvEntry{Key: res.KV.Key, Value: res.KV.Value, ModifyIndex: res.KV.ModifyIndex})
			}
		}
	}
	return s.tableOf(pairs), nil
}

// Get reads one route. The second result is false when the route has no keys. A route whose keys
// are not valid is an error.
func (s *Store) Get(ctx context.Context, service string) (route.Route, bool, error) {
	if err := checkServiceName(service); err != nil {
		return route.Route{}, false, err
	}
	pairs, _, err := s.list(ctx, s.folder(service))
	if err != nil {
		return route.Route{}, false, fmt.Errorf("consul kv get %s: %w", s.folder(service), err)
	}
	t := s.tableOf(pairs)
	switch {
	case len(t.Invalid) > 0:
		return route.Route{}, false, t.Invalid[0]
	case len(t.Routes) == 0:
		return route.Route{}, false, nil
	}
	return t.Routes[0], true, nil
}

// Put validates the route and writes it in one transaction: the route's folder is deleted and each
// key of r.KV is set, so keys of an older version of the route disappear and a failure never leaves
// half a route.
func (s *Store) Put(ctx context.Context, r route.Route) error {
	_, err := s.Write(ctx, r.ServiceName, &r)
	return err
}

// Delete removes a route's folder in one transaction. Deleting a route that does not exist is not
// an error. The folder is deleted with its trailing slash: deleting "books" leaves "books-ms".
func (s *Store) Delete(ctx context.Context, service string) error {
	_, err := s.Write(ctx, service, nil)
	return err
}

// versionKey is the key every route has (route.Route.KV always sets it): its ModifyIndex tells
// whether the folder changed since a write.
const versionKey = route.KeySkipCheck

// Write puts the route (r != nil) or deletes it (r == nil) in one transaction, as Put and Delete
// do, and returns the version of the folder it left (the zero version after a delete), which a
// later check-and-set (Restore) takes, and which the folder has in Table as long as nobody writes it.
func (s *Store) Write(ctx context.Context, service string, r *route.Route) (route.KVVersion, error) {
	if err := checkServiceName(service); err != nil {
		return route.KVVersion{}, err
	}
	folder := s.folder(service)
	if r == nil {
		if _, err := s.txn(ctx, api.TxnOps{{KV: &api.KVTxnOp{Verb: api.KVDeleteTree, Key: folder}}}); err != nil {
			return route.KVVersion{}, fmt.Errorf("consul kv delete %s: %w", folder, err)
		}
		return route.KVVersion{}, nil
	}
	if err := r.Validate(); err != nil {
		return route.KVVersion{}, fmt.Errorf("consul kv put %s: %w", folder, err)
	}
	ops := putOps(folder, *r)
	resp, err := s.txn(ctx, ops)
	if err != nil {
		return route.KVVersion{}, fmt.Errorf("consul kv put %s: %w", folder, err)
	}
	for _, res := range resp.Results {
		if res != nil && res.KV != nil && res.KV.Key == folder+versionKey {
			// Every key is written by this transaction, so all have its index.
			return route.KVVersion{Index: res.KV.ModifyIndex, Keys: len(ops) - 1}, nil
		}
	}
	return route.KVVersion{}, fmt.Errorf("consul kv put %s: the transaction's answer lacks %s", folder, versionKey)
}

// Restore puts back in one transaction what a route's folder held before a write (prev, nil for no
// route), but only if the folder is still as that write left it (check-and-set on the version
// Write returned): a newer write by another replica is never undone. It reports whether it restored.
func (s *Store) Restore(ctx context.Context, service string, prev *route.Route, version route.KVVersion) (bool, error) {
	if err := checkServiceName(service); err != nil {
		return false, err
	}
	folder := s.folder(service)
	check := &api.KVTxnOp{Verb: api.KVCheckNotExists, Key: folder + versionKey}
	if version.Index != 0 {
		check = &api.KVTxnOp{Verb: api.KVCheckIndex, Key: folder + versionKey, Index: version.Index}
	}
	ops := api.TxnOps{{KV: check}}
	if prev == nil {
		ops = append(ops, &api.TxnOp{KV: &api.KVTxnOp{Verb: api.KVDeleteTree, Key: folder}})
	} else {
		ops = append(ops, putOps(folder, *prev)...)
	}
	_, err := s.txn(ctx, ops)
	var rb *rolledBack
	switch {
	case errors.As(err, &rb) && rb.op == 0:
		return false, nil // the folder changed since: the newer write stays
	case err != nil:
		return false, fmt.Errorf("consul kv restore %s: %w", folder, err)
	}
	return true, nil
}

func putOps(folder string, r route.Route) api.TxnOps {
	kv := r.KV()
	keys := make([]string, 0, len(kv))
	for k := range kv {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	ops := api.TxnOps{{KV: &api.KVTxnOp{Verb: api.KVDeleteTree, Key: folder}}}
	for _, k := range keys {
		ops = append(ops, &api.TxnOp{KV: &api.KVTxnOp{Verb: api.KVSet, Key: folder + k, Value: []byte(kv[k])}})
	}
	return ops
}

// list reads the keys under prefix, and Consul's index of the read.
func (s *Store) list(ctx context.Context, prefix string) ([]kvEntry, uint64, error) {
	var (
		entries []kvEntry
		index   uint64
	)
	// The listing's body comes to body (see bodySink): at 10,000 routes it is 6 MB of JSON.
	body := &bytes.Buffer{}
	err := s.c.do(ctx, func(ctx context.Context, a *api.Client) error {
		body.Reset() // Consul's 404 (no key under the prefix) leaves it empty
		_, meta, err := a.KV().List(prefix, fresh(withBodySink(ctx, body)))
		if err != nil {
			return err
		}
		if meta != nil {
			index = meta.LastIndex
		}
		entries = nil
		if body.Len() > 0 {
			entries, err = parseKVEntries(body.Bytes(), true)
		}
		return err
	})
	return entries, index, err
}

// rolledBack is a transaction that Consul refused: op is the index of the first failed operation.
type rolledBack struct {
	op    int
	whats []string
}

func (e *rolledBack) Error() string {
	return "transaction rolled back: " + strings.Join(e.whats, "; ")
}

func (s *Store) txn(ctx context.Context, ops api.TxnOps) (*api.TxnResponse, error) {
	var out *api.TxnResponse
	err := s.c.do(ctx, func(ctx context.Context, a *api.Client) error {
		ok, resp, _, err := a.Txn().Txn(ops, fresh(ctx)) // consistent for a transaction of reads only
		if err != nil {
			return err
		}
		if !ok {
			rb := &rolledBack{op: -1}
			if resp != nil {
				for _, e := range resp.Errors {
					if rb.op < 0 {
						rb.op = e.OpIndex
					}
					rb.whats = append(rb.whats, fmt.Sprintf("op %d: %s", e.OpIndex, e.What))
				}
			}
			return rb
		}
		out = resp
		return nil
	})
	return out, err
}

// folderKey splits a key under the prefix: <prefix>/<service>/<key> gives service and key. Keys
// directly under the prefix, folder markers ("<service>/") and deeper keys are no route's (ok false).
func (s *Store) folderKey(k string) (service, key string, ok bool) {
	rel, ok := strings.CutPrefix(k, s.prefix+"/")
	if !ok {
		return "", "", false
	}
	service, key, ok = strings.Cut(rel, "/")
	if !ok || key == "" || strings.Contains(key, "/") {
		return "", "", false
	}
	return service, key, true
}

// tableOf turns KV pairs under the prefix into the route table: the folders that are valid routes,
// sorted by name, the errors of the others, and the version of each.
func (s *Store) tableOf(pairs []kvEntry) route.KVTable {
	folders := map[string]map[string]string{}
	t := route.KVTable{Versions: map[string]route.KVVersion{}}
	for _, p := range pairs {
		name, key, ok := s.folderKey(p.Key)
		if !ok {
			continue
		}
		if folders[name] == nil {
			folders[name] = map[string]string{}
		}
		folders[name][key] = string(p.Value)
		t.Versions[name] = addKey(t.Versions[name], p.ModifyIndex)
	}
	names := make([]string, 0, len(folders))
	for name := range folders {
		names = append(names, name)
	}
	sort.Strings(names)
	t.Routes = make([]route.Route, 0, len(names))
	for _, name := range names {
		r, err := route.FromKV(name, folders[name])
		if err != nil {
			t.Invalid = append(t.Invalid, fmt.Errorf("consul kv %s: %w", s.folder(name), err))
			continue
		}
		t.Routes = append(t.Routes, r)
	}
	return t
}

// versionsOf is the version of every folder of the keys of a listing of the prefix, as tableOf
// gives them.
func (s *Store) versionsOf(keys []kvEntry) map[string]route.KVVersion {
	out := map[string]route.KVVersion{}
	for _, p := range keys {
		if name, _, ok := s.folderKey(p.Key); ok {
			out[name] = addKey(out[name], p.ModifyIndex)
		}
	}
	return out
}

// addKey is the version of a folder with one more key, of the given ModifyIndex.
func addKey(v route.KVVersion, modifyIndex uint64) route.KVVersion {
	return route.KVVersion{Index: max(v.Index, modifyIndex), Keys: v.Keys + 1}
}
