package testenv

// Docker helpers: a client for the local engine, images built FROM scratch out of a Go package of
// this module (no registry is needed), docker-compose (the v1 tool) runs, and the removal of what
// a test started. Like the other parts, a missing engine or docker-compose skips a test outside CI
// and fails it under CI=true.

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	cerrdefs "github.com/containerd/errdefs"
	"github.com/docker/docker/api/types/build"
	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/filters"
	"github.com/docker/docker/api/types/network"
	"github.com/docker/docker/client"
)

const (
	// TestLabel is the label whose value names the test that started a container (see LabelFor).
	TestLabel = "dfp-test"
	// RunLabel is the label whose value is unique to one test binary, so that two packages with a
	// test of the same name never remove each other's containers.
	RunLabel = "dfp-test.run"

	// WebServerTag is the tag of the image that WebServerImage builds.
	WebServerTag = "dfp-test/webserver:latest"

	pingTimeout    = 10 * time.Second
	goBuildTimeout = 5 * time.Minute
	buildTimeout   = 2 * time.Minute
	composeTimeout = 120 * time.Second
	cleanupTimeout = 60 * time.Second
)

// newDockerClient is the client of Docker and of the cleanups: DOCKER_HOST and friends from the
// environment (default unix:///var/run/docker.sock), API version negotiated with the engine.
func newDockerClient() (*client.Client, error) {
	return client.NewClientWithOpts(client.FromEnv, client.WithAPIVersionNegotiation())
}

// Docker returns a client for the local Docker engine once it answered a ping (within 10 s),
// with the API version negotiated, so that a newer client works with an older engine. The client
// is closed when the test ends. No engine: Require.
func Docker(t testing.TB) *client.Client {
	t.Helper()
	cli, err := newDockerClient()
	if err != nil {
		Require(t, "a Docker engine", err.Error())
	}
	ctx, cancel := context.WithTimeout(context.Background(), pingTimeout)
	defer cancel()
	ping, err := cli.Ping(ctx)
	if err != nil {
		_ = cli.Close()
		Require(t, "a Docker engine", fmt.Sprintf("no answer from %s within %v: %v", cli.DaemonHost(), pingTimeout, err))
	}
	cli.NegotiateAPIVersionPing(ping)
	t.Cleanup(func() { _ = cli.Close() })
	return cli
}

// ModuleRoot returns the directory of this module's go.mod, found by walking up from the working
// directory (a test runs in its package's directory).
func ModuleRoot(t testing.TB) string {
	t.Helper()
	root, err := moduleRoot()
	if err != nil {
		t.Fatal(err)
	}
	return root
}

func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory")
		}
		dir = parent
	}
}

// An imageBuild is one build of a tag in this test binary; waiters block on done.
type imageBuild struct {
	key  string // pkgDir and exposed ports: a tag is built from one package only
	done chan struct{}
	err  error
}

var (
	buildsMu sync.Mutex
	builds   = map[string]*imageBuild{}
	// buildCount counts the builds really made per tag (the tests check the cache with it).
	buildCount = map[string]int{}
)

// BuildImage builds the image tag FROM scratch, holding the static Go program (CGO_ENABLED=0)
// built from the Go package in pkgDir as its ENTRYPOINT, with EXPOSE for each of exposed
// ("8080/tcp", "53/udp"), and returns tag. A relative pkgDir is taken from the module root
// ("internal/testenv/testdata/webserver"), or else from the test's package directory
// ("testdata/webserver"). The build goes through the engine's API with the build context made in
// memory, with no docker CLI and no registry. It is made once per test binary and tag: the tests
// that ask for it meanwhile, in parallel too, wait for it and share its result.
func BuildImage(t testing.TB, tag, pkgDir string, exposed ...string) string {
	t.Helper()
	cli := Docker(t)
	key := pkgDir + " " + strings.Join(exposed, ",")

	buildsMu.Lock()
	b, found := builds[tag]
	if !found {
		b = &imageBuild{key: key, done: make(chan struct{})}
		builds[tag] = b
	}
	buildsMu.Unlock()
	if found && b.key != key {
		t.Fatalf("image %s: asked from %q, already built from %q in this test binary", tag, key, b.key)
	}

	if !found {
		start := time.Now()
		func() {
			defer close(b.done)
			b.err = buildImage(cli, tag, pkgDir, exposed)
		}()
		buildsMu.Lock()
		buildCount[tag]++
		buildsMu.Unlock()
		if b.err == nil {
			t.Logf("built image %s from %s in %v", tag, pkgDir, time.Since(start).Round(time.Millisecond))
		}
	} else {
		<-b.done // each step of the build is bounded
	}
	if b.err != nil {
		t.Fatalf("build image %s from %s: %v", tag, pkgDir, b.err)
	}
	return tag
}

