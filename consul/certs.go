package consul

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/docker-flow-proxy/docker-flow-proxy/route"
)

// CertStore keeps the certificates (PEM files: chain and private key) in Consul KV, one key per file:
// <prefix>-certs/<name>.pem. The prefix is apart from the route table's (<prefix>/), so a
// certificate never reads as a route folder. A CertStore is safe for concurrent use.
type CertStore struct {
	c      *Client
	prefix string
}

// NewCertStore returns the store of the certificates of the proxies named prefix (PROXY_INSTANCE_NAME);
// an empty prefix is DefaultPrefix. The keys are under <prefix>-certs/.
func NewCertStore(c *Client, prefix string) *CertStore {
	return &CertStore{c: c, prefix: normalizePrefix(prefix) + "-certs"}
}

// Prefix is the KV folder of the certificates, without the trailing slash.
func (s *CertStore) Prefix() string { return s.prefix }

func (s *CertStore) key(name string) (string, error) {
	n, err := route.CertName(name)
	if err != nil {
		return "", err
	}
	if n != name {
		return "", fmt.Errorf("certificate name %q does not end with .pem", name)
	}
	return s.prefix + "/" + name, nil
}

// Put writes a certificate with one KV write. The PEM is not validated here: route.ValidateCert does.
func (s *CertStore) Put(ctx context.Context, name string, pem []byte) error {
	key, err := s.key(name)
	if err != nil {
		return fmt.Errorf("consul kv put certificate: %w", err)
	}
	err = s.c.do(ctx, func(ctx context.Context, a *api.Client) error {
		_, err := a.KV().Put(&api.KVPair{Key: key, Value: pem}, (&api.WriteOptions{}).WithContext(ctx))
		return err
	})
	if err != nil {
		return fmt.Errorf("consul kv put %s: %w", key, err)
	}
	return nil
}

// Get reads one certificate; the second result is false when there is none of that name.
func (s *CertStore) Get(ctx context.Context, name string) ([]byte, bool, error) {
	key, err := s.key(name)
	if err != nil {
		return nil, false, fmt.Errorf("consul kv get certificate: %w", err)
	}
	var pair *api.KVPair
	err = s.c.do(ctx, func(ctx context.Context, a *api.Client) error {
		var err error
		pair, _, err = a.KV().Get(key, fresh(ctx))
		return err
	})
	if err != nil {
		return nil, false, fmt.Errorf("consul kv get %s: %w", key, err)
	}
	if pair == nil {
		return nil, false, nil
	}
	return pair.Value, true, nil
}

// Delete removes a certificate; deleting one that does not exist is not an error.
func (s *CertStore) Delete(ctx context.Context, name string) error {
	key, err := s.key(name)
	if err != nil {
		return fmt.Errorf("consul kv delete certificate: %w", err)
	}
	err = s.c.do(ctx, func(ctx context.Context, a *api.Client) error {
		_, err := a.KV().Delete(key, (&api.WriteOptions{}).WithContext(ctx))
		return err
	})
	if err != nil {
		return fmt.Errorf("consul kv delete %s: %w", key, err)
	}
	return nil
}

// List reads every certificate with one KV call, by file name. Keys that are not a valid
// certificate name (deeper folders, names without .pem) are left out and named in the second result.
func (s *CertStore) List(ctx context.Context) (map[string][]byte, []string, error) {
	var pairs api.KVPairs
	err := s.c.do(ctx, func(ctx context.Context, a *api.Client) error {
		var err error
		pairs, _, err = a.KV().List(s.prefix+"/", fresh(ctx))
		return err
	})
	if err != nil {
		return nil, nil, fmt.Errorf("consul kv list %s/: %w", s.prefix, err)
	}
	out := map[string][]byte{}
	var skipped []string
	for _, p := range pairs {
		if p == nil {
			continue
		}
		name, _ := strings.CutPrefix(p.Key, s.prefix+"/")
		if name == "" {
			continue // the folder marker
		}
		if _, err := s.key(name); err != nil {
			skipped = append(skipped, p.Key)
			continue
		}
		out[name] = p.Value
	}
	return out, skipped, nil
}

// WaitChange blocks until the certificates folder in KV changes after index (a blocking query, at
// most wait long) and returns the folder's new index. Index 0 returns at once with the current one.
func (s *CertStore) WaitChange(ctx context.Context, index uint64, wait time.Duration) (uint64, error) {
	var meta *api.QueryMeta
	err := s.c.do(ctx, func(ctx context.Context, a *api.Client) error {
		var err error
		_, meta, err = a.KV().Keys(s.prefix+"/", "", from(ctx, index, wait))
		return err
	})
	if err != nil {
		return index, fmt.Errorf("consul kv watch %s/: %w", s.prefix, err)
	}
	return meta.LastIndex, nil
}
