//! Diff desired vs actual.