// WebServerImage returns the image of internal/testenv/testdata/webserver (see its doc: it
// answers "<hostname> <path>" on 8080/tcp), built once per test binary.
func WebServerImage(t testing.TB) string {
	t.Helper()
	return BuildImage(t, WebServerTag, "internal/testenv/testdata/webserver", "8080/tcp")
}

var (
	exposedRE     = regexp.MustCompile(`^[0-9]{1,5}(/(tcp|udp|sctp))?$`)
	fileNameRE    = regexp.MustCompile(`^[A-Za-z0-9_.-]+$`)
	composeDropRE = regexp.MustCompile(`[^-_a-z0-9]`) // what docker-compose v1 drops from a project name
)

func buildImage(cli *client.Client, tag, pkgDir string, exposed []string) error {
	for _, p := range exposed {
		if !exposedRE.MatchString(p) {
			return fmt.Errorf("exposed port %q: want PORT/PROTO such as 8080/tcp", p)
		}
	}
	dir, err := resolvePkgDir(pkgDir)
	if err != nil {
		return err
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		if root := os.Getenv("GOROOT"); root != "" {
			goBin = filepath.Join(root, "bin", "go")
		} else {
			return fmt.Errorf("the go command is needed to build the image: %v", err)
		}
	}

	tmp, err := os.MkdirTemp("", "dfp-image-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	name := "app"
	if base := filepath.Base(dir); fileNameRE.MatchString(base) {
		name = base
	}
	bin := filepath.Join(tmp, name)

	ctx, cancel := context.WithTimeout(context.Background(), goBuildTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, goBin, "build", "-trimpath", "-ldflags=-s -w", "-o", bin, ".")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+runtime.GOARCH)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build in %s: %v\n%s", dir, err, out)
	}
	binary, err := os.ReadFile(bin)
	if err != nil {
		return err
	}

	var df strings.Builder
	df.WriteString("FROM scratch\n")
	fmt.Fprintf(&df, "COPY %s /%s\n", name, name)
	for _, p := range exposed {
		fmt.Fprintf(&df, "EXPOSE %s\n", p)
	}
	fmt.Fprintf(&df, "ENTRYPOINT [\"/%s\"]\n", name)
	buildCtx, err := tarContext(map[string]tarEntry{
		"Dockerfile": {data: []byte(df.String()), mode: 0o644},
		name:         {data: binary, mode: 0o755},
	})
	if err != nil {
		return err
	}

	ctx, cancel = context.WithTimeout(context.Background(), buildTimeout)
	defer cancel()
	resp, err := cli.ImageBuild(ctx, buildCtx, build.ImageBuildOptions{
		Tags:        []string{tag},
		Dockerfile:  "Dockerfile",
		Remove:      true,
		ForceRemove: true,
		Version:     build.BuilderV1, // the engine's own builder: 20.10 has no BuildKit by default
		Labels:      map[string]string{TestLabel + ".image": pkgDir},
	})
	if err != nil {
		return fmt.Errorf("image build: %w", err)
	}
	defer resp.Body.Close()
	if err := readBuildOutput(resp.Body); err != nil {
		return err
	}
	if _, err := cli.ImageInspect(ctx, tag); err != nil {
		return fmt.Errorf("image %s after its build: %w", tag, err)
	}
	return nil
}

// resolvePkgDir makes pkgDir absolute: from the module root, else from the working directory.
func resolvePkgDir(pkgDir string) (string, error) {
	if filepath.IsAbs(pkgDir) {
		return pkgDir, nil
	}
	var tried []string
	if root, err := moduleRoot(); err == nil {
		d := filepath.Join(root, pkgDir)
		if st, err := os.Stat(d); err == nil && st.IsDir() {
			return d, nil
		}
		tried = append(tried, d)
	}
	if d, err := filepath.Abs(pkgDir); err == nil {
		if st, err := os.Stat(d); err == nil && st.IsDir() {
			return d, nil
		}
		tried = append(tried, d)
	}
	return "", fmt.Errorf("package directory %q not found (tried %s)", pkgDir, strings.Join(tried, ", "))
}

