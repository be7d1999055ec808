package testenv

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// BuildProxy builds cmd/docker-flow-proxy into dir, static (CGO_ENABLED=0: it also runs on the
// hosts and in the images that tests make), and returns the binary's path. The build is bounded
// by five minutes; a failed build stops t.
func BuildProxy(t testing.TB, dir string) string {
	t.Helper()
	bin := filepath.Join(dir, "docker-flow-proxy")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-o", bin, "./cmd/docker-flow-proxy")
	cmd.Dir = ModuleRoot(t)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/docker-flow-proxy: %v\n%s", err, out)
	}
	return bin
}
