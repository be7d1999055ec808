package haproxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// dialRetry bounds how long Command keeps retrying a socket that refuses connections (the master
// CLI does so while HAProxy re-executes itself during a reload), unless ctx ends earlier.
const dialRetry = 2 * time.Second

// Command sends one command to an HAProxy CLI unix socket (the master CLI, or a stats socket for
// the runtime API) and returns the whole answer. A refused or missing socket is retried briefly;
// the command is never sent twice. ctx bounds the whole exchange.
func Command(ctx context.Context, socketPath, cmd string) (string, error) {
	out, err := query(ctx, socketPath, cmd, dialRetry)
	if err != nil {
		return "", fmt.Errorf("haproxy cli %q on %s: %w", cmd, socketPath, err)
	}
	return out, nil
}

// query dials socketPath, retrying refused connections for up to retryFor (0: one attempt), then
// writes cmd, half-closes (HAProxy answers only after that) and reads the answer to EOF.
func query(ctx context.Context, socketPath, cmd string, retryFor time.Duration) (string, error) {
	conn, err := dialUnix(ctx, socketPath, retryFor)
	if err != nil {
		return "", err
	}
	defer conn.Close()

	if dl, ok := ctx.Deadline(); ok {
		if err := conn.SetDeadline(dl); err != nil {
			return "", err
		}
	}
	// A context without deadline can still be cancelled: unblock the I/O when it is.
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	if _, err := io.WriteString(conn, cmd+"\n"); err != nil {
		return "", ctxErr(ctx, fmt.Errorf("write: %w", err))
	}
	if err := conn.CloseWrite(); err != nil {
		return "", ctxErr(ctx, fmt.Errorf("half-close: %w", err))
	}
	answer, err := io.ReadAll(conn)
	if err != nil {
		return "", ctxErr(ctx, fmt.Errorf("read: %w", err))
	}
	return string(answer), nil
}

func dialUnix(ctx context.Context, socketPath string, retryFor time.Duration) (*net.UnixConn, error) {
	var d net.Dialer
	giveUp := time.Now().Add(retryFor)
	pause := 5 * time.Millisecond
	for {
		conn, err := d.DialContext(ctx, "unix", socketPath)
		if err == nil {
			return conn.(*net.UnixConn), nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if !refused(err) || time.Now().Add(pause).After(giveUp) {
			return nil, fmt.Errorf("connect: %w", err)
		}
		t := time.NewTimer(pause)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		case <-t.C:
		}
		pause = min(2*pause, 100*time.Millisecond)
	}
}

// refused reports whether a dial error means "nobody listens right now" (worth retrying).
func refused(err error) bool {
	return errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ENOENT) ||
		errors.Is(err, syscall.EAGAIN)
}

// ctxErr prefers the context's error when the context ended: the I/O error is then only its echo.
func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}

// ProcInfo is the master CLI's `show proc`.
type ProcInfo struct {
	MasterPID     int
	Reloads       int   // reloads of the master since it started, failed ones included
	FailedReloads int   // consecutive failed reloads; a successful reload resets it to 0
	Workers       []int // current workers
	OldWorkers    []int // workers from before a reload that still finish their connections
}

// ParseShowProc parses `show proc` of HAProxy 2.6:
//
//	#<PID>          <type>          <reloads>       <uptime>        <version>
//	1234            master          1 [failed: 0]   0d00h00m10s     2.6.12-1+deb12u4
//	# workers
//	1240            worker          0               0d00h00m02s     2.6.12-1+deb12u4
//	# old workers
//	1236            worker          1               0d00h00m08s     2.6.12-1+deb12u4
//	# programs
func ParseShowProc(s string) (ProcInfo, error) {
	var info ProcInfo
	section := ""
	master := false
	for _, line := range strings.Split(s, "\n") {
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		if strings.HasPrefix(line, "#") {
			section = strings.TrimSpace(strings.TrimPrefix(line, "#"))
			continue
		}
		f := strings.Fields(line)
		if len(f) < 3 {
			return ProcInfo{}, fmt.Errorf("show proc: unexpected line %q", line)
		}
		pid, err := strconv.Atoi(f[0])
		if err != nil {
			return ProcInfo{}, fmt.Errorf("show proc: bad pid in %q", line)
		}
		switch f[1] {
		case "master":
			// 1234 master 1 [failed: 0] 0d00h00m10s 2.6.12
			if len(f) < 5 || f[3] != "[failed:" {
				return ProcInfo{}, fmt.Errorf("show proc: unexpected master line %q", line)
			}
			reloads, err1 := strconv.Atoi(f[2])
			failed, err2 := strconv.Atoi(strings.TrimSuffix(f[4], "]"))
			if err1 != nil || err2 != nil {
				return ProcInfo{}, fmt.Errorf("show proc: bad reload counters in %q", line)
			}
			info.MasterPID, info.Reloads, info.FailedReloads = pid, reloads, failed
			master = true
		case "worker":
			if section == "old workers" {
				info.OldWorkers = append(info.OldWorkers, pid)
			} else {
				info.Workers = append(info.Workers, pid)
			}
		}
	}
	if !master {
		return ProcInfo{}, fmt.Errorf("show proc: no master line in %q", s)
	}
	return info, nil
}