type tarEntry struct {
	data []byte
	mode int64
}

// tarContext makes a build context in memory. Fixed times and owners keep the engine's build
// cache valid across runs: the same program gives the same image.
func tarContext(files map[string]tarEntry) (io.Reader, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		f := files[n]
		hdr := &tar.Header{Name: n, Mode: f.mode, Size: int64(len(f.data)), ModTime: time.Unix(0, 0), Typeflag: tar.TypeReg, Format: tar.FormatPAX}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, err
		}
		if _, err := tw.Write(f.data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return &buf, nil
}

// readBuildOutput reads the engine's JSON stream to its end and returns the build's error, if
// any, with the build's output.
func readBuildOutput(r io.Reader) error {
	var out strings.Builder
	dec := json.NewDecoder(r)
	for {
		var msg struct {
			Stream      string `json:"stream"`
			Status      string `json:"status"`
			Error       string `json:"error"`
			ErrorDetail *struct {
				Message string `json:"message"`
			} `json:"errorDetail"`
		}
		if err := dec.Decode(&msg); err == io.EOF {
			return nil
		} else if err != nil {
			return fmt.Errorf("reading the build output: %w\n%s", err, out.String())
		}
		out.WriteString(msg.Stream)
		if msg.Status != "" {
			out.WriteString(msg.Status + "\n")
		}
		if msg.Error != "" || msg.ErrorDetail != nil {
			m := msg.Error
			if m == "" {
				m = msg.ErrorDetail.Message
			}
			return fmt.Errorf("image build failed: %s\n%s", m, out.String())
		}
	}
}

// runID is unique to this test binary (see RunLabel).
var runID = func() string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return fmt.Sprintf("%d-%s", os.Getpid(), hex.EncodeToString(b))
}()

var unsafeChars = regexp.MustCompile(`[^A-Za-z0-9_.-]+`)

// sanitize keeps t.Name() usable as a label value, a name or a filter.
func sanitize(name string) string { return unsafeChars.ReplaceAllString(name, "_") }

var (
	labeledMu sync.Mutex
	labeled   = map[testing.TB]bool{}
)

// LabelFor returns the labels that a test puts on each container it creates:
// {"dfp-test": sanitized t.Name(), "dfp-test.run": <unique to this test binary>}. The first
// call in a test registers its cleanup: every container with both labels is force-removed (with
// its anonymous volumes) when the test ends, whether it passed or not.
func LabelFor(t testing.TB) map[string]string {
	t.Helper()
	labels := map[string]string{TestLabel: sanitize(t.Name()), RunLabel: runID}
	labeledMu.Lock()
	first := !labeled[t]
	labeled[t] = true
	labeledMu.Unlock()
	if first {
		t.Cleanup(func() {
			labeledMu.Lock()
			delete(labeled, t)
			labeledMu.Unlock()
			removeContainers(t, labels)
		})
	}
	return labels
}

// RemoveContainersOnCleanup registers, once per test, the removal of the containers labelled
// with LabelFor(t) when the test ends.
func RemoveContainersOnCleanup(t testing.TB) {
	t.Helper()
	LabelFor(t)
}

// removeContainers force-removes every container (running or not) that has all the labels.
func removeContainers(t testing.TB, labels map[string]string) {
	t.Helper()
	cli, err := newDockerClient()
	if err != nil {
		t.Logf("cleanup: docker client: %v", err)
		return
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), cleanupTimeout)
	defer cancel()
	f := filters.NewArgs()
	for k, v := range labels {
		f.Add("label", k+"="+v)
	}
	list, err := cli.ContainerList(ctx, container.ListOptions{All: true, Filters: f})
	if err != nil {
		t.Logf("cleanup: list containers %v: %v", labels, err)
		return
	}
	for _, c := range list {
		err := cli.ContainerRemove(ctx, c.ID, container.RemoveOptions{Force: true, RemoveVolumes: true})
		if err != nil && !cerrdefs.IsNotFound(err) && !strings.Contains(err.Error(), "already in progress") {
			t.Logf("cleanup: remove container %.12s: %v", c.ID, err)
		}
	}
}

