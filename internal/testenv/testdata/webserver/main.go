// Command webserver is the test image's program (see testenv.WebServerImage): a static HTTP
// server that says which container answered.
//
//   - listens on $PORT (default 8080) and on every port in $EXTRA_PORTS (comma list), all alike;
//   - answers "<hostname> <path>" to any path (in a container the hostname is its short id),
//     and 200 "ok" on /health;
//   - on SIGTERM (or SIGINT) stops serving and exits with $EXIT_CODE (default 0);
//   - with $EXIT_AFTER set (a Go duration such as "2s"), exits by itself with $EXIT_CODE after
//     that long.
package main

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	log.SetFlags(0)
	log.SetPrefix("webserver: ")

	exitCode := 0
	if v := os.Getenv("EXIT_CODE"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil {
			log.Fatalf("EXIT_CODE=%q: %v", v, err)
		}
		exitCode = n
	}
	var exitAfter <-chan time.Time
	if v := os.Getenv("EXIT_AFTER"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			log.Fatalf("EXIT_AFTER=%q: %v", v, err)
		}
		exitAfter = time.After(d)
	}

	host, err := os.Hostname()
	if err != nil {
		host = "unknown"
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/health", func(w http.ResponseWriter, r *http.Request) {
		_, _ = w.Write([]byte("ok"))
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = fmt.Fprintf(w, "%s %s", host, r.URL.Path)
	})

	ports := []string{"8080"}
	if v := os.Getenv("PORT"); v != "" {
		ports[0] = v
	}
	for _, p := range strings.Split(os.Getenv("EXTRA_PORTS"), ",") {
		if p = strings.TrimSpace(p); p != "" {
			ports = append(ports, p)
		}
	}

	var servers []*http.Server
	failed := make(chan error, len(ports))
	for _, p := range ports {
		addr := p
		if !strings.Contains(addr, ":") {
			addr = ":" + addr
		}
		l, err := net.Listen("tcp", addr)
		if err != nil {
			log.Fatalf("listen %s: %v", addr, err)
		}
		srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		servers = append(servers, srv)
		go func() {
			if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
				failed <- err
			}
		}()
		log.Printf("listening on %s as %s", l.Addr(), host)
	}

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	select {
	case s := <-sig:
		log.Printf("%v: exiting with %d", s, exitCode)
	case <-exitAfter:
		log.Printf("EXIT_AFTER elapsed: exiting with %d", exitCode)
	case err := <-failed:
		log.Fatalf("serve: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	for _, srv := range servers {
		_ = srv.Shutdown(ctx)
	}
	cancel()
	os.Exit(exitCode)
}
