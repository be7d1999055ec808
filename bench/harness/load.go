package harness

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	neturl "net/url"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// distinctMark, in a load's URL, is where each request puts a token of its own.
const distinctMark = "{n}"

type loadResult struct {
	rps    float64
	total  int64
	failed int64 // non-2xx/3xx answers and socket errors
}

// checkWrk finds wrk. Without it, the Go load generator stands in, unless RequireWrk.
func (h *harness) checkWrk() error {
	bin := h.cfg.Wrk
	if bin == "" {
		bin = "wrk"
	}
	p, err := exec.LookPath(bin)
	if err != nil {
		if h.cfg.RequireWrk {
			return fmt.Errorf("wrk is required (CI=true) but not found (%v): apt-get install -y wrk", err)
		}
		h.say("wrk not found (%v): the Go load generator measures requests per second instead", err)
		return nil
	}
	h.wrk = p
	return nil
}

// load sends keep-alive requests to url, with the Host header host unless it is empty, for d from
// Connections connections. Where url holds distinctMark, each request puts a token of its own there
// (see Config.DistinctPaths).
func (h *harness) load(ctx context.Context, url, host string, d time.Duration) (loadResult, error) {
	if h.wrk != "" {
		return h.runWrk(ctx, url, host, d)
	}
	return goLoad(ctx, url, host, h.cfg.Connections, d)
}

var (
	wrkRPS      = regexp.MustCompile(`Requests/sec:\s+([0-9.]+)`)
	wrkTotal    = regexp.MustCompile(`(\d+) requests in`)
	wrkNon2xx   = regexp.MustCompile(`Non-2xx or 3xx responses: (\d+)`)
	wrkSocketEr = regexp.MustCompile(`Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)`)
)

func (h *harness) runWrk(ctx context.Context, url, host string, d time.Duration) (loadResult, error) {
	ctx, cancel := context.WithTimeout(ctx, d+30*time.Second)
	defer cancel()
	secs := max(int(d.Round(time.Second)/time.Second), 1)
	args := []string{"-t2", "-c" + strconv.Itoa(h.cfg.Connections), "-d" + strconv.Itoa(secs) + "s", "--timeout", "5s"}
	if host != "" {
		args = append(args, "-H", "Host: "+host)
	}
	if before, after, ok := strings.Cut(url, distinctMark); ok {
		// A Lua script gives each request a path of its own: the thread's number and a counter.
		u, err := neturl.Parse(before)
		if err != nil {
			return loadResult{}, fmt.Errorf("wrk %s: %w", url, err)
		}
		script, err := os.CreateTemp("", "dfp-bench-*.lua")
		if err != nil {
			return loadResult{}, fmt.Errorf("wrk script: %w", err)
		}
		defer os.Remove(script.Name())
		_, err = fmt.Fprintf(script, `local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
local n = 0
function request()
  n = n + 1
  return wrk.format(nil, %q .. tid .. "-" .. n .. %q)
end
`, u.EscapedPath(), after)
		if cerr := script.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return loadResult{}, fmt.Errorf("wrk script: %w", err)
		}
		args = append(args, "-s", script.Name())
		url = u.Scheme + "://" + u.Host + "/"
	}
	cmd := exec.CommandContext(ctx, h.wrk, append(args, url)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return loadResult{}, fmt.Errorf("wrk %s: %w: %s", url, err, out)
	}
	return parseWrk(string(out))
}

func parseWrk(out string) (loadResult, error) {
	var r loadResult
	m := wrkRPS.FindStringSubmatch(out)
	if m == nil {
		return r, fmt.Errorf("wrk printed no Requests/sec: %s", out)
	}
	r.rps, _ = strconv.ParseFloat(m[1], 64)
	if m := wrkTotal.FindStringSubmatch(out); m != nil {
		r.total, _ = strconv.ParseInt(m[1], 10, 64)
	}
	if m := wrkNon2xx.FindStringSubmatch(out); m != nil {
		n, _ := strconv.ParseInt(m[1], 10, 64)
		r.failed += n
	}
	if m := wrkSocketEr.FindStringSubmatch(out); m != nil {
		for _, s := range m[1:] {
			n, _ := strconv.ParseInt(s, 10, 64)
			r.failed += n
		}
	}
	return r, nil
}

// goLoad is the stand-in for wrk: conns goroutines, each with its own keep-alive connection.
func goLoad(ctx context.Context, url, host string, conns int, d time.Duration) (loadResult, error) {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	var total, failed, seq atomic.Int64
	var wg sync.WaitGroup
	var once sync.Once
	var firstErr error
	start := time.Now()
	for g := 0; g < conns; g++ {
		c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 1}}
		wg.Go(func() {
			defer c.CloseIdleConnections()
			for ctx.Err() == nil {
				u := url
				if strings.Contains(u, distinctMark) {
					u = strings.Replace(u, distinctMark, strconv.FormatInt(seq.Add(1), 10), 1)
				}
				req, err := http.NewRequestWithContext(context.WithoutCancel(ctx), http.MethodGet, u, nil)
				if err != nil {
					once.Do(func() { firstErr = err })
					return
				}
				if host != "" {
					req.Host = host
				}
				resp, err := c.Do(req)
				total.Add(1)
				if err != nil {
					failed.Add(1)
					continue
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode >= 400 {
					failed.Add(1)
				}
			}
		})
	}
	wg.Wait()
	if firstErr != nil {
		return loadResult{}, firstErr
	}
	elapsed := time.Since(start)
	if total.Load() == 0 {
		return loadResult{}, errors.New("no request completed")
	}
	return loadResult{rps: float64(total.Load()) / elapsed.Seconds(), total: total.Load(), failed: failed.Load()}, nil
}
