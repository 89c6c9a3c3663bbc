//! Device discovery (being written).
