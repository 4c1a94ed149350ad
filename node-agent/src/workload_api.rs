//! SPIFFE Workload API (being written).
