// Package shipped reads settings from the deployment files the project
// ships, so tests and the benchmark hold the relay to the same figures the
// manifests promise instead of copies that drift.
package shipped

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
)

// Memory is the memory budget of the shipped Kubernetes sidecar.
type Memory struct {
	Limit      int64  // the container's memory limit, in bytes
	GOMEMLIMIT string // the GOMEMLIMIT it sets, as written (96MiB)
}

// DeploymentPath is the Kubernetes manifest, relative to the repository root.
const DeploymentPath = "deploy/k8s/deployment.yaml"

var (
	memoryLimit = regexp.MustCompile(`(?s)limits:.*?memory:\s*"?(\d+)Mi"?`)
	goMemLimit  = regexp.MustCompile(`(?s)name: GOMEMLIMIT\s*\n\s*value:\s*"?([0-9]+MiB)"?`)
)

// ReadMemory reads the container memory limit and GOMEMLIMIT from the
// manifest under the repository root.
func ReadMemory(root string) (Memory, error) {
	manifest, err := os.ReadFile(filepath.Join(root, DeploymentPath))
	if err != nil {
		return Memory{}, fmt.Errorf("shipped memory: %w", err)
	}
	lim, gml := memoryLimit.FindSubmatch(manifest), goMemLimit.FindSubmatch(manifest)
	if lim == nil || gml == nil {
		return Memory{}, fmt.Errorf("shipped memory: %s: no memory limit (limits: memory: NMi) or GOMEMLIMIT (NMiB) found", DeploymentPath)
	}
	mi, err := strconv.ParseInt(string(lim[1]), 10, 64)
	if err != nil {
		return Memory{}, fmt.Errorf("shipped memory: %s: memory limit %s: %w", DeploymentPath, lim[1], err)
	}
	return Memory{Limit: mi << 20, GOMEMLIMIT: string(gml[1])}, nil
}
