// Package lab tests the lab users bring up (ansible/, Vagrantfile, jenkins/Jenkinsfile,
// scripts/pipeline.sh) with the real tools: ansible-lint and vagrant check their files, the
// Ansible roles converge on a Debian host made by the test, and the pipeline's script deploys and
// scales books-ms through a real Docker engine, Consul, registrar and proxy.
package lab

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/docker-flow-proxy/docker-flow-proxy/internal/testenv"
)

// tool returns the path of a program the lab needs, or stops the test (testenv.Require) when it
// is missing: scripts/lab-setup.sh installs it.
func tool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		testenv.Require(t, name, "not on PATH; scripts/lab-setup.sh installs the lab's tools")
	}
	return p
}

// command runs name with args in dir, with extra environment, within limit; the process group
// is killed when the time runs out. It returns the combined output and the error.
func command(limit time.Duration, dir string, env []string, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if ctx.Err() != nil {
		err = fmt.Errorf("%s did not finish within %v: %w", name, limit, err)
	}
	return out.String(), err
}

func TestAnsibleLintPassesOnTheRoles(t *testing.T) {
	lint := tool(t, "ansible-lint")
	dir := filepath.Join(testenv.ModuleRoot(t), "ansible")
	// ansible-lint writes its cache under the project; keep it out of the clone.
	env := []string{"ANSIBLE_HOME=" + t.TempDir(), "ANSIBLE_LOCAL_TEMP=" + t.TempDir(), "NO_COLOR=1"}
	out, err := command(4*time.Minute, dir, env, lint, "--offline", "--nocolor")
	if err != nil {
		t.Fatalf("ansible-lint in ansible/: %v\n%s", err, out)
	}
	if !strings.Contains(out, "Passed") {
		t.Fatalf("ansible-lint did not report a pass:\n%s", out)
	}
	t.Logf("ansible-lint: %s", lastLine(out))
}

func TestPlaybookSyntax(t *testing.T) {
	playbook := tool(t, "ansible-playbook")
	dir := filepath.Join(testenv.ModuleRoot(t), "ansible")
	out, err := command(2*time.Minute, dir, []string{"ANSIBLE_LOCAL_TEMP=" + t.TempDir()}, playbook, "--syntax-check", "site.yml")
	if err != nil {
		t.Fatalf("ansible-playbook --syntax-check site.yml: %v\n%s", err, out)
	}
}

// The Vagrantfile validates, and its machines are the article's, with the inventory's IPs.
func TestVagrantfileValidatesWithTheArticlesMachines(t *testing.T) {
	vagrant := tool(t, "vagrant")
	root := testenv.ModuleRoot(t)
	// Vagrant keeps machine state in .vagrant/ next to the Vagrantfile: not in the clone.
	env := []string{"VAGRANT_DOTFILE_PATH=" + filepath.Join(t.TempDir(), "vagrant"), "VAGRANT_NO_COLOR=1", "VAGRANT_CHECKPOINT_DISABLE=1"}
	// No hypervisor runs here (nor in CI): --ignore-provider validates everything but the
	// VirtualBox and libvirt blocks, and needs no usable provider, which `vagrant status` does.
	out, err := command(2*time.Minute, root, env, vagrant, "validate", "--ignore-provider", "--machine-readable")
	if err != nil || !strings.Contains(out, "validated successfully") {
		t.Fatalf("vagrant validate: %v\n%s", err, out)
	}
	var machines []string
	for _, line := range strings.Split(out, "\n") {
		// timestamp,target,type,data...
		f := strings.Split(line, ",")
		if len(f) >= 4 && f[2] == "metadata" && f[3] == "provider" && f[1] != "" {
			machines = append(machines, f[1])
		}
	}
	want := []string{"swarm-master", "swarm-node-1", "swarm-node-2", "jenkins"}
	if !slices.Equal(machines, want) {
		t.Fatalf("vagrant validate lists machines %v, want %v\n%s", machines, want, out)
	}

	// The inventory the Vagrantfile reads gives the article's private IPs.
	ini, err := os.ReadFile(filepath.Join(root, "ansible", "inventory", "vagrant.ini"))
	if err != nil {
		t.Fatal(err)
	}
	ips := map[string]string{"swarm-master": "10.100.192.200", "swarm-node-1": "10.100.192.201", "swarm-node-2": "10.100.192.202", "jenkins": "10.100.199.200"}
	for name, ip := range ips {
		re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + ` .*\blab_ip=` + regexp.QuoteMeta(ip) + `\b`)
		if !re.Match(ini) {
			t.Errorf("ansible/inventory/vagrant.ini: no line giving %s lab_ip=%s", name, ip)
		}
	}
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

// The Jenkinsfile offers every stage of scripts/pipeline.sh and runs the script for each.
func TestJenkinsfileRunsEveryStageOfThePipelineScript(t *testing.T) {
	root := testenv.ModuleRoot(t)
	usage, err := command(30*time.Second, root, nil, filepath.Join(root, "scripts", "pipeline.sh"))
	if err == nil {
		t.Fatalf("scripts/pipeline.sh without a stage succeeded:\n%s", usage)
	}
	m := regexp.MustCompile(`usage: \S+ (\S+)`).FindStringSubmatch(usage)
	if m == nil {
		t.Fatalf("scripts/pipeline.sh without a stage printed no usage:\n%s", usage)
	}
	stages := strings.Split(m[1], "|")
	jenkinsfile, err := os.ReadFile(filepath.Join(root, "jenkins", "Jenkinsfile"))
	if err != nil {
		t.Fatal(err)
	}
	choices := regexp.MustCompile(`choice\(name: 'STAGE', choices: \[([^\]]*)\]`).FindSubmatch(jenkinsfile)
	if choices == nil {
		t.Fatal("jenkins/Jenkinsfile has no STAGE choice parameter")
	}
	for _, s := range stages {
		if !strings.Contains(string(jenkinsfile), "sh 'scripts/pipeline.sh "+s+"'") {
			t.Errorf("jenkins/Jenkinsfile never runs scripts/pipeline.sh %s", s)
		}
		if !strings.Contains(string(choices[1]), "'"+s+"'") {
			t.Errorf("jenkins/Jenkinsfile's STAGE parameter does not offer %s", s)
		}
	}
	if len(stages) < 4 {
		t.Fatalf("scripts/pipeline.sh offers %v, want at least the three jobs' stages and destroy", stages)
	}
}
