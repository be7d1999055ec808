package server

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/consul"
	"github.com/docker-flow-proxy/docker-flow-proxy/metrics"
	"github.com/docker-flow-proxy/docker-flow-proxy/proxy"
)

// outage is Consul's reachability as the watches see it, for the health endpoint.
type outage struct {
	mu    sync.Mutex
	err   error
	since time.Time
}

func (o *outage) set(err error, since time.Time) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.err, o.since = err, since
}

func (o *outage) get() (error, time.Time) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.err, o.since
}

// follow applies what the watches of Consul see: a routed service's instances changed, or the
// route table in KV changed (a reconfigure or remove on another replica). It keeps the watched
// services equal to the routed ones. It returns when ctx ends.
func (s *Server) follow(ctx context.Context, w *consul.Watcher) {
	watchRouted := func() { w.Services(s.proxy.ConsulServices()) }
	watchRouted()
	for {
		var u consul.Update
		select {
		case <-ctx.Done():
			return
		case u = <-w.Updates():
		}
		s.metrics.Consul(metrics.ConsulWatch, u.Err)
		if u.Err != nil {
			s.outage.set(u.Err, u.Since)
			s.log.Warn("consul unreachable; serving the last known state", "since", u.Since, "error", u.Err)
			continue
		}
		// The outage ends when every watch reads Consul again (Recovered), not with the first
		// state read again: a watch that reads again while others still fail is followed by the
		// outage's report again.
		if err, _ := s.outage.get(); err != nil && u.Recovered {
			s.outage.set(nil, time.Time{})
			s.log.Info("consul reachable again; converging to its state")
			// Every route and instance read again at once, rather than each watch in its own time.
			// A Consul that has just come back may not serve every read yet: retry until it does
			// (the watches' news waits, merged, meanwhile).
			for backoff := 250 * time.Millisecond; ; backoff = min(2*backoff, 2*time.Second) {
				// A starting Consul accepts requests before it answers them: wait, a second at a
				// time, until it has a leader, so that the reads of the convergence do not hang.
				pctx, cancel := context.WithTimeout(ctx, time.Second)
				err := s.consul.Ping(pctx)
				cancel()
				if err == nil {
					err = s.proxy.Reload(ctx, true)
					if err != nil && !errors.Is(err, proxy.ErrConsul) && ctx.Err() == nil {
						s.log.Error("converging to consul's state failed", "error", err)
						break
					}
				}
				if err == nil || ctx.Err() != nil {
					break
				}
				s.log.Warn("converging to consul's state failed; retrying", "error", err, "retry_in", backoff)
				if !sleep(ctx, backoff) {
					return
				}
			}
			watchRouted()
		}
		switch {
		case u.RoutesChanged:
			// The update is only the news of which folders of KV changed: the controller reads them
			// itself, in step with its own changes, so that an older snapshot never undoes a newer
			// request.
			if err := s.proxy.SyncFromKVSeen(ctx, u.Versions, u.Index); err != nil {
				s.log.Error("applying the route table from KV failed", "error", err)
			} else {
				s.metrics.WatchUpdate(metrics.WatchRoutes)
			}
			watchRouted()
		case u.Instances != nil:
			if err := s.proxy.UpdateInstances(ctx, u.Service, u.Instances); err != nil {
				s.log.Error("applying new instances failed", "service", u.Service, "error", err)
			} else {
				s.metrics.WatchUpdate(metrics.WatchInstances)
			}
		}
	}
}
