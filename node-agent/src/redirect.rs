//! eBPF connect redirect (being written).
