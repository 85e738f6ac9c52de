//! Integration test support: the VM harness (see README.md).
