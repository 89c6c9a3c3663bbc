//! Reactors (being written).
