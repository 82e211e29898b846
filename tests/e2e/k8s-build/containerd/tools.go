//go:build tools

// Package tools only records, for `go mod tidy`, the commands that
// tests/e2e/build-k8s.sh builds from this module: the container runtime of
// the harness's real node.
package tools

import (
	_ "github.com/containerd/containerd/v2/cmd/containerd"
	_ "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"
	_ "github.com/containerd/containerd/v2/cmd/ctr"
)
