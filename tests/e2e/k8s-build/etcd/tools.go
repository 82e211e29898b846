//go:build tools

// Package tools only records, for `go mod tidy`, the command that
// tests/e2e/build-k8s.sh builds from this module (etcd's server main package).
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
)
