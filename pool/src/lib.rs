//! Reserve-backed locked buffer pool (see README.md).
