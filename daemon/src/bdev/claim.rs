//! Device claiming (being written).
