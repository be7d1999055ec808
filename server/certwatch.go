package server

import (
	"context"
	"errors"
	"time"
)

// certWaitTime bounds one blocking query of the certificates folder.
const certWaitTime = 5 * time.Minute

// followCerts keeps the certificates folder in step with KV while the server runs: a certificate
// that another replica stored (PUT /cert, serviceCert) is written here and served after a validated
// reload. It returns when ctx ends.
func (s *Server) followCerts(ctx context.Context) {
	var index uint64
	backoff := 250 * time.Millisecond
	for {
		next, err := s.certs.WaitChange(ctx, index, certWaitTime)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			s.log.Warn("watching the certificates in consul failed; retrying", "error", err, "retry_in", backoff)
			if !sleep(ctx, backoff) {
				return
			}
			backoff = min(2*backoff, time.Second)
			continue
		}
		backoff = 250 * time.Millisecond
		if next < index {
			next = 0 // the index went back (Consul's state was reset): read from the start
		}
		if next == index {
			continue
		}
		// The first answer also catches a certificate stored between the start's read and now.
		index = next
		if err := s.syncCertsFromKV(ctx); err != nil && !errors.Is(err, context.Canceled) {
			s.log.Error("serving the certificates of KV failed", "error", err)
		}
	}
}

// syncCertsFromKV writes the certificates of KV to the folder and, when one changed, makes HAProxy
// load them.
func (s *Server) syncCertsFromKV(ctx context.Context) error {
	before, _ := pemFiles(s.cfg.CertsDir)
	changed, err := s.writeChangedCerts(ctx)
	if err != nil {
		return err
	}
	if changed == 0 {
		return nil
	}
	after, _ := pemFiles(s.cfg.CertsDir)
	s.log.Info("certificates changed in KV; reloading", "written", changed, "before", len(before), "after", len(after))
	return s.proxy.RefreshCerts(ctx, s.hasCerts())
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
