//! Benchmark report (placeholder).
