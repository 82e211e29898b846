//! hami-e2e: a real control plane for tests.
