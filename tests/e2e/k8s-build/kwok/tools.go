//go:build tools

// Package tools only records, for `go mod tidy`, the command that
// tests/e2e/build-k8s.sh builds from this module.
package tools

import (
	_ "sigs.k8s.io/kwok/cmd/kwok"
)