// ComposeBin returns docker-compose (the v1 tool, which has `scale`): $DFP_DOCKER_COMPOSE_BIN,
// docker-compose on PATH or /usr/bin/docker-compose. Missing: Require.
func ComposeBin(t testing.TB) string {
	t.Helper()
	if p := os.Getenv("DFP_DOCKER_COMPOSE_BIN"); p != "" {
		return p
	}
	if p, err := exec.LookPath("docker-compose"); err == nil {
		return p
	}
	if _, err := os.Stat("/usr/bin/docker-compose"); err == nil {
		return "/usr/bin/docker-compose"
	}
	Require(t, "docker-compose", "not on PATH and DFP_DOCKER_COMPOSE_BIN unset")
	return ""
}

// ComposeProject returns a compose project name for this test, unique to this test binary, in
// the characters docker-compose keeps (it lowercases and drops the rest).
func ComposeProject(t testing.TB) string {
	t.Helper()
	name := strings.ToLower(sanitize(t.Name()))
	name = composeDropRE.ReplaceAllString(name, "")
	if len(name) > 40 {
		name = name[:40]
	}
	return "dfp" + name + "_" + strings.ReplaceAll(runID, "-", "")
}

var composeFiles = []string{"docker-compose.yml", "docker-compose.yaml", "compose.yml", "compose.yaml"}

type composeKey struct {
	t       testing.TB
	project string
}

var (
	composedMu sync.Mutex
	composed   = map[composeKey]bool{}
)

// Compose runs `docker-compose -p project -f FILE args...` in dir, where FILE is dir's
// docker-compose.yml (or .yaml, compose.yml, compose.yaml), within 120 s, and returns its
// combined output; an error or the time running out fails the test. The first call for a
// project in a test registers its removal when the test ends:
// `docker-compose -p project -f FILE down -v --remove-orphans`, and then the force-removal of any
// container and network left with the project's label. No engine or no docker-compose: Require.
func Compose(t testing.TB, dir, project string, args ...string) string {
	t.Helper()
	Docker(t)
	bin := ComposeBin(t)
	var file string
	for _, name := range composeFiles {
		if _, err := os.Stat(filepath.Join(dir, name)); err == nil {
			file = filepath.Join(dir, name)
			break
		}
	}
	if file == "" {
		t.Fatalf("docker-compose: no compose file (%s) in %s", strings.Join(composeFiles, ", "), dir)
	}

	key := composeKey{t, project}
	composedMu.Lock()
	first := !composed[key]
	composed[key] = true
	composedMu.Unlock()
	if first {
		// Registered now, after the compose file's directory was made: it runs before a
		// t.TempDir holding the file is removed.
		t.Cleanup(func() {
			composedMu.Lock()
			delete(composed, key)
			composedMu.Unlock()
			composeDown(t, bin, dir, project, file)
		})
	}

	out, err := runCompose(bin, dir, project, file, composeTimeout, args...)
	if err != nil {
		t.Fatalf("docker-compose -p %s %s: %v\n%s", project, strings.Join(args, " "), err, out)
	}
	return out
}

func runCompose(bin, dir, project, file string, timeout time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, append([]string{"--ansi", "never", "-p", project, "-f", file}, args...)...)
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		err = fmt.Errorf("did not finish within %v: %w", timeout, err)
	}
	return string(out), err
}

// composeDown removes a project: `down`, then whatever is left with its label (after a failed
// `down`, or when its compose file is gone).
func composeDown(t testing.TB, bin, dir, project, file string) {
	t.Helper()
	if _, err := os.Stat(file); err == nil {
		if out, err := runCompose(bin, dir, project, file, composeTimeout, "down", "-v", "--remove-orphans", "-t", "5"); err != nil {
			t.Logf("cleanup: docker-compose -p %s down: %v\n%s", project, err, out)
		}
	}
	normalized := composeDropRE.ReplaceAllString(strings.ToLower(project), "")
	label := map[string]string{"com.docker.compose.project": normalized}
	removeContainers(t, label)

	cli, err := newDockerClient()
	if err != nil {
		return
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), cleanupTimeout)
	defer cancel()
	nets, err := cli.NetworkList(ctx, network.ListOptions{Filters: filters.NewArgs(filters.Arg("label", "com.docker.compose.project="+normalized))})
	if err != nil {
		t.Logf("cleanup: list networks of %s: %v", project, err)
		return
	}
	for _, n := range nets {
		if err := cli.NetworkRemove(ctx, n.ID); err != nil && !cerrdefs.IsNotFound(err) {
			t.Logf("cleanup: remove network %s: %v", n.Name, err)
		}
	}
}
