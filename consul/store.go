package consul

import (
	"context"
	"errors"
	"fmt"
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
	pairs, err := s.list(ctx, s.prefix+"/")
	if err != nil {
		return nil, nil, fmt.Errorf("consul kv list %s/: %w", s.prefix, err)
	}
	routes, invalid := s.routesFrom(pairs)
	return routes, invalid, nil
}

// Get reads one route. The second result is false when the route has no keys. A route whose keys
// are not valid is an error.
func (s *Store) Get(ctx context.Context, service string) (route.Route, bool, error) {
	if err := checkServiceName(service); err != nil {
		return route.Route{}, false, err
	}
	pairs, err := s.list(ctx, s.folder(service))
	if err != nil {
		return route.Route{}, false, fmt.Errorf("consul kv get %s: %w", s.folder(service), err)
	}
	kv, ok := s.folders(pairs)[service]
	if !ok {
		return route.Route{}, false, nil
	}
	r, err := route.FromKV(service, kv)
	if err != nil {
		return route.Route{}, false, fmt.Errorf("consul kv get %s: %w", s.folder(service), err)
	}
	return r, true, nil
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
// do, and returns the version it left, for a later check-and-set (Restore): the ModifyIndex of the
// route's keys after a put, 0 after a delete.
func (s *Store) Write(ctx context.Context, service string, r *route.Route) (uint64, error) {
	if err := checkServiceName(service); err != nil {
		return 0, err
	}
	folder := s.folder(service)
	if r == nil {
		if _, err := s.txn(ctx, api.TxnOps{{KV: &api.KVTxnOp{Verb: api.KVDeleteTree, Key: folder}}}); err != nil {
			return 0, fmt.Errorf("consul kv delete %s: %w", folder, err)
		}
		return 0, nil
	}
	if err := r.Validate(); err != nil {
		return 0, fmt.Errorf("consul kv put %s: %w", folder, err)
	}
	resp, err := s.txn(ctx, putOps(folder, *r))
	if err != nil {
		return 0, fmt.Errorf("consul kv put %s: %w", folder, err)
	}
	for _, res := range resp.Results {
		if res != nil && res.KV != nil && res.KV.Key == folder+versionKey {
			return res.KV.ModifyIndex, nil
		}
	}
	return 0, fmt.Errorf("consul kv put %s: the transaction's answer lacks %s", folder, versionKey)
}

// Restore puts back in one transaction what a route's folder held before a write (prev, nil for no
// route), but only if the folder is still as that write left it (check-and-set on the version
// Write returned): a newer write by another replica is never undone. It reports whether it restored.
func (s *Store) Restore(ctx context.Context, service string, prev *route.Route, version uint64) (bool, error) {
	if err := checkServiceName(service); err != nil {
		return false, err
	}
	folder := s.folder(service)
	check := &api.KVTxnOp{Verb: api.KVCheckNotExists, Key: folder + versionKey}
	if version != 0 {
		check = &api.KVTxnOp{Verb: api.KVCheckIndex, Key: folder + versionKey, Index: version}
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

func (s *Store) list(ctx context.Context, prefix string) (api.KVPairs, error) {
	var pairs api.KVPairs
	err := s.c.do(ctx, func(ctx context.Context, a *api.Client) error {
		var err error
		pairs, _, err = a.KV().List(prefix, (&api.QueryOptions{}).WithContext(ctx))
		return err
	})
	return pairs, err
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
		ok, resp, _, err := a.Txn().Txn(ops, (&api.QueryOptions{}).WithContext(ctx))
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

// folders groups KV pairs by route folder: <prefix>/<service>/<key> gives folders[service][key].
// Keys directly under the prefix, folder markers ("<service>/") and deeper keys are left out.
func (s *Store) folders(pairs api.KVPairs) map[string]map[string]string {
	out := map[string]map[string]string{}
	for _, p := range pairs {
		if p == nil {
			continue
		}
		rel, ok := strings.CutPrefix(p.Key, s.prefix+"/")
		if !ok {
			continue
		}
		name, key, ok := strings.Cut(rel, "/")
		if !ok || key == "" || strings.Contains(key, "/") {
			continue
		}
		if out[name] == nil {
			out[name] = map[string]string{}
		}
		out[name][key] = string(p.Value)
	}
	return out
}
